"""The network of one VM: add, remove and list its interfaces, with state that survives.

``NetworkState`` is the library's front door. Each operation takes the VM's lock (tasks and
processes alike), settles what an interrupted operation left (:mod:`qmpnet.recovery`), writes
its plan to the journal once, before its first step that changes anything, runs the
endpoint's hot-plug or unplug, and persists the result (the commit point). A failure anywhere
undoes every earlier step; a crash leaves a journal entry that the next operation (or
``qmpnet reconcile``) finishes or rolls back. File writes run on a thread, never on the
event loop, and always to their end.

The QMP monitor serves one client at a time, so by default a session is opened per
operation, under the lock, and closed after; :meth:`NetworkState.connect` keeps one open for a
long-lived caller instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import attrs

from qmpnet import layout
from qmpnet.bandwidth import Bandwidth
from qmpnet.config import Config
from qmpnet.endpoints import (
    Endpoint,
    PlugContext,
    create_endpoint,
    net_info_from_interface,
    shaping,
)
from qmpnet.endpoints.netpair import pair_model as pair_model_of
from qmpnet.errors import (
    HostError,
    InvalidInputError,
    MonitorHeldError,
    PlugError,
    QmpnetError,
    StateError,
    UnplugRefusedError,
    UnsupportedError,
)
from qmpnet.hypervisor import QemuHypervisor, device_id
from qmpnet.lifecycle import Observer, Operation, OpKind, Phase, Step
from qmpnet.links import LinkCounters, Links
from qmpnet.logs import fields
from qmpnet.model import (
    InterfaceDescription,
    InterworkingModel,
    LinkState,
    TapInterface,
    VmIdentity,
    check_ifname,
    check_mac,
    check_queues,
    check_tap_mtu,
)
from qmpnet.netns import check_netns
from qmpnet.qmp import NIC_RX_FILTER_CHANGED, QmpSession, vm_identity
from qmpnet.recovery import ReconcileReport, Settler, recover_journal
from qmpnet.store import Entry, Snapshot, Status, Store

log = logging.getLogger(__name__)


class NoSuchInterfaceError(InvalidInputError):
    """No interface of the VM has the given MAC."""


@attrs.frozen
class NicStats:
    """One NIC and its host link's counters as read now; None when that link cannot be
    reached (deleted, or its netns gone from every path)."""

    entry: Entry
    counters: LinkCounters | None


def host_link(endpoint: Endpoint) -> str:
    """The host link QEMU reads for ``endpoint`` (its tap or macvtap), or ``""``."""
    return endpoint.host_link


def interface_of(endpoint: Endpoint) -> InterfaceDescription:
    """The agent-style description of a plugged endpoint, with its guest PCI path."""
    info = endpoint.properties
    return InterfaceDescription(
        device=endpoint.name,
        name=endpoint.name,
        ip_addresses=info.addrs if info else (),
        mtu=info.iface.mtu if info else 1500,
        hw_addr=endpoint.hardware_addr,
        pci_path=endpoint.pci_path,
        link_type=info.link_type if info else "",
    )


@attrs.define(eq=False)
class NetworkState:
    """One VM's interfaces, driven through its QMP socket and saved in ``store``."""

    store: Store
    qmp_path: str
    config: Config = attrs.field(factory=Config)
    #: extra lifecycle observers (logging, tests, crash drills).
    observers: list[Observer] = attrs.field(factory=list)
    #: the QEMU the current operation found behind the socket (recorded with its save)
    _vm: VmIdentity | None = None
    _hypervisor: QemuHypervisor | None = None
    #: the state this one shares its kept session with (see :meth:`sharing`)
    _base: NetworkState | None = None
    #: hears NIC_RX_FILTER_CHANGED on the kept session (see :meth:`mirror_rx_filter`)
    _rx_listener: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls,
        state_dir: str | Path,
        qmp_path: str,
        config: Config | None = None,
    ) -> NetworkState:
        return cls(Store(state_dir), qmp_path, config or Config())

    # --- the QMP connection ----------------------------------------------------------------

    async def _session(self) -> QmpSession:
        # qmpnetd holding this monitor would keep a greeting from ever coming: say so at once
        holder = layout.holder(layout.state_root(), self.qmp_path)
        if holder is not None:
            raise MonitorHeldError(self.qmp_path, holder)
        t = self.config.timeouts
        return await QmpSession.connect(
            self.qmp_path, connect_timeout=t.connect, command_timeout=t.command
        )

    def _adapter(self, session: QmpSession) -> QemuHypervisor:
        t = self.config.timeouts
        return QemuHypervisor(session, unplug_timeout=t.unplug, guest_timeout=t.guest_ready)

    async def connect(self) -> None:
        """Keep one QMP session open across operations (a long-lived library caller); while
        it is open, the receive filters of trusted NICs follow their guests."""
        if self._hypervisor is None:
            self._hypervisor = self._adapter(await self._session())
            session = self._hypervisor.qmp
            self._rx_listener = asyncio.create_task(
                self._hear_rx_filters(session), name=f"rx filters {self.qmp_path}"
            )

    async def _hear_rx_filters(self, session: QmpSession) -> None:
        with session.subscribe([NIC_RX_FILTER_CHANGED]) as listener:
            while (event := await session.next_event(listener)) is not None:
                device = (event.get("data") or {}).get("name")
                if not isinstance(device, str):
                    continue
                try:
                    await self.mirror_rx_filter(device)
                except QmpnetError as err:
                    log.warning("receive filter of %s not mirrored: %s", device, err)

    @property
    def session(self) -> QmpSession | None:
        """The kept QMP session (see :meth:`connect`), if one is open."""
        kept = self._kept()
        return kept.qmp if kept is not None else None

    def _kept(self) -> QemuHypervisor | None:
        """The kept session's adapter: this state's own, or the one it shares (reopened
        sessions included: a sharer follows its base)."""
        if self._base is not None:
            return self._base._kept()
        return self._hypervisor

    def sharing(self, config: Config) -> NetworkState:
        """This VM with other settings, sharing its store (and so its lock) and kept session.

        A service serves many requests of one VM, each with its own settings, through one
        session; the store's lock still orders their operations.
        """
        base = self._base or self
        return NetworkState(self.store, self.qmp_path, config, list(self.observers), base=base)

    async def close(self) -> None:
        if self._rx_listener is not None:
            self._rx_listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rx_listener
            self._rx_listener = None
        if self._hypervisor is not None:
            await self._hypervisor.qmp.close()
            self._hypervisor = None

    @contextlib.asynccontextmanager
    async def hypervisor(self) -> AsyncIterator[QemuHypervisor]:
        kept = self._kept()
        if kept is not None:
            # a sharer's own deadlines (a service request's --timeout-unplug) over the
            # base's session
            t = self.config.timeouts
            yield kept if self._base is None else kept.with_timeouts(t.unplug, t.guest_ready)
            return
        async with await self._session() as session:
            yield self._adapter(session)

    # --- journal ---------------------------------------------------------------------------

    def _journal(self, started: float) -> Observer:
        """Write the operation's one durable record before its first host-visible step.

        The record is the plan: the endpoint names every object the operation creates or
        removes (tap, fd names, netdev and device ids derive from it), so recovery checks
        each against the host and QEMU and needs no record of the steps that followed.
        """
        written = False

        async def observe(op: Operation, step: Step, phase: Phase) -> None:
            nonlocal written
            if written or phase is not Phase.BEGIN or not step.changes_things:
                return
            if op.subject is not None:
                await self.store.journal_begin(
                    op.subject.id, op.kind, step.value, op.subject, started
                )
                written = True

        return observe

    def _operation(self, kind: OpKind, endpoint: Endpoint) -> Operation:
        return Operation(
            kind,
            endpoint.name,
            subject=endpoint,
            observers=[self._journal(time.time()), *self.observers],
        )

    async def _recover(self) -> None:
        """Finish or roll back what an interrupted operation left (caller holds the lock)."""
        if self.store.journal():
            await recover_journal(self)

    async def recover(self) -> ReconcileReport | None:
        """Take the lock and settle the journal; ``None`` when nothing was in flight.

        Without a journal nothing is taken or created (not even the state directory).
        """
        if not self.store.journal():
            return None
        async with self.store.locked():
            if not self.store.journal():
                return None
            return await recover_journal(self)

    # --- operations ------------------------------------------------------------------------

    def _vm_now(self) -> VmIdentity | None:
        """The QEMU serving the socket now: a kept session asks its own connection."""
        kept = self._kept()
        if kept is not None:
            return kept.qmp.peer()
        return vm_identity(self.qmp_path) if self.qmp_path else None

    async def settle_vm_change(self) -> ReconcileReport | None:
        """If another QEMU serves the socket than the one the state belongs to, the old VM
        is gone: drop its endpoints (their host side cleaned, as for a QEMU that is gone)
        and adopt the new one. The caller holds the lock; ``None`` when nothing changed.

        The identity (the serving process's pid and start time) is read without a QMP
        greeting, so a monitor busy with another client answers too. A state with no
        identity yet (an older release) adopts the current VM as its own. Nothing is written
        here unless the old VM's endpoints are dropped: the identity goes into the state with
        the operation's own save, so an operation that fails leaves the file as it was.
        """
        now = self._vm_now()
        self._vm = now
        snap = self.store.load()
        if now is None or snap.vm is None or snap.vm == now:
            return None
        if not (snap.entries or self.store.journal()):
            return None
        job = Settler(self, None)
        await job.drop_all(f"QEMU {snap.vm} on {self.qmp_path} was replaced by {now}")
        await self.store.save(attrs.evolve(self.store.load(), vm=now))
        return job.report()

    async def list_interfaces(self) -> list[Entry]:
        """The saved interfaces; those of a VM another QEMU has replaced are ``vm-gone``."""
        snap = self.store.load()
        now = self._vm_now() if snap.vm is not None else None
        if now is not None and now != snap.vm:
            return [attrs.evolve(e, status=Status.VM_GONE) for e in snap.entries]
        return list(snap.entries)

    async def add_interface(
        self,
        desc: InterfaceDescription,
        *,
        model: InterworkingModel | None = None,
        netns_path: str = "",
        queues: int = 0,
        tap_name: str | None = None,
        wait_guest: bool = False,
        allow_foreign_link: bool = False,
        endpoint_id: str = "",
        link: LinkState = LinkState.UP,
        trust_rx_filters: bool = False,
    ) -> Endpoint:
        """Hot-plug the described interface; returns the plugged endpoint. All or nothing.

        A NetPair refuses a sandbox link of qmpnet's own (the host's) namespace or a port of
        a bridge or bond, unless ``allow_foreign_link``; whatever it changes on that link is
        given back on unplug. Log records within carry the VM and MAC. ``endpoint_id`` (the
        form :func:`~qmpnet.endpoints.base.new_id` makes) is for a caller that answered
        before the plug: a pending CNI ADD reported the parked MAC the id derives. ``link``
        is the NIC's link as the guest first sees it (see :meth:`set_link`).
        ``trust_rx_filters`` (the macvtap model, with a kept session: something must hear
        the guest) mirrors the guest's receive filter onto the macvtap, now and whenever
        QEMU says it changed (see :meth:`mirror_rx_filter`).
        """
        with fields(vm=self.qmp_path, mac=desc.hw_addr):
            return await self._add_interface(
                desc,
                model=model,
                netns_path=netns_path,
                queues=queues,
                tap_name=tap_name,
                wait_guest=wait_guest,
                allow_foreign_link=allow_foreign_link,
                endpoint_id=endpoint_id,
                link=LinkState.parse(link),
                trust_rx_filters=trust_rx_filters,
            )

    async def _add_interface(
        self,
        desc: InterfaceDescription,
        *,
        model: InterworkingModel | None,
        netns_path: str,
        queues: int,
        tap_name: str | None,
        wait_guest: bool,
        allow_foreign_link: bool,
        endpoint_id: str,
        link: LinkState,
        trust_rx_filters: bool = False,
    ) -> Endpoint:
        model = model or self.config.internetworking_model
        if trust_rx_filters:
            self._check_trust(model)
        if queues:
            check_queues("queues", queues)
        if tap_name is not None:
            check_ifname("tap name", tap_name)
        if netns_path:
            check_netns(netns_path)
        async with self.store.locked():
            await self.settle_vm_change()
            await self._recover()
            snap = self.store.load()
            if desc.hw_addr and any(e.endpoint.hardware_addr == desc.hw_addr for e in snap.entries):
                raise InvalidInputError(
                    "hwAddr", desc.hw_addr, "the VM already has an interface with this MAC"
                )
            if endpoint_id and any(e.endpoint.id == endpoint_id for e in snap.entries):
                raise InvalidInputError(
                    "endpoint id", endpoint_id, "the VM already has an interface with this id"
                )
            idx = _free_index(snap, self.config.tap_name)
            name = tap_name or self.config.tap_name.format(idx=idx)
            endpoint = create_endpoint(
                net_info_from_interface(desc, model),
                idx,
                model,
                netns_path=netns_path,
                tap_name=name,
                queues=queues,
                endpoint_id=endpoint_id,
            )
            async with self.hypervisor() as hv:
                if endpoint.hardware_addr:
                    # another state directory (or someone else) may have plugged it already
                    holder = await hv.nic_with_mac(endpoint.hardware_addr)
                    if holder:
                        raise InvalidInputError(
                            "hwAddr",
                            endpoint.hardware_addr,
                            f"QEMU already has NIC {holder} with this MAC",
                        )
                op = self._operation(OpKind.HOT_PLUG, endpoint)
                try:
                    async with op:
                        ctx = PlugContext(
                            hv,
                            self.config,
                            op,
                            wait_guest=wait_guest,
                            allow_foreign_link=allow_foreign_link,
                            link_up=link is LinkState.UP,
                            bandwidth=desc.bandwidth,
                        )
                        plugged = await endpoint.hot_attach(ctx)
                        op.subject = plugged
                        entry = Entry(
                            plugged,
                            link=link,
                            bandwidth=desc.bandwidth or None,
                            trust_rx_filters=trust_rx_filters,
                        )

                        async def persist() -> None:
                            await self._save(attrs.evolve(snap, entries=(*snap.entries, entry)))
                            # The state file is the commit point: a cancellation or a failing
                            # observer after the save must not undo a NIC the state records.
                            op.commit()

                        await op.step(Step.PERSIST, persist)
                finally:
                    # An undo that failed (QEMU gone, guest not releasing the device) keeps
                    # the journal entry: the next operation or a reconcile finishes it.
                    if not op.undo_errors:
                        await self.store.journal_end(endpoint.id)
            if trust_rx_filters:
                await self._mirror(hv, entry)
            return plugged

    def _check_trust(self, model: InterworkingModel) -> None:
        """Trust needs a model whose host link filters by MAC, and a listener for QEMU's
        events: a kept session (the service's, or a library caller's ``connect``)."""
        if not pair_model_of(model).filters_by_mac:
            raise UnsupportedError(
                f"model {model}",
                "trust the guest's receive filter",
                "only the macvtap model's host link filters by MAC",
            )
        if self._kept() is None:
            raise UnsupportedError(
                f"VM {self.qmp_path}",
                "trust the guest's receive filter",
                "it needs a resident listener for QEMU's NIC_RX_FILTER_CHANGED: plug it "
                "through qmpnetd, or from a kept library session (NetworkState.connect)",
            )

    async def mirror_rx_filter(self, device: str) -> Entry | None:
        """Mirror the receive filter of the trusted NIC with QEMU device id ``device`` onto
        its host link (NIC_RX_FILTER_CHANGED says it changed; QEMU sends it once until the
        filter is read, which this does); None when no trusted NIC of this VM has it."""
        # under the VM's lock: its holder alone proves the macvtap is ours (its mark)
        async with self.store.locked():
            for entry in self.store.load().entries:
                tap = entry.endpoint.tap
                plugged = entry.status is Status.PLUGGED
                if entry.trust_rx_filters and plugged and tap and device_id(tap) == device:
                    async with self.hypervisor() as hv:
                        await self._mirror(hv, entry)
                    return entry
        return None

    async def _mirror(self, hv: QemuHypervisor, entry: Entry) -> None:
        tap = _tap_of(entry.endpoint)
        rx = await hv.rx_filter(tap)
        await entry.endpoint.mirror_rx_filter(rx)
        log.info(
            "receive filter of %s mirrored: mac %s, promiscuous %s, multicast %s %s",
            device_id(tap),
            rx.main_mac,
            rx.promiscuous,
            rx.multicast,
            ",".join(rx.multicast_table),
        )

    async def _save(self, snap: Snapshot) -> None:
        """Save, recording the VM the operation found (see :meth:`settle_vm_change`) and the
        socket it was reached on."""
        qmp = _absolute(self.qmp_path) if self.qmp_path else snap.qmp
        snap = attrs.evolve(snap, vm=self._vm or snap.vm, qmp=qmp)
        await self.store.save(snap)

    async def remove_interface(self, hw_addr: str) -> Endpoint:
        """Unplug the interface with MAC ``hw_addr`` and forget it (see :meth:`_remove_interface`);
        log records within carry the VM and MAC."""
        with fields(vm=self.qmp_path, mac=hw_addr):
            return await self._remove_interface(hw_addr)

    async def _remove_interface(self, hw_addr: str) -> Endpoint:
        """Unplug the interface with MAC ``hw_addr`` and forget it.

        If the guest does not release the device in time, the entry is kept as
        ``unplug-pending`` and :class:`PlugError` (cause :class:`UnplugTimeoutError`) is
        raised; a later call or a reconcile completes it.

        If the guest refuses (cause :class:`UnplugRefusedError`, QEMU's
        DEVICE_UNPLUG_GUEST_ERROR), the entry keeps the status it had, ``plugged`` for a
        plugged NIC: QEMU withdraws a refused request, so the device stays with the guest and
        nothing is pending; ``device_del`` is the first unplug step, so its netdev, fds and
        host links are untouched and the NIC works on. Marking it ``unplug-pending`` would
        claim a request QEMU no longer has (CNI CHECK and the watcher would treat a working
        NIC as going away); a later call asks the guest again.
        """
        mac = check_mac("hwAddr", hw_addr)
        async with self.store.locked():
            await self.settle_vm_change()
            await self._recover()
            snap = self.store.load()
            entry = _with_mac(snap, mac)
            rest = tuple(e for e in snap.entries if e is not entry)
            async with self.hypervisor() as hv:
                op = self._operation(OpKind.UNPLUG, entry.endpoint)
                recorded = True
                try:
                    async with op:
                        ctx = PlugContext(hv, self.config, op)
                        await entry.endpoint.hot_detach(ctx)

                        async def forget() -> None:
                            await self._save(attrs.evolve(snap, entries=rest))
                            op.commit()  # saved: the unplug is done, whatever comes next

                        await op.step(Step.FORGET, forget)
                except BaseException as err:
                    # Also on cancellation: the device_del may be under way in the guest.
                    # Not after a refusal: the guest answered, and the entry stays as it was.
                    reached = (Step.DEVICE_DEL, Phase.BEGIN) in op.history
                    if (
                        reached
                        and not op.committed
                        and entry.status is Status.PLUGGED
                        and not _refused(err)
                    ):
                        # device_del may be under way in the guest: never report it plugged.
                        pending = Entry(entry.endpoint, Status.UNPLUG_PENDING)
                        try:
                            await self._save(attrs.evolve(snap, entries=(*rest, pending)))
                        except StateError:
                            # The journal keeps the unplug, so a reconcile rolls it forward.
                            recorded = False
                    raise
                finally:
                    if recorded:
                        await self.store.journal_end(entry.endpoint.id)
            return entry.endpoint

    async def set_link(self, hw_addr: str, link: LinkState | str) -> Entry:
        """Set a plugged NIC's link up or down (QMP ``set_link``): the guest's carrier follows;
        a link set up is announced (the configuration's ``announce``).

        The state is saved first and given back if QEMU refuses, so a crash in between leaves
        the asked-for state for :func:`~qmpnet.reconcile.reconcile` to apply (QEMU 7.2 has no
        command that reads a NIC's link, so reconcile sets every NIC's link again).
        """
        want = LinkState.parse(link)
        async with self._plugged_entry(hw_addr) as (snap, entry):
            changed = attrs.evolve(entry, link=want)
            if changed != entry:
                await self._save(_replaced(snap, entry, changed))
            try:
                async with self.hypervisor() as hv:
                    tap = _tap_of(entry.endpoint)
                    await hv.set_link(tap, want is LinkState.UP)
                    if want is LinkState.UP and self.config.announce.enabled:
                        await hv.announce(tap, self.config.announce)
            except BaseException:
                if changed != entry:
                    await self._save(snap)
                raise
            return changed

    async def set_mtu(self, hw_addr: str, mtu: int) -> Entry:
        """Give a plugged NIC's host links (qmpnet's: the tap, a bridge) this MTU, live.

        The guest follows on its own (or through its agent) wherever its driver allows: up to
        the ``host_mtu`` the NIC offered at its plug, which is fixed once realized, so more
        than that is refused (a re-plug offers more); a NetPair's links stay within the
        sandbox link's MTU.
        """
        check_tap_mtu("mtu", mtu)
        async with self._plugged_entry(hw_addr) as (snap, entry):
            async with self.hypervisor() as hv:
                offered = await hv.host_mtu(_tap_of(entry.endpoint))
            if offered and mtu > offered:
                raise UnsupportedError(
                    f"NIC {entry.endpoint.name}",
                    "set mtu",
                    f"it was plugged offering its guest MTU {offered} (host_mtu), its "
                    "driver's ceiling while the NIC is plugged: a larger MTU needs a re-plug",
                )
            changed = attrs.evolve(entry, endpoint=await entry.endpoint.set_mtu(mtu))
            try:
                await self._save(_replaced(snap, entry, changed))
            except BaseException:
                # the state still says the old MTU: the links get it back
                await entry.endpoint.set_mtu(entry.endpoint.mtu)
                raise
            return changed

    async def set_bandwidth(self, hw_addr: str, bandwidth: Bandwidth | None) -> Entry:
        """Shape a plugged NIC's traffic as ``bandwidth`` says, live; None (or an empty one)
        takes every limit away. The whole of it is replaced: a direction not given is not
        shaped. All or nothing: when a change or the save fails, the shaping before stays.
        """
        want = bandwidth or None
        async with self._plugged_entry(hw_addr) as (snap, entry):
            sites = entry.endpoint.shaping
            if sites is None:  # never plugged, so never in this VM's plugged entries
                raise UnsupportedError(f"NIC {entry.endpoint.name}", "set bandwidth", "no NIC")
            changed = attrs.evolve(entry, bandwidth=want)
            await shaping.change(sites, entry.bandwidth, want)
            try:
                await self._save(_replaced(snap, entry, changed))
            except BaseException:
                await shaping.change(sites, want, entry.bandwidth)  # as the state says
                raise
            return changed

    async def stats(self, hw_addr: str | None = None) -> list[NicStats]:
        """Every NIC's (or the one with MAC ``hw_addr``) host-link counters, read now.

        Nothing is changed, so no lock is taken: one netlink socket per netns, one request
        per link.
        """
        entries = await self.list_interfaces()
        if hw_addr is not None:
            mac = check_mac("--mac", hw_addr)
            entries = [e for e in entries if e.endpoint.hardware_addr == mac]
            if not entries:
                raise NoSuchInterfaceError("hwAddr", mac, "no interface of this VM has it")
        found: dict[str, LinkCounters | None] = {}
        for netns in dict.fromkeys(e.endpoint.netns_path for e in entries):
            names = [e.endpoint.host_link for e in entries if e.endpoint.netns_path == netns]
            try:
                async with Links.open(netns) as links:
                    for name in filter(None, names):
                        found[f"{netns}/{name}"] = await links.counters(name)
            except HostError as err:
                log.info("counters of the links in %s: %s", netns or "the host netns", err)
        return [
            NicStats(e, found.get(f"{e.endpoint.netns_path}/{e.endpoint.host_link}"))
            for e in entries
        ]

    @contextlib.asynccontextmanager
    async def _plugged_entry(self, hw_addr: str) -> AsyncIterator[tuple[Snapshot, Entry]]:
        """For a live change: under the VM's lock, once any change of VM or interrupted
        operation is settled, the state and its plugged entry with MAC ``hw_addr``."""
        mac = check_mac("hwAddr", hw_addr)
        with fields(vm=self.qmp_path, mac=mac):
            async with self.store.locked():
                await self.settle_vm_change()
                await self._recover()
                snap = self.store.load()
                entry = _with_mac(snap, mac)
                if entry.status is not Status.PLUGGED:
                    raise InvalidInputError("hwAddr", mac, f"the interface is {entry.status}")
                yield snap, entry


