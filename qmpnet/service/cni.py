"""CNI invocations run inside the service, and the attachments that wait for their VM.

``qmpnet-cni`` forwards every command but VERSION here when the service is there
(``cni.exec``): the commands are the plugin's own (:mod:`qmpnet.cni.commands`), run over the
service's kept per-VM state and session instead of a process of their own.

A container runtime runs a pod's first CNI ADD before the sandbox's VM exists (containerd's
CRI creates the netns, runs ADD, then starts the sandbox task). Such an ADD is checked as
far as it can be, answered at once with the result the plug will make true, and kept
*pending* in ``ROOT/pending.json``. The VM becomes known when a runtime registers it under
the sandbox's container id (``vm.register``), or when the socket the configuration names
appears (inotify on its directory, with a slow look as a fallback); the service then plugs
every pending attachment of that VM, each all or nothing. A plug that fails is undone and
kept as *failed* for CHECK to report; DEL cancels a pending attachment; GC drops those
missing from the runtime's valid list.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from qmpnet import layout
from qmpnet.cni.commands import plug
from qmpnet.cni.entry import FORWARDED
from qmpnet.cni.main import _Logs, answer
from qmpnet.cni.records import Attachment, Book
from qmpnet.cni.request import Deferred, Env, NetConf, Request, Vms
from qmpnet.cni.spec import DEBUG_ENV, to_cni_error
from qmpnet.config import Config
from qmpnet.errors import StateError
from qmpnet.files import Writer, atomic_write, private_dir, read_text
from qmpnet.logs import fields
from qmpnet.network import NetworkState
from qmpnet.service.registry import Registry, VmHandle
from qmpnet.store import STATE_FILE, Status

log = logging.getLogger(__name__)

PENDING_FILE = "pending.json"
#: seconds between looks at the pending sockets besides inotify (a path inotify cannot see
#: change: a bind mount, a watch limit reached)
LOOK_EVERY = 2.0

Key = tuple[str, str, str]


@attrs.frozen(kw_only=True)
class Waiting:
    """One ADD kept until its VM appears: the invocation itself, and what it answered."""

    network: str
    container_id: str
    ifname: str
    netns: str
    #: the socket the configuration names ("" until a runtime registers the sandbox's VM)
    qmp: str
    stdin: str
    environ: Mapping[str, str]
    #: the MAC the result gave (main mode: the VM NIC's; chained: the pod link's)
    mac: str
    #: main mode: the IPAM result the ADD took (released by the DEL)
    got: Mapping[str, Any] | None = None
    #: chained macvtap or bridged: the NIC id whose parked MAC the result gave the pod link
    endpoint_id: str = ""
    since: float = attrs.field(factory=time.time)
    status: Deferred = Deferred.PENDING
    error: str = ""

    @property
    def key(self) -> Key:
        return self.network, self.container_id, self.ifname

    def request(self, vms: Vms) -> Request:
        env = Env.from_environ(self.environ)
        return Request(env, NetConf.parse(self.stdin.encode(), "ADD"), vms)

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["environ"] = dict(self.environ)
        out["status"] = self.status.value
        return out

    @classmethod
    def from_json(cls, data: Any) -> Waiting:
        data = dict(data)
        data["status"] = Deferred(data.get("status", "pending"))
        data["environ"] = {str(k): str(v) for k, v in dict(data["environ"]).items()}
        return cls(**data)

    def view(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "container_id": self.container_id,
            "ifname": self.ifname,
            "netns": self.netns,
            "qmp": self.qmp,
            "mac": self.mac,
            "status": self.status.value,
            "error": self.error,
            "since": round(self.since, 3),
        }


class ServiceVms(Vms):
    """The commands' view of the service: its kept VMs, and the pending attachments."""

    defers = True

    def __init__(self, host: CniHost) -> None:
        self.host = host

    @property
    def registry(self) -> Registry:
        return self.host.registry

    async def state(self, state_dir: Path, qmp: str, config: Config) -> NetworkState:
        # no VM named (a DEL with no record), or an attachment the direct mode made before
        # the service ran (its VM's state is in the attachment's directory): as the plugin's
        # own process would
        if not qmp or (state_dir / STATE_FILE).exists():
            return NetworkState.open(state_dir, qmp, config)
        handle = await self.host.handle(qmp)
        return handle.for_request(config)

    def registered_socket(self, container_id: str) -> str:
        handle = self.registry.get(container_id) if container_id else None
        return handle.qmp if handle is not None else ""

    async def present(self, qmp: str) -> bool:
        if not qmp:
            return False
        handle = self.registry.by_socket(qmp)
        if handle is not None and handle.connected:
            return True
        return await asyncio.to_thread(listening, qmp)

    async def defer(self, req: Request, qmp: str, result: Mapping[str, Any], **kw: Any) -> None:
        env = req.env
        waiting = Waiting(
            network=req.conf.name,
            container_id=env.container_id,
            ifname=env.ifname,
            netns=env.netns,
            qmp=qmp,
            stdin=req.conf.raw.decode(),
            environ={k: v for k, v in env.environ.items() if k in FORWARDED and k != DEBUG_ENV},
            mac=str(kw.get("mac", "")),
            got=kw.get("got"),
            endpoint_id=str(kw.get("endpoint_id", "")),
        )
        await self.host.keep(waiting)
        log.info(
            "%s of container %s pending: its VM %s",
            env.ifname,
            env.container_id,
            f"at {qmp} is not there yet" if qmp else "is not registered yet",
        )

    async def cancel(self, req: Request) -> bool:
        return await self.host.drop(req.key)

    def deferred(self, req: Request) -> tuple[Deferred, str] | None:
        waiting = self.host.waiting.get(req.key)
        if waiting is None:
            return None
        if waiting.status is Deferred.PENDING:
            where = f"the socket {waiting.qmp}" if waiting.qmp else "a VM registered under its id"
            return waiting.status, f"waiting since {time.ctime(waiting.since)} for {where}"
        return waiting.status, waiting.error

    async def collect(self, network: str, valid: set[tuple[str, str]]) -> list[Attachment]:
        stale = [
            w
            for w in self.host.waiting.values()
            if w.network == network and (w.container_id, w.ifname) not in valid
        ]
        dropped = []
        for waiting in stale:
            if await self.host.drop(waiting.key):
                dropped.append(
                    Attachment(
                        network=waiting.network,
                        container_id=waiting.container_id,
                        ifname=waiting.ifname,
                        netns=waiting.netns,
                        mac=waiting.mac,
                        qmp_socket=waiting.qmp,
                        ipam=waiting.got is not None,
                    )
                )
        return dropped


