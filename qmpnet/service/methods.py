"""The service's methods: each request's params checked at the boundary, then the front door.

Params are checked exactly as the CLI checks its input (the same parsers and the same typed
errors, naming the field and the value); any key a method does not know is refused. A group
member's request is checked against :mod:`.auth`'s rules before anything is connected to.
Every operation runs in a task of its own, so a client that disconnects mid-request does not
cancel it: the plug completes (or rolls back) and is recorded either way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable, Coroutine
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import attrs

from qmpnet.bandwidth import Bandwidth, from_options
from qmpnet.boundary import load_json, load_toml
from qmpnet.config import Config, with_options
from qmpnet.endpoints.netpair import pair_model
from qmpnet.errors import DeniedError, InvalidInputError, QmpnetError
from qmpnet.model import (
    InterfaceDescription,
    InterworkingModel,
    LinkState,
    check_ifname,
    check_mac,
    with_bandwidth,
)
from qmpnet.netns import check_sandbox_netns
from qmpnet.network import interface_of
from qmpnet.qmp import check_socket_path, vm_identity
from qmpnet.service import protocol
from qmpnet.service.auth import Peer, Role, netns_allowed, qemu_serves
from qmpnet.service.cni import CniHost
from qmpnet.service.registry import Registry, VmHandle
from qmpnet.service.watches import Watches
from qmpnet.store import Status
from qmpnet.views import entry_document, interface_rows, list_document, stats_document

log = logging.getLogger(__name__)

#: recent failed requests kept for ``status``
RECENT_ERRORS = 20


def package_version() -> str:
    try:
        return version("qmpnet")
    except PackageNotFoundError:
        return "unknown"


@attrs.frozen
class Caller:
    peer: Peer
    role: Role

    @property
    def root(self) -> bool:
        return self.role is Role.ROOT


class Params:
    """A request's params, read once each, typed; leftovers are refused."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self._raw = dict(raw)
        self._raw.pop("protocol", None)

    def _take(self, name: str, kinds: tuple[type, ...], what: str, default: Any) -> Any:
        if name not in self._raw:
            return default
        value = self._raw.pop(name)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in kinds:
            raise InvalidInputError(name, value, f"must be {what}")
        if not isinstance(value, kinds):
            raise InvalidInputError(name, value, f"must be {what}")
        return value

    def has(self, name: str) -> bool:
        return self._raw.get(name) is not None

    def text(self, name: str, default: str = "") -> str:
        return str(self._take(name, (str,), "a string", default))

    def flag(self, name: str) -> bool:
        return bool(self._take(name, (bool,), "true or false", False))

    def number(self, name: str) -> float | None:
        value = self._take(name, (int, float), "a number", None)
        return None if value is None else float(value)

    def count(self, name: str) -> int | None:
        value = self._take(name, (int,), "an integer", None)
        return None if value is None else int(value)

    def table(self, name: str) -> dict[str, Any]:
        return dict(self._take(name, (dict,), "an object", {}))

    def strings(self, name: str) -> list[str]:
        value = list(self._take(name, (list,), "a list of strings", []))
        if not all(isinstance(v, str) for v in value):
            raise InvalidInputError(name, "…", "must be a list of strings")
        return value

    def done(self) -> None:
        if self._raw:
            name = sorted(self._raw)[0]
            raise InvalidInputError("param", name, "not a parameter of this method")


