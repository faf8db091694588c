"""The VMs the service knows: one handle each, with its kept QMP session and its events.

A VM is known by its QMP socket (its state directory is ``ROOT/vm-<hash>``, as in the direct
mode) and, when a runtime registered it, by an id of its choosing (a sandbox's container id).
Its handle keeps one session open while QEMU is there and listens on it: DEVICE_DELETED of a
NIC left ``unplug-pending`` completes that unplug at once; SHUTDOWN is noted; a lost
connection settles the VM as a reconcile does (a QEMU gone has its NICs' host side cleaned,
a new QEMU on the same path is a new VM). Registrations survive a restart in
``ROOT/registry.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import attrs

from qmpnet import layout
from qmpnet.config import Config
from qmpnet.errors import HostError, InvalidInputError, QmpnetError, StateError
from qmpnet.files import Writer, atomic_write, private_dir, read_text
from qmpnet.hypervisor import device_id
from qmpnet.lifecycle import Observer
from qmpnet.model import VmIdentity
from qmpnet.network import NetworkState
from qmpnet.qmp import vm_identity
from qmpnet.store import Status

log = logging.getLogger(__name__)

#: seconds between looks at a followed netns's path (see :meth:`VmHandle._follow`)
LINK_CHECK = 1.0
#: the events a VM's handle hears
EVENTS = ["DEVICE_DELETED", "SHUTDOWN"]


@attrs.define(eq=False)
class VmHandle:
    """One VM: its state, its kept session and the task that hears its events."""

    id: str
    qmp: str
    state: NetworkState
    root: str
    #: registered by root (a group member may act on it)
    by_root: bool = False
    #: the sandbox netns registered with the VM (a group member may name it)
    sandbox: str = ""
    #: the QEMU the kept session talks to
    peer: VmIdentity | None = None
    shutdown_seen: bool = False
    #: host links of plugged NICs that the kernel reported deleted
    vanished: dict[str, float] = attrs.field(factory=dict)
    _lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    _listener: asyncio.Task[None] | None = None
    _jobs: set[asyncio.Task[Any]] = attrs.field(factory=set)
    #: netns path ("" the host's) -> the task hearing its RTM_DELLINK
    _followers: dict[str, asyncio.Task[None]] = attrs.field(factory=dict)

    @property
    def connected(self) -> bool:
        session = self.state.session
        return session is not None and session.connected

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "qmp": self.qmp,
            "state": str(self.state.store.dir),
            "registered_by_root": self.by_root,
            "sandbox": self.sandbox,
            "session": "open" if self.connected else "closed",
            "qemu_pid": self.peer.pid if self.peer else None,
            "shutdown_seen": self.shutdown_seen,
            "vanished_links": sorted(self.vanished),
        }

    def for_request(self, config: Config) -> NetworkState:
        """The VM with one request's settings, through the kept session."""
        return self.state.sharing(config)

    async def ensure_session(self) -> None:
        """Open the kept session if QEMU is there; a failure is left to the operation.

        The operation then connects on its own and reports the same error the direct mode
        would (a reconcile of a QEMU that is gone goes on to clean its host side).
        """
        async with self._lock:
            if self.connected:
                return
            await self._close_session()
            with contextlib.suppress(FileNotFoundError, OSError, QmpnetError):
                await self.state.connect()
            session = self.state.session
            if session is None:
                return
            self.peer = session.peer()
            self.shutdown_seen = False
            layout.write_hold(self.root, self.qmp)
            self._listener = asyncio.create_task(self._listen(), name=f"events {self.id}")
            log.info("%s: QMP session open (QEMU pid %s)", self.id, self.peer and self.peer.pid)

    # --- host links that vanish ---------------------------------------------------------------

    def follow_links(self) -> None:
        """Hear the deletion of every plugged NIC's host link: one netlink socket per netns.

        A vanished link is logged and shown (``list-ifaces``, ``status``), never acted on:
        QEMU 7.2 aborts when the guest resets a multiqueue NIC whose tap is gone, and an
        unplug is such a reset, so the service leaves the NIC plugged for its owner to decide
        (whose unplug refuses that case: :class:`~qmpnet.errors.TapGoneError`). A deleted
        netns counts as vanished too, though its taps live on in it: QEMU's queue fds hold
        the namespace until the unplug closes them, and no path reaches it any more.
        """
        try:
            entries = self.state.store.load().entries
        except StateError:
            return
        # a vanished link is news only while a NIC records it: a NIC dropped or removed
        # since (its QEMU gone, a reconcile) must not mark a new NIC that reuses the name
        recorded = {e.endpoint.host_link for e in entries if e.endpoint.host_link}
        for name in set(self.vanished) - recorded:
            del self.vanished[name]
        wanted = {e.endpoint.netns_path for e in entries if e.endpoint.host_link}
        for netns in set(self._followers) - wanted:
            self._followers.pop(netns).cancel()
        for netns in wanted - set(self._followers):
            task = asyncio.create_task(self._follow(netns), name=f"links {self.id} {netns}")
            self._followers[netns] = task

    async def _follow(self, netns: str) -> None:
        from qmpnet.links import Links

        try:
            async with Links.open(netns, link_events=True) as links:
                events = links.events()
                while True:
                    try:
                        # our socket keeps a deleted netns alive: look at its path each second
                        event = await asyncio.wait_for(anext(events), LINK_CHECK)
                    except TimeoutError:
                        if netns and not _exists(netns):
                            break
                        continue
                    if not event.present:
                        await self._link_gone(netns, event.link.name)
        except HostError as err:
            if not netns or _exists(netns):
                log.warning("%s: cannot hear link events of %s: %s", self.id, netns or "host", err)
                self._followers.pop(netns, None)
                return
        log.warning(
            "%s: netns %s was deleted; the taps of its NICs live on in it, held by QEMU's "
            "queue fds, until the NICs are unplugged",
            self.id,
            netns,
        )
        for entry in self.state.store.load().entries:
            if entry.endpoint.netns_path == netns and entry.endpoint.host_link:
                self._vanish(entry.endpoint.host_link)
        self._followers.pop(netns, None)

    async def _link_gone(self, netns: str, name: str) -> None:
        """RTM_DELLINK: ours only if a NIC still records the link once no operation runs."""
        async with self.state.store.locked():  # an unplug in flight deletes its own tap
            entries = self.state.store.load().entries
        if any(e.endpoint.host_link == name and e.endpoint.netns_path == netns for e in entries):
            self._vanish(name)

    def _vanish(self, name: str) -> None:
        if name not in self.vanished:
            self.vanished[name] = time.time()
            log.warning(
                "%s: host link %s of a plugged NIC is gone; the NIC stays plugged (an unplug "
                "resets it in the guest, which QEMU 7.2 cannot survive for a multiqueue NIC "
                "whose tap was deleted)",
                self.id,
                name,
            )

    async def _close_session(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None and listener is not asyncio.current_task():
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        if self.state.session is not None:
            await self.state.close()
        layout.drop_hold(self.root, self.qmp)

    async def close(self) -> None:
        """Close the session and wait for the jobs events started (service stop)."""
        for task in self._followers.values():
            task.cancel()
        self._followers.clear()
        async with self._lock:
            await self._close_session()
        for job in list(self._jobs):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job

    def _spawn(self, what: str, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except QmpnetError as err:
                log.warning("%s: %s: %s", self.id, what, err)
            except Exception:
                log.exception("%s: %s failed", self.id, what)

        job = asyncio.create_task(run(), name=f"{what} {self.id}")
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _listen(self) -> None:
        session = self.state.session
        assert session is not None
        with session.subscribe(EVENTS) as listener:
            while (event := await session.next_event(listener)) is not None:
                self._on_event(event)
        log.warning("%s: QMP connection lost", self.id)
        self._listener = None
        self._spawn("settle after the connection was lost", self._lost())

    def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "SHUTDOWN":
            self.shutdown_seen = True
            log.info("%s: QEMU reports SHUTDOWN (%s)", self.id, data.get("reason", "?"))
        elif name == "DEVICE_DELETED" and isinstance(data.get("device"), str):
            self._spawn("complete a pending unplug", self._deleted(data["device"]))

    async def _deleted(self, device: str) -> None:
        """DEVICE_DELETED of a NIC left unplug-pending: finish its unplug now."""
        for entry in self.state.store.load().entries:
            tap = entry.endpoint.tap
            if entry.status is Status.UNPLUG_PENDING and tap and device_id(tap) == device:
                log.info("%s: %s released by the guest; completing its unplug", self.id, device)
                await self.state.remove_interface(entry.endpoint.hardware_addr)

    async def _lost(self) -> None:
        """The session is gone (QEMU exited, or was replaced): settle as a reconcile does."""
        from qmpnet.reconcile import reconcile

        async with self._lock:
            await self._close_session()
        # A QEMU that exits closes its socket a moment after the connection: a reconcile
        # that still found it would keep the NICs, so wait (bounded) for it to go.
        for _ in range(100):  # up to 2 s
            if vm_identity(self.qmp) != self.peer:
                break
            await asyncio.sleep(0.02)
        report = await reconcile(self.state)
        for line in report.lines():
            log.info("%s: %s", self.id, line)
        self.follow_links()  # the NICs it dropped: their links and netns are no news any more
        if vm_identity(self.qmp) is not None:
            await self.ensure_session()  # a new QEMU on the path: hear its events too


@attrs.define(eq=False)
class Registry:
    """Every VM of the node, by id and by socket; registrations persisted."""

    root: str
    config: Config = attrs.field(factory=Config)
    #: lifecycle observers every VM's operations get (logging, metrics, a test's crash drill)
    observers: list[Observer] = attrs.field(factory=list)
    _by_id: dict[str, VmHandle] = attrs.field(factory=dict)
    _writer: Writer = attrs.field(factory=Writer)

    @property
    def path(self) -> Path:
        return Path(self.root) / layout.REGISTRY_FILE

    def handles(self) -> list[VmHandle]:
        return list(self._by_id.values())

    def get(self, vm_id: str) -> VmHandle | None:
        return self._by_id.get(vm_id)

    def by_socket(self, qmp: str) -> VmHandle | None:
        key = layout.vm_key(qmp)
        for handle in self._by_id.values():
            if layout.vm_key(handle.qmp) == key:
                return handle
        return None

    def add(
        self, qmp: str, *, vm_id: str = "", by_root: bool = False, sandbox: str = ""
    ) -> VmHandle:
        """Know a VM (idempotent for the same id and socket)."""
        qmp = os.path.abspath(qmp)
        vm_id = vm_id or layout.vm_key(qmp)
        known = self._by_id.get(vm_id)
        if known is not None:
            if layout.vm_key(known.qmp) != layout.vm_key(qmp):
                raise InvalidInputError("id", vm_id, f"already registered with socket {known.qmp}")
            known.by_root |= by_root
            known.sandbox = sandbox or known.sandbox
            return known
        other = self.by_socket(qmp)
        if other is not None:
            if vm_id != layout.vm_key(qmp) and other.id == layout.vm_key(qmp):
                # first used by its socket, now registered with an id: take the id
                del self._by_id[other.id]
                other.id = vm_id
                other.by_root |= by_root
                other.sandbox = sandbox or other.sandbox
                self._by_id[vm_id] = other
                return other
            raise InvalidInputError("qmp", qmp, f"already registered as VM {other.id}")
        state = NetworkState.open(layout.vm_dir(self.root, qmp), qmp, self.config)
        state.observers.extend(self.observers)
        handle = VmHandle(vm_id, qmp, state, self.root, by_root=by_root, sandbox=sandbox)
        self._by_id[vm_id] = handle
        return handle

    async def remove(self, vm_id: str) -> VmHandle:
        handle = self._by_id.pop(vm_id, None)
        if handle is None:
            raise InvalidInputError("vm", vm_id, "no such VM is registered")
        await handle.close()
        await self.save()
        return handle

    async def save(self) -> None:
        data = {
            "version": 1,
            "vms": [
                {"id": h.id, "qmp": h.qmp, "by_root": h.by_root, "sandbox": h.sandbox}
                for h in self._by_id.values()
            ],
        }
        text = json.dumps(data, indent=1, sort_keys=True)

        def write() -> None:
            private_dir(Path(self.root))
            atomic_write(self.path, text)

        await self._writer.run(write)

    def load(self) -> None:
        """Read the registrations and every state directory under the root."""
        try:
            text = read_text(self.path)
            data = json.loads(text) if text else {}
        except (ValueError, StateError) as err:
            log.error("registry %s unreadable, starting without it: %s", self.path, err)
            data = {}
        for item in data.get("vms", []) if isinstance(data, dict) else []:
            with contextlib.suppress(KeyError, TypeError, InvalidInputError):
                self.add(
                    str(item["qmp"]),
                    vm_id=str(item["id"]),
                    by_root=bool(item.get("by_root")),
                    sandbox=str(item.get("sandbox", "")),
                )
        for directory in sorted(Path(self.root).glob("vm-*")):
            qmp = _recorded_socket(directory)
            if qmp and self.by_socket(qmp) is None:
                self.add(qmp)
            elif not qmp and (directory / "state.json").exists():
                log.warning(
                    "%s: the state records no QMP socket (an older release): run "
                    "`qmpnet reconcile --state %s --qmp SOCKET` once",
                    directory,
                    directory,
                )


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _recorded_socket(directory: Path) -> str:
    try:
        text = read_text(directory / "state.json")
        data = json.loads(text) if text else {}
    except (ValueError, StateError):
        return ""
    qmp = data.get("qmp") if isinstance(data, dict) else None
    return qmp if isinstance(qmp, str) else ""