def _with_mac(snap: Snapshot, mac: str) -> Entry:
    """The saved interface with this MAC, or the error that says the VM has none."""
    for entry in snap.entries:
        if entry.endpoint.hardware_addr == mac:
            return entry
    raise NoSuchInterfaceError("hwAddr", mac, "no interface of this VM has it")


def _replaced(snap: Snapshot, old: Entry, new: Entry) -> Snapshot:
    return attrs.evolve(snap, entries=tuple(new if e is old else e for e in snap.entries))


def _tap_of(endpoint: Endpoint) -> TapInterface:
    if endpoint.tap is None:  # never plugged, so never in this VM's plugged entries
        raise UnsupportedError(f"{endpoint.type} endpoint {endpoint.name}", "live change", "no NIC")
    return endpoint.tap


def _absolute(path: str) -> str:
    return os.path.abspath(path)  # no system call: the working directory is known


def _refused(err: BaseException) -> bool:
    """The guest refused the device_del: QEMU dropped the request, the device stays whole."""
    return isinstance(err, PlugError) and isinstance(err.cause, UnplugRefusedError)


def _free_index(snap: Snapshot, template: str) -> int:
    """The smallest index whose tap name no saved endpoint of this VM uses."""
    used = {host_link(e.endpoint) for e in snap.entries}
    idx = 0
    while template.format(idx=idx) in used:
        idx += 1
    check_ifname("tap name", template.format(idx=idx))
    return idx