@attrs.define(eq=False)
class Service:
    """Every method, over the registry and the watches."""

    registry: Registry
    socket_path: str
    started: float = attrs.field(factory=time.time)
    watches: Watches = attrs.field(factory=Watches)
    errors: collections.deque[dict[str, Any]] = attrs.field(
        factory=lambda: collections.deque(maxlen=RECENT_ERRORS)
    )
    #: requests in flight, finished (or undone) before the service stops
    inflight: set[asyncio.Task[Any]] = attrs.field(factory=set)
    #: qmpnet-cni's invocations and the attachments waiting for their VM
    cni: CniHost = attrs.field(
        default=attrs.Factory(lambda s: CniHost(s.registry), takes_self=True)
    )

    def table(self) -> dict[str, Callable[[Params, Caller], Coroutine[Any, Any, Any]]]:
        return {
            "version": self.version,
            "status": self.status,
            "vm.register": self.vm_register,
            "vm.unregister": self.vm_unregister,
            "vm.list": self.vm_list,
            "iface.add": self.iface_add,
            "iface.remove": self.iface_remove,
            "iface.set_link": self.iface_set_link,
            "iface.set_mtu": self.iface_set_mtu,
            "iface.set_bandwidth": self.iface_set_bandwidth,
            "iface.list": self.iface_list,
            "iface.stats": self.iface_stats,
            "reconcile": self.reconcile,
            "watch.start": self.watch_start,
            "watch.stop": self.watch_stop,
            "watch.list": self.watch_list,
            "cni.exec": self.cni_exec,
        }

    def record_error(self, method: str, params: dict[str, Any], err: BaseException) -> None:
        self.errors.append(
            {
                "time": round(time.time(), 3),
                "method": method,
                "vm": str(params.get("vm") or params.get("qmp") or ""),
                "error": type(err).__name__,
                "message": str(err),
            }
        )

    # --- VMs -------------------------------------------------------------------------------

    async def _vm(self, p: Params, caller: Caller) -> VmHandle:
        """The VM a request names (``vm`` id or ``qmp`` socket), known on first use."""
        vm_id, qmp, state = p.text("vm"), p.text("qmp"), p.text("state")
        if state and not caller.root:
            raise DeniedError("state", "only root may name a state directory")
        if vm_id:
            handle = self.registry.get(vm_id)
            if handle is None:
                raise InvalidInputError("vm", vm_id, "no such VM is registered")
        elif qmp:
            handle = self.registry.by_socket(qmp)
            if handle is None:
                check_socket_path(qmp)
                if not caller.root and not qemu_serves(vm_identity(qmp), caller.peer.uid):
                    raise DeniedError(
                        qmp, "a group member may act only on VMs root registered or QEMU serves"
                    )
                handle = self.registry.add(qmp, by_root=caller.root)
                await self.registry.save()
        else:
            raise InvalidInputError("vm", "", "name the VM: give vm (its id) or qmp (its socket)")
        if state and not _same_path(state, str(handle.state.store.dir)):
            raise InvalidInputError(
                "state", state, f"the service keeps this VM's state in {handle.state.store.dir}"
            )
        if (
            not caller.root
            and not handle.by_root
            and not qemu_serves(vm_identity(handle.qmp), caller.peer.uid)
        ):
            raise DeniedError(
                handle.id, "a group member may act only on VMs root registered or QEMU serves"
            )
        await handle.ensure_session()
        handle.follow_links()
        return handle

    def _netns(self, path: str, handle: VmHandle, caller: Caller) -> str:
        if path and not caller.root and not netns_allowed(path, frozenset({handle.sandbox} - {""})):
            raise DeniedError(
                path, "a group member may name only netns under /run/netns or the VM's sandbox"
            )
        return path

    def _config(self, p: Params) -> Config:
        text = p.text("config")
        source = p.text("config_source", "config")
        base = self.registry.config
        if text:
            base = Config.from_mapping(load_toml(text.encode(), "config file", source))
        timeouts = p.table("timeouts")
        model = p.text("model")
        queues = p.count("queues")
        rounds = p.count("announce_rounds")
        return with_options(
            base,
            model=model or None,
            no_vhost=p.flag("no_vhost"),
            queues=queues,
            timeouts={str(k): v for k, v in timeouts.items()},
            no_announce=p.flag("no_announce"),
            announce_rounds=rounds or None,
        )

    async def vm_register(self, p: Params, caller: Caller) -> Any:
        if not caller.root:
            raise DeniedError("vm.register", "only root registers VMs")
        vm_id, qmp, sandbox = p.text("id"), p.text("qmp"), p.text("sandbox")
        p.done()
        if not qmp:
            raise InvalidInputError("qmp", qmp, "give the VM's QMP socket")
        if vm_id and (len(vm_id) > 256 or not vm_id.isprintable() or "/" in vm_id):
            raise InvalidInputError("id", vm_id, "must be printable, without '/', at most 256")
        if sandbox:
            from qmpnet.netns import check_netns

            check_netns(sandbox)
        handle = self.registry.add(qmp, vm_id=vm_id, by_root=True, sandbox=sandbox)
        await self.registry.save()
        await handle.ensure_session()
        attachments = await self.cni.registered(handle)
        return {**handle.view(), "attachments": attachments}

    async def vm_unregister(self, p: Params, caller: Caller) -> Any:
        if not caller.root:
            raise DeniedError("vm.unregister", "only root unregisters VMs")
        vm_id = p.text("id")
        p.done()
        self.watches.stop_vm(vm_id)
        handle = await self.registry.remove(vm_id)
        return handle.view()

    async def vm_list(self, p: Params, caller: Caller) -> Any:
        p.done()
        return {"vms": [h.view() for h in self.registry.handles()]}

    # --- interfaces ------------------------------------------------------------------------

    async def iface_add(self, p: Params, caller: Caller) -> Any:
        raw, source = p.text("interface"), p.text("source", "-")
        netns, tap_name = p.text("netns"), p.text("tap_name")
        wait_guest, foreign = p.flag("wait_guest"), p.flag("allow_foreign_link")
        link = LinkState.parse(p.text("link", "up"))
        shaped, trust = _bandwidth(p), p.flag("trust_rx_filters")
        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        desc = InterfaceDescription.from_json(load_json(raw.encode(), "interface file", source))
        desc = with_bandwidth(desc, shaped)
        if tap_name:
            check_ifname("--tap-name", tap_name)
        self._netns(netns, handle, caller)
        endpoint = await handle.for_request(config).add_interface(
            desc,
            netns_path=netns,
            tap_name=tap_name or None,
            wait_guest=wait_guest,
            allow_foreign_link=foreign,
            link=link,
            trust_rx_filters=trust,
        )
        handle.follow_links()
        return interface_of(endpoint).to_json()

    async def iface_remove(self, p: Params, caller: Caller) -> Any:
        has_mac = p.has("mac")
        mac, raw, source = p.text("mac"), p.text("interface"), p.text("source", "-")
        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        if has_mac:
            mac = check_mac("--mac", mac)
        elif raw:
            doc = load_json(raw.encode(), "interface file", source)
            mac = InterfaceDescription.from_json(doc).hw_addr
            if not mac:
                raise InvalidInputError("hwAddr", "", "the interface JSON must name the MAC")
        else:
            raise InvalidInputError("mac", "", "give mac or interface")
        endpoint = await handle.for_request(config).remove_interface(mac)
        handle.vanished.pop(endpoint.host_link, None)
        handle.follow_links()
        return interface_of(endpoint).to_json()

    async def iface_set_link(self, p: Params, caller: Caller) -> Any:
        mac, link = p.text("mac"), LinkState.parse(p.text("link"))
        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        entry = await handle.for_request(config).set_link(check_mac("--mac", mac), link)
        return {"interface": entry_document(entry, handle.vanished)}

    async def iface_set_mtu(self, p: Params, caller: Caller) -> Any:
        mac, mtu = p.text("mac"), p.count("mtu")
        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        entry = await handle.for_request(config).set_mtu(check_mac("--mac", mac), mtu or 0)
        return {"interface": entry_document(entry, handle.vanished)}

    async def iface_set_bandwidth(self, p: Params, caller: Caller) -> Any:
        mac, want, clear = p.text("mac"), _bandwidth(p), p.flag("clear")
        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        if (want is None) != clear:
            raise InvalidInputError("clear", clear, "give clear, or bandwidth or inbound/outbound")
        entry = await handle.for_request(config).set_bandwidth(check_mac("--mac", mac), want)
        return {"interface": entry_document(entry, handle.vanished)}

    async def iface_stats(self, p: Params, caller: Caller) -> Any:
        has_mac, mac = p.has("mac"), p.text("mac")
        self._config(p)  # checked as every request's, though reading needs none of it
        handle = await self._vm(p, caller)
        p.done()
        stats = await handle.state.stats(mac if has_mac else None)
        return stats_document(stats, handle.vanished)

    async def iface_list(self, p: Params, caller: Caller) -> Any:
        handle = await self._vm(p, caller)
        p.done()
        entries = await handle.state.list_interfaces()
        unknown = handle.state.store.load().unknown
        return {
            **list_document(entries, unknown, handle.vanished),
            "rows": interface_rows(entries, handle.vanished),
            "notes": [f"unreadable entry kept as is: {u.reason}" for u in unknown],
        }

    async def reconcile(self, p: Params, caller: Caller) -> Any:
        from qmpnet.reconcile import reconcile

        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        state = handle.for_request(config)
        report = await reconcile(state)
        if report.ok and not report.qemu_running:
            snap = state.store.load()
            if not (snap.entries or snap.unknown or state.store.journal()):
                await state.store.remove_all()
        return {"report": report.to_json(), "lines": report.lines(), "ok": report.ok}

    # --- watches ---------------------------------------------------------------------------

    async def watch_start(self, p: Params, caller: Caller) -> Any:
        netns, model = p.text("netns"), p.text("watch_model")
        debounce = p.number("debounce")
        unplug_on_exit = p.flag("unplug_on_exit")
        config = self._config(p)
        handle = await self._vm(p, caller)
        p.done()
        self._netns(netns, handle, caller)
        parsed = InterworkingModel.parse(model) if model else None
        # what watch() refuses, refused here, before the watch's task is made
        pair_model((parsed or config.internetworking_model).resolved())
        if not netns:
            raise InvalidInputError("netns", netns, "give the netns to follow")
        check_sandbox_netns(netns)
        return self.watches.start(
            handle,
            handle.for_request(config),
            netns,
            model=parsed,
            debounce=0.5 if debounce is None else debounce,
            unplug_on_exit=unplug_on_exit,
            started_by=caller.peer.uid,
        ).view()

    async def watch_stop(self, p: Params, caller: Caller) -> Any:
        ident = p.text("id")
        p.done()
        watch = self.watches.get(ident)
        if watch is None:
            raise InvalidInputError("id", ident, "no such watch")
        if not caller.root and watch.started_by != caller.peer.uid:
            raise DeniedError(ident, "a group member may stop only its own watches")
        await self.watches.stop(ident)
        return watch.view()

    async def watch_list(self, p: Params, caller: Caller) -> Any:
        p.done()
        return {"watches": [w.view() for w in self.watches.all()]}

    # --- CNI -------------------------------------------------------------------------------

    async def cni_exec(self, p: Params, caller: Caller) -> Any:
        """One ``qmpnet-cni`` invocation forwarded by the plugin's thin process: its
        ``environ`` (the ``CNI_*`` variables) and ``stdin``; the answer is the plugin's
        exit status and stdout (and its debug lines, if asked for)."""
        if not caller.root:
            raise DeniedError("cni.exec", "only root runs CNI plugins")
        environ, stdin = p.table("environ"), p.text("stdin")
        p.done()
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in environ.items()):
            raise InvalidInputError("environ", "…", "must map names to strings")
        return await self.cni.execute(environ, stdin.encode())

    # --- about the service -----------------------------------------------------------------

    async def version(self, p: Params, caller: Caller) -> Any:
        return {
            "version": package_version(),
            "protocol": protocol.PROTOCOL_VERSION,
            "methods": list(protocol.METHODS),
        }

    def pending_unplugs(self) -> list[dict[str, Any]]:
        """Every NIC left unplug-pending (``vm``, ``mac``, ``name``), and each VM whose state
        could not be read (``vm``, ``error``)."""
        pending: list[dict[str, Any]] = []
        for handle in self.registry.handles():
            try:
                entries = handle.state.store.load().entries
            except QmpnetError as err:
                pending.append({"vm": handle.id, "error": str(err)})
                continue
            pending.extend(
                {"vm": handle.id, "mac": e.endpoint.hardware_addr, "name": e.endpoint.name}
                for e in entries
                if e.status is Status.UNPLUG_PENDING
            )
        return pending

    async def status(self, p: Params, caller: Caller) -> Any:
        p.done()
        pending = self.pending_unplugs()
        return {
            "version": package_version(),
            "protocol": protocol.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "socket": self.socket_path,
            "state_root": self.registry.root,
            "vms": [h.view() for h in self.registry.handles()],
            "pending_unplugs": pending,
            "pending_attachments": self.cni.views(),
            "watches": [w.view() for w in self.watches.all()],
            # besides this status request itself
            "requests_in_flight": len(self.inflight - {asyncio.current_task()}),
            "recent_errors": list(self.errors),
        }


def _bandwidth(p: Params) -> Bandwidth | None:
    """The command line's bandwidth options, as its direct mode reads them."""
    return from_options(p.text("bandwidth"), p.text("inbound"), p.text("outbound"))


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)