def listening(path: str) -> bool:
    """Whether a process accepts connections on the unix socket ``path`` now."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(1.0)
    try:
        sock.connect(path)
    except TimeoutError:
        return True  # its backlog is full: something listens
    except OSError:
        return False
    finally:
        sock.close()
    return True


@attrs.define(eq=False)
class CniHost:
    """The service's CNI side: ``cni.exec``, the pending attachments and their plugging."""

    registry: Registry
    waiting: dict[Key, Waiting] = attrs.field(factory=dict)
    _locks: dict[Key, asyncio.Lock] = attrs.field(factory=dict)
    _writer: Writer = attrs.field(factory=Writer)
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event)
    _looker: asyncio.Task[None] | None = None
    #: VMs a command used since their links were last followed
    _touched: set[VmHandle] = attrs.field(factory=set)
    vms: ServiceVms = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.vms = ServiceVms(self)

    @property
    def path(self) -> Path:
        return Path(self.registry.root) / PENDING_FILE

    # --- cni.exec --------------------------------------------------------------------------

    async def execute(self, environ: Mapping[str, str], stdin: bytes) -> dict[str, Any]:
        """One forwarded invocation: the plugin's answer, and its debug lines if asked."""
        env = {k: v for k, v in environ.items() if k in FORWARDED}
        debug = env.get(DEBUG_ENV) == "1"
        stream = io.StringIO()
        logs = _Logs(debug, stream, resident=True)
        try:
            status, out = await answer(stdin, env, self.vms, logs)
        finally:
            logs.close()
            self._follow()
        return {"exit": status, "stdout": out, "stderr": stream.getvalue()}

    # --- the VMs ---------------------------------------------------------------------------

    async def handle(self, qmp: str) -> VmHandle:
        handle = self.registry.by_socket(qmp)
        if handle is None:
            handle = self.registry.add(qmp, by_root=True)
            await self.registry.save()
        await handle.ensure_session()
        self._touched.add(handle)
        return handle

    def _follow(self) -> None:
        """Hear the host links of the NICs the last commands plugged or removed."""
        touched, self._touched = self._touched, set()
        for handle in touched:
            handle.follow_links()

    # --- the pending attachments -------------------------------------------------------------

    def _lock(self, key: Key) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def load(self) -> None:
        try:
            text = read_text(self.path)
            data = json.loads(text) if text else {}
        except (ValueError, StateError) as err:
            log.error("%s unreadable, starting without pending attachments: %s", self.path, err)
            return
        for item in data.get("attachments", []) if isinstance(data, dict) else []:
            try:
                waiting = Waiting.from_json(item)
            except (KeyError, TypeError, ValueError) as err:
                log.error("%s: a pending attachment is unreadable, dropped: %s", self.path, err)
                continue
            self.waiting[waiting.key] = waiting

    async def _save(self) -> None:
        text = json.dumps(
            {"version": 1, "attachments": [w.to_json() for w in self.waiting.values()]},
            indent=1,
        )

        def write() -> None:
            private_dir(Path(self.registry.root))
            atomic_write(self.path, text)

        await self._writer.run(write)

    async def keep(self, waiting: Waiting) -> None:
        async with self._lock(waiting.key):
            self.waiting[waiting.key] = waiting
            await self._save()
        self._changed.set()

    async def drop(self, key: Key) -> bool:
        """Forget a pending or failed attachment (a plug under way finishes first)."""
        async with self._lock(key):
            if self.waiting.pop(key, None) is None:
                return False
            await self._save()
        return True

    def views(self) -> list[dict[str, Any]]:
        return [w.view() for w in self.waiting.values()]

    async def registered(self, handle: VmHandle) -> list[dict[str, Any]]:
        """A runtime registered ``handle`` (its id the sandbox's container id): plug what
        waits for it now if QEMU is there; else it waits on the registered socket."""
        mine = [
            w
            for w in self.waiting.values()
            if w.status is Deferred.PENDING
            and (w.container_id == handle.id or (w.qmp and _same_vm(w.qmp, handle.qmp)))
        ]
        for waiting in mine:
            if waiting.qmp != handle.qmp:
                async with self._lock(waiting.key):
                    if self.waiting.get(waiting.key) == waiting:
                        self.waiting[waiting.key] = attrs.evolve(waiting, qmp=handle.qmp)
                        await self._save()
        self._changed.set()
        if not mine or not await self.vms.present(handle.qmp):
            return [self.waiting[w.key].view() for w in mine if w.key in self.waiting]
        return [await self._plug(w.key, handle.qmp) for w in mine]

    async def _plug(self, key: Key, qmp: str) -> dict[str, Any]:
        async with self._lock(key):
            waiting = self.waiting.get(key)
            if waiting is None or waiting.status is not Deferred.PENDING:
                return {**(waiting.view() if waiting else {}), "key": list(key)}
            try:
                req = waiting.request(self.vms)
                with fields(container_id=waiting.container_id):
                    if not await self._left_plugged(req):
                        await plug(
                            req,
                            qmp,
                            mac=waiting.mac,
                            got=waiting.got,
                            endpoint_id=waiting.endpoint_id,
                        )
            except Exception as err:
                cni = to_cni_error(err)
                failed = attrs.evolve(
                    waiting, status=Deferred.FAILED, error=f"code {cni.code}: {cni.msg}"
                )
                self.waiting[key] = failed
                await self._save()
                log.error(
                    "the pending %s of container %s could not be plugged into %s: %s",
                    waiting.ifname,
                    waiting.container_id,
                    qmp,
                    failed.error,
                )
                return failed.view()
            del self.waiting[key]
            await self._save()
            self._follow()
        log.info(
            "the pending %s of container %s is plugged into %s",
            waiting.ifname,
            waiting.container_id,
            qmp,
        )
        return {**waiting.view(), "qmp": qmp, "status": "plugged"}

    async def _left_plugged(self, req: Request) -> bool:
        """A plug of this attachment the service was killed in: its record is there.

        The VM's journal settles what the plug did; if the NIC ended up plugged the attachment
        is done, else the record of the undone plug is dropped and the plug runs again.
        """
        book = Book(req.state_dir)
        if not book.path.exists():
            return False
        async with book.locked():
            records = book.load()
            found = records.find(req.key)
            if found is None:
                return False
            state = await self.vms.state(req.state_dir, found.qmp_socket, req.conf.config())
            await state.recover()
            if any(
                e.endpoint.hardware_addr == found.mac and e.status is Status.PLUGGED
                for e in state.store.load().entries
            ):
                log.info("%s of %s was plugged before a restart", found.ifname, found.container_id)
                return True
            log.info("dropping the record of an interrupted plug of %s", found.ifname)
            await book.save(records.without(found))
            return False

    # --- sockets that appear ---------------------------------------------------------------

    def start(self) -> None:
        self._looker = asyncio.create_task(self._look(), name="pending sockets")

    async def close(self) -> None:
        looker, self._looker = self._looker, None
        if looker is not None:
            looker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await looker

    def _sockets(self) -> set[str]:
        return {w.qmp for w in self.waiting.values() if w.qmp and w.status is Deferred.PENDING}

    async def _look(self) -> None:
        """Plug pending attachments whose socket appeared: inotify on the nearest existing
        directory of each socket, a look every :data:`LOOK_EVERY` seconds besides (alone,
        when inotify cannot be had: out of instances, say)."""
        from asyncinotify import Inotify, Mask

        mask = Mask.CREATE | Mask.MOVED_TO | Mask.ATTRIB | Mask.DELETE_SELF | Mask.MOVE_SELF
        watched: dict[str, Any] = {}
        try:
            inotify: Inotify | None = Inotify()
        except OSError as err:
            log.warning("no inotify (%s): pending sockets are looked at every %gs", err, LOOK_EVERY)
            inotify = None
        event: asyncio.Future[Any] | None = None
        try:
            while True:
                self._changed.clear()
                sockets = self._sockets()
                if inotify is not None:
                    self._arm(inotify, mask, watched, {_nearest_dir(s) for s in sockets})
                for qmp in sockets:
                    if await self.vms.present(qmp):
                        await self._socket_appeared(qmp)
                waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(self._changed.wait())}
                if inotify is not None:
                    if event is None or event.done():
                        event = asyncio.ensure_future(inotify.get())
                    waits.add(event)
                await asyncio.wait(waits, timeout=LOOK_EVERY, return_when="FIRST_COMPLETED")
                for waiting in waits - {event}:
                    waiting.cancel()
                if event is not None and event.done() and event.exception() is None:
                    # a removed directory's watch is gone with it: arm anew next round
                    gone = event.result()
                    if gone.mask & (Mask.IGNORED | Mask.DELETE_SELF | Mask.MOVE_SELF):
                        for name, watch in list(watched.items()):
                            if watch is gone.watch:
                                del watched[name]
        finally:
            if event is not None:
                event.cancel()
            if inotify is not None:
                inotify.close()

    @staticmethod
    def _arm(inotify: Any, mask: Any, watched: dict[str, Any], wanted: set[str]) -> None:
        for gone in set(watched) - wanted:
            with contextlib.suppress(OSError, ValueError):
                inotify.rm_watch(watched.pop(gone))
        for directory in wanted - set(watched):
            try:
                watched[directory] = inotify.add_watch(directory, mask)
            except OSError as err:
                log.warning("cannot watch %s: %s", directory, err)

    async def _socket_appeared(self, qmp: str) -> None:
        keys = [
            w.key
            for w in self.waiting.values()
            if w.status is Deferred.PENDING and w.qmp and _same_vm(w.qmp, qmp)
        ]
        if keys:
            log.info("%s appeared: plugging %d pending attachment(s)", qmp, len(keys))
        for key in keys:
            try:
                await self._plug(key, qmp)
            except Exception:
                log.exception("plugging a pending attachment into %s failed", qmp)


def _same_vm(a: str, b: str) -> bool:
    return layout.vm_key(a) == layout.vm_key(b)


def _nearest_dir(path: str) -> str:
    """The deepest directory on the way to ``path`` that exists now."""
    directory = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(directory):
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return directory
