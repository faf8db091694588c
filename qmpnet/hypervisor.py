"""QEMU as a hypervisor that hot-plugs network devices: it speaks taps, not endpoints.

``QemuHypervisor`` turns a tap (its QEMU ids and the open queue fds) into QMP steps: pass the
queue fds, ``netdev_add``, ``device_add`` on a free hot-pluggable slot; and back with
``device_del`` (bounded wait for DEVICE_DELETED) and ``netdev_del``. Like qemu.qmp's client,
which knows messages and not its callers, it never looks at an endpoint: each endpoint hands it
the tap QEMU reads (``Endpoint.tap``), so no table here can forget a type.

Slots: a free ``pcie-root-port`` on q35 (QEMU's pcie.0 itself is not hot-pluggable), a free
slot of ``pci.0`` or of a ``pci-bridge`` on pc. Choosing a slot and taking it is serialized by
a lock, so two plugs through one session never race for a slot.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs

from qmpnet.config import Announce
from qmpnet.errors import (
    PlugError,
    QmpCommandError,
    QmpDisconnectedError,
    QmpnetError,
    QmpTimeoutError,
    TapGoneError,
    UnsupportedError,
)
from qmpnet.lifecycle import Operation, OpKind, Step
from qmpnet.model import QUEUES_MAX, TapInterface
from qmpnet.qmp import QmpSession
from qmpnet.tuntap import QueueFds, taps_held_by

log = logging.getLogger(__name__)

#: Ethernet's MTU: a NIC plugged with it is offered none (QEMU's and the guest's default)
DEFAULT_MTU = 1500

#: QOM types of the bridges a NIC can be hot-plugged behind.
BRIDGE_TYPES = ("pcie-root-port", "pci-bridge")
#: Device id of Q35's host bridge in query-pci: its root bus is not hot-pluggable.
Q35_HOST_BRIDGE = 0x29C0


def netdev_id(tap: TapInterface) -> str:
    return f"{tap.id}-net"


def device_id(tap: TapInterface) -> str:
    return f"{tap.id}-dev"


def fd_name(tap: TapInterface, kind: str, index: int) -> str:
    return f"{tap.id}-{kind}{index}"


def vectors_for(queues: int) -> int:
    """MSI-X vectors for a multiqueue virtio-net: one per rx and tx queue, config, control."""
    return 2 * queues + 2


@attrs.frozen
class Slot:
    """A free hot-pluggable place: the QEMU bus id, the address on it, the guest PCI path."""

    bus: str
    addr: int
    pci_path: str


@attrs.frozen
class Bridge:
    """A root port or PCI bridge with an id, its slot on bus 0 and the slots used below it."""

    qdev_id: str
    kind: str
    slot: int
    used: frozenset[int]


def free_slots(bridges: list[Bridge], root_used: set[int], root_hotplug: bool) -> list[Slot]:
    """Free hot-pluggable slots: empty root ports first, then pci.0, then pci-bridge slots."""
    ports = [
        Slot(b.qdev_id, 0, f"{b.slot:02x}/00")
        for b in sorted(bridges, key=_by_slot)
        if b.kind == "pcie-root-port" and not b.used
    ]
    # pc: slot 0 is the host bridge, 1 the PIIX3. On q35 pcie.0 cannot hot-plug at all.
    root = [
        Slot("pci.0", s, f"{s:02x}") for s in range(2, 32) if root_hotplug and s not in root_used
    ]
    behind = [
        Slot(b.qdev_id, s, f"{b.slot:02x}/{s:02x}")
        for b in sorted(bridges, key=_by_slot)
        if b.kind == "pci-bridge"
        for s in range(1, 32)
        if s not in b.used
    ]
    return ports + root + behind


def _by_slot(bridge: Bridge) -> int:
    return bridge.slot


@attrs.define(eq=False)
class Topology:
    """The buses read from QEMU once, and the slots this session took since."""

    bridges: list[Bridge]
    root_used: frozenset[int]
    root_hotplug: bool
    #: every bridge's children read from QOM; False when some came from query-pci, whose
    #: view below a bridge follows the bus numbers the guest programmed
    exact: bool = True
    #: device id -> the slot this session plugged it on
    taken: dict[str, Slot] = attrs.field(factory=dict)

    def free(self) -> list[Slot]:
        busy = set(self.taken.values())
        return [
            s
            for s in free_slots(self.bridges, set(self.root_used), self.root_hotplug)
            if s not in busy
        ]

    def first_free(self) -> Slot:
        slots = self.free()
        if not slots:
            raise UnsupportedError(
                "this VM",
                "hot-plug",
                "no free hot-pluggable PCI slot (launch q35 with more pcie-root-port devices)",
            )
        return slots[0]

    def take(self, device: str, slot: Slot) -> None:
        self.taken[device] = slot

    def release(self, device: str) -> bool:
        """Free the slot of a device this session plugged; False for any other device."""
        return self.taken.pop(device, None) is not None


def _slot_taken(err: QmpCommandError) -> bool:
    """Whether QEMU refused a ``device_add`` because its slot is in use."""
    return "not available" in err.desc or "in use" in err.desc or "occupied" in err.desc


@attrs.define(eq=False)
class _Kept:
    """A session's slot lock, vCPU count and kept topology."""

    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    vcpus: int | None = None
    topology: Topology | None = None


@attrs.frozen
class _Plug:
    """What a plug was asked besides the tap: wait for the driver, link, announcement."""

    wait_guest: bool
    link_up: bool
    announce: Announce | None
    mtu: int


@attrs.define(eq=False)
class QemuHypervisor:
    """Hot-plug network devices into one running QEMU through one QMP session.

    The bus topology is read once per session and kept in step with this session's own plugs
    and unplugs, so a plug with a kept session chooses its slot without asking QEMU. Someone
    else may plug behind the session's back: a ``device_add`` refused for its slot re-reads
    the topology and tries once more.
    """

    qmp: QmpSession
    unplug_timeout: float = 5.0
    guest_timeout: float = 30.0
    #: what every view of this session shares (see :meth:`with_timeouts`)
    _kept: _Kept = attrs.field(factory=_Kept)

    def with_timeouts(self, unplug: float, guest: float) -> QemuHypervisor:
        """This session with one request's deadlines: the slot lock, vCPU count and kept
        topology stay shared, so concurrent requests with other deadlines still agree."""
        return attrs.evolve(self, unplug_timeout=unplug, guest_timeout=guest)

    async def vcpus(self) -> int:
        if self._kept.vcpus is None:
            self._kept.vcpus = len(await self.qmp.execute("query-cpus-fast"))
        return self._kept.vcpus

    async def plug_tap(
        self,
        tap: TapInterface,
        fds: QueueFds,
        mac: str,
        op: Operation | None = None,
        *,
        wait_guest: bool = False,
        link_up: bool = True,
        announce: Announce | None = None,
        mtu: int = DEFAULT_MTU,
    ) -> str:
        """Hand ``tap``'s open queue fds to QEMU and plug a NIC on them; return its PCI path.

        All or nothing. Only the slot choice is serialized; fds and netdevs have names unique
        to the NIC. With ``op`` the steps join the caller's operation (whose undo covers the
        host side); without, a private operation is used and committed on success. The fds
        stay the caller's: QEMU holds its own copies once this returns. ``link_up=False``
        sets the NIC's link down right after its ``device_add``, before the guest's driver
        can have read it; ``announce`` (unless disabled) announces a NIC plugged with its
        link up once it is in (and, with ``wait_guest``, its driver too). An ``mtu`` other
        than 1500 is offered to the guest (``host_mtu``: its driver takes it, and can lower
        but never raise it while the NIC is plugged).
        """
        if not fds.tap:
            raise UnsupportedError(
                f"tap {tap.tap_iface.name}", "hot-plug", "no tap queue fds were opened"
            )
        says = _Plug(wait_guest, link_up, announce, mtu)
        if op is not None:
            return await self._plug(tap, fds, mac, op, says)
        async with Operation(OpKind.HOT_PLUG, tap.name) as own:
            path = await self._plug(tap, fds, mac, own, says)
            own.commit()
        return path

    async def _plug(
        self, tap: TapInterface, fds: QueueFds, mac: str, op: Operation, says: _Plug
    ) -> str:
        names: list[str] = []
        tap_fds, vhost_fds = tuple(fds.tap), tuple(fds.vhost)

        async def pass_fds() -> list[str]:
            for kind, group in (("fd", tap_fds), ("vhost", vhost_fds)):
                for i, fd in enumerate(group):
                    name = fd_name(tap, kind, i)
                    # Listed before the getfd: one that times out may still run in QEMU.
                    names.append(name)
                    await self.qmp.pass_fd(fd, name)
            return names

        async def close_fds(passed: list[str]) -> None:
            for name in passed:
                await self.qmp.close_fd(name)

        # Names sent before a failure are released too: register the undo first.
        op.on_undo(Step.PASS_FDS, lambda: close_fds(names))
        await op.step(Step.PASS_FDS, pass_fds)

        queues = len(tap_fds)
        fd_names = [fd_name(tap, "fd", i) for i in range(queues)]
        vhost_names = [fd_name(tap, "vhost", i) for i in range(len(vhost_fds))]

        async def netdev_add() -> None:
            await self.qmp.netdev_add_tap(netdev_id(tap), fd_names, vhost_names)

        async def netdev_del() -> None:
            await self.qmp.netdev_del(netdev_id(tap))

        await _qemu_step(op, Step.NETDEV_ADD, netdev_add, netdev_del)

        async def device_add() -> Slot:
            args: dict[str, Any] = {
                "driver": "virtio-net-pci",
                "id": device_id(tap),
                "netdev": netdev_id(tap),
                "mac": mac,
                "romfile": "",
            }
            if queues > 1:
                args.update(mq=True, vectors=vectors_for(queues))
            if says.mtu != DEFAULT_MTU:
                args["host_mtu"] = says.mtu
            return await self._add_on_free_slot(device_id(tap), args)

        async def device_del() -> None:
            await self._device_del(device_id(tap))

        slot = await _qemu_step(op, Step.DEVICE_ADD, device_add, device_del)
        if not says.link_up:  # undone with the device
            await op.step(Step.SET_LINK, lambda: self.set_link(tap, False))
        if says.wait_guest:
            await op.step(
                Step.WAIT_GUEST, lambda: self.qmp.wait_driver_ok(device_id(tap), self.guest_timeout)
            )
        if says.link_up and says.announce is not None and says.announce.enabled:
            plan = says.announce
            await op.step(Step.ANNOUNCE, lambda: self.announce(tap, plan))
        return slot.pci_path

    async def unplug_tap(
        self, tap: TapInterface, op: Operation | None = None, *, tun: bool = False
    ) -> None:
        """Unplug: device_del, wait for DEVICE_DELETED (bounded), then netdev_del.

        The order matters: QEMU lets a netdev go while the NIC still uses it. ``tun``: QEMU
        reads the queues of a tun tap (not a macvtap's, whose fds name no link), so a tap
        deleted behind its back can be told (:class:`TapGoneError`: such a multiqueue NIC is
        not unplugged).
        """
        if op is None:
            async with Operation(OpKind.UNPLUG, tap.name) as own:
                await self._unplug(tap, own, tun)
                own.commit()
        else:
            await self._unplug(tap, op, tun)

    async def _unplug(self, tap: TapInterface, op: Operation, tun: bool) -> None:
        if tun and await self._tap_gone_under_multiqueue(tap):
            raise TapGoneError(device_id(tap), tap.tap_iface.name)
        # No lock here: waiting for the guest must not hold up other plugs of this VM.
        await op.step(Step.DEVICE_DEL, lambda: self._device_del(device_id(tap)))
        await op.step(Step.NETDEV_DEL, lambda: self.qmp.netdev_del(netdev_id(tap)))

    async def host_mtu(self, tap: TapInterface) -> int:
        """The MTU the NIC offers its guest (``host_mtu``, 0: none), fixed once realized."""
        value = await self.qmp.qom_get(f"/machine/peripheral/{device_id(tap)}", "host_mtu")
        return value if isinstance(value, int) else 0

    async def announce(self, tap: TapInterface, plan: Announce) -> None:
        """``announce-self`` for this NIC alone, with a timer of its own (its device id): the
        rounds of other NICs' announcements go on (FACTS: without ``interfaces`` every NIC is
        announced, and a new call cancels the rounds of the last)."""
        await self.qmp.execute(
            "announce-self",
            {
                "initial": plan.initial,
                "max": plan.max,
                "rounds": plan.rounds,
                "step": plan.step,
                "interfaces": [device_id(tap)],
                "id": device_id(tap),
            },
        )

    async def set_link(self, tap: TapInterface, up: bool) -> None:
        """The NIC's link up or down (QMP ``set_link`` on the device): the guest's carrier
        follows; the tap stays as it is. Idempotent: QEMU tells the guest only of a change."""
        await self.qmp.execute("set_link", {"name": device_id(tap), "up": up})

    async def rx_filter(self, tap: TapInterface) -> RxFilter:
        """What the guest's driver asked its NIC to receive (``query-rx-filter``; reading it
        re-arms QEMU's one-shot NIC_RX_FILTER_CHANGED for the NIC)."""
        (found,) = await self.qmp.execute("query-rx-filter", {"name": device_id(tap)})
        return RxFilter.from_qemu(found)

    async def _tap_gone_under_multiqueue(self, tap: TapInterface) -> bool:
        """QEMU holds no live tap of that name, and the device has several queue pairs.

        For a plugged NIC only: a netdev deleted before its device (a rollback's undo) also
        leaves no live tap, but QEMU then marks the NIC's peer deleted and no longer touches
        its queues, and ``info network`` still lists the netdev under its NIC, so the two
        cannot be told apart here. Unknown (QEMU's fds unreadable, the device's ``mq``
        unreadable) counts as no: the unplug goes ahead as it always did.
        """
        peer = self.qmp.peer()
        held = await asyncio.to_thread(taps_held_by, peer.pid) if peer else None
        if held is None or tap.tap_iface.name in held:
            return False
        try:
            mq = await self.qmp.qom_get(f"/machine/peripheral/{device_id(tap)}", "mq")
        except QmpCommandError:
            return False  # no such device (gone already), or no such property
        return mq is True

    # --- slots -----------------------------------------------------------------------------

    async def _device_del(self, device: str) -> bool:
        """``device_del`` with its bounded wait; the kept topology follows what happened."""
        gone = False
        try:
            gone = await self.qmp.device_del(device, self.unplug_timeout)
            return gone
        finally:
            self._forget_slot(device, gone)

    async def _add_on_free_slot(self, device: str, args: dict[str, Any]) -> Slot:
        """``device_add`` on the first free slot; the choice and the add are one section.

        A kept topology may be stale (someone else plugged or unplugged through another
        monitor), and a fresh one may hold query-pci's view of a bus the guest numbered
        wrongly: one that has no free slot, or whose slot QEMU refuses as taken, is read
        again once, all from QOM, before the plug fails.
        """
        async with self._kept.lock:
            fresh = self._kept.topology is None
            for attempt in range(2):
                topology = await self._kept_topology(exact=attempt > 0)
                try:
                    slot = topology.first_free()
                except UnsupportedError:
                    self._kept.topology = None
                    if fresh or attempt:
                        raise
                    continue
                try:
                    await self.qmp.device_add({**args, "bus": slot.bus, "addr": hex(slot.addr)})
                except QmpCommandError as err:
                    self._kept.topology = None  # whatever QEMU has now is read again next time
                    if (fresh and topology.exact) or attempt or not _slot_taken(err):
                        raise
                    log.info("slot %s taken behind this session's back: re-reading", slot)
                    continue
                topology.take(device, slot)
                return slot
        raise AssertionError("unreachable")

    async def _kept_topology(self, exact: bool = False) -> Topology:
        if self._kept.topology is None:
            self._kept.topology = await self.read_topology(exact=exact)
        return self._kept.topology

    def _forget_slot(self, device: str, gone: bool) -> None:
        """After a device_del: a device this session plugged frees its slot; anything else
        (a device plugged before, an unplug still pending) has the layout read anew."""
        if self._kept.topology is not None and not (gone and self._kept.topology.release(device)):
            self._kept.topology = None

    async def release_fds(self, tap: TapInterface) -> None:
        """Close fds QEMU still holds for ``tap`` by name (``fd0..`` then ``vhost0..``).

        A plug passes a prefix of each series, so the first name QEMU does not know ends it.
        """
        for kind in ("fd", "vhost"):
            for i in range(QUEUES_MAX):
                if not await self.qmp.close_fd(fd_name(tap, kind, i)):
                    break

    async def free_slots(self) -> list[Slot]:
        """Free slots as QEMU's object tree shows them now (read afresh)."""
        return (await self.read_topology()).free()

    async def read_topology(self, exact: bool = False) -> Topology:
        """The hot-pluggable buses and what is on them.

        Two reads when the guest has numbered the buses: QOM's list of peripherals and
        query-pci, which shows each numbered bridge's devices (2-3 ms with 30 root ports
        under TCG, however many NICs are in). A bridge query-pci cannot see below (a paused
        VM's firmware has numbered nothing yet) is read from QOM: its address and its bus's
        children, pipelined, one round trip each (~0.7 ms; 45 ms for 30 root ports). With
        ``exact`` every bridge is read from QOM, which does not depend on what the guest
        wrote into a bridge's bus numbers. A root port's child is not read: any child
        takes its one slot.
        """
        peripherals, pci = await _all(
            self.qmp.qom_list("/machine/peripheral"), self.qmp.query_pci()
        )
        seen = {} if exact else _numbered_bridges(pci)
        wanted = [
            (c["name"], kind)
            for c in peripherals
            if (kind := c["type"].removeprefix("child<").removesuffix(">")) in BRIDGE_TYPES
        ]
        read = await _all(*(self._bridge(n, kind) for n, kind in wanted if n not in seen))
        by_name = {b.qdev_id: b for b in read}
        bridges = [by_name.get(n) or _pci_bridge(n, kind, seen[n]) for n, kind in wanted]
        root = [d for bus in pci if bus.get("bus") == 0 for d in bus.get("devices", [])]
        q35 = any(d["id"]["device"] == Q35_HOST_BRIDGE for d in root)
        return Topology(
            bridges,
            frozenset(d["slot"] for d in root),
            root_hotplug=not q35,
            exact=len(read) == len(wanted),
        )

    async def _bridge(self, name: str, kind: str) -> Bridge:
        path = f"/machine/peripheral/{name}"
        addr, links = await _all(
            self.qmp.qom_get(path, "addr"), self.qmp.qom_list(f"{path}/{name}")
        )
        children = [
            f"{path}/{name}/{link['name']}" for link in links if link["name"].startswith("child[")
        ]
        if kind == "pcie-root-port":
            used = frozenset({0}) if children else frozenset()
        else:
            used = frozenset(
                int(a) >> 3 for a in await _all(*(self.qmp.qom_get(c, "addr") for c in children))
            )
        return Bridge(name, kind, int(addr) >> 3, used)

    async def device_present(self, tap: TapInterface) -> bool:
        """Whether QEMU still has ``tap``'s device (its QOM node exists)."""
        return device_id(tap) in await self.peripheral_ids()

    async def nic_with_mac(self, mac: str) -> str | None:
        """The NIC of this VM that has ``mac``, if any.

        From QEMU's network list (``info network``), which costs the same however many NICs
        the VM has; ``query-rx-filter`` builds every NIC's filter tables (QEMU 7.2 under TCG:
        6 ms with one NIC, 60 ms with 24), and re-arms each NIC's NIC_RX_FILTER_CHANGED. The
        list's text is HMP's; a QEMU that will not give it, or a list without a single NIC
        line where QEMU has NICs, falls back to the filter view.
        """
        try:
            text = await self.qmp.execute("human-monitor-command", {"command-line": "info network"})
        except QmpCommandError:
            text = None
        macs = nic_macs(text) if isinstance(text, str) else None
        if macs is None:
            macs = {
                str(nic.get("name", "?")): str(nic.get("main-mac", "")).lower()
                for nic in await self.qmp.execute("query-rx-filter")
            }
        return next((name for name, m in macs.items() if m == mac.lower()), None)

    async def peripheral_ids(self) -> set[str]:
        return {
            c["name"]
            for c in await self.qmp.qom_list("/machine/peripheral")
            if c["type"].startswith("child<")
        }


T = TypeVar("T")

#: a NIC's line of ``info network``: ``ID: index=N,type=nic,model=M,macaddr=MAC``; a NIC
#: on a hub is printed once, inside the hub's block, after its port: `` \ PORT: ID: …``
_NIC_LINE = re.compile(
    r"^[ \\]*(?:[^\s:]+: )?(?P<name>[^\s:]+): index=\d+,type=nic,model=[^,\n]*,"
    r"macaddr=(?P<mac>[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5})\s*$",
    re.M,
)


def nic_macs(text: str) -> dict[str, str] | None:
    """Each NIC's MAC from ``info network`` text; None when the text is not empty yet no line
    reads as a NIC (another shape, an error's words, or backends alone): ask otherwise."""
    macs = {m["name"]: m["mac"].lower() for m in _NIC_LINE.finditer(text)}
    if not macs and text.strip():
        return None
    return macs


@attrs.frozen(kw_only=True)
class RxFilter:
    """A virtio NIC's receive filter as its guest set it (QEMU's ``RxFilterInfo``): a host
    link that filters by MAC must pass the same frames, or the guest never gets them."""

    main_mac: str
    promiscuous: bool
    #: "normal" (the tables), "all" or "none", as QEMU reports each
    unicast: str
    multicast: str
    unicast_table: tuple[str, ...] = ()
    multicast_table: tuple[str, ...] = ()

    @classmethod
    def from_qemu(cls, info: dict[str, Any]) -> RxFilter:
        return cls(
            main_mac=str(info["main-mac"]).lower(),
            promiscuous=bool(info["promiscuous"]),
            unicast=str(info["unicast"]),
            multicast=str(info["multicast"]),
            unicast_table=tuple(str(m).lower() for m in info.get("unicast-table", ())),
            multicast_table=tuple(str(m).lower() for m in info.get("multicast-table", ())),
        )


async def _qemu_step(
    op: Operation,
    step: Step,
    action: Callable[[], Awaitable[T]],
    undo: Callable[[], Awaitable[None]],
) -> T:
    """Run a QEMU command that creates something, and undo it also when its outcome is unknown.

    A command that timed out or lost its connection may still run in QEMU: its undo is
    registered then too (deleting what is not there is harmless). One QEMU refused did
    nothing, and the id it names may be someone else's: nothing to undo.
    """

    async def undo_result(_: T) -> None:
        await undo()

    try:
        return await op.step(step, action, undo_result)
    except PlugError as err:
        if isinstance(err.cause, QmpTimeoutError | QmpDisconnectedError):
            op.on_undo(step, undo)
        raise
    except asyncio.CancelledError:
        op.on_undo(step, undo)  # cancelled while QEMU had the command
        raise


async def _all(*calls: Awaitable[Any]) -> list[Any]:
    """Run QMP reads concurrently (QEMU answers in turn, the round trips overlap).

    Unlike a TaskGroup the first error is raised as itself, typed; the other reads are
    cancelled and awaited so none is left running.
    """
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _numbered_bridges(pci: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """query-pci's bridges whose bus QEMU found by its number: qdev id -> the entry.

    QEMU lists a bridge's ``devices`` only when the guest has programmed its secondary bus
    number and a bus has it; without them the bridge's children are unknown here.
    """
    found: dict[str, dict[str, Any]] = {}

    def walk(devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            below = dev.get("pci_bridge", {}).get("devices")
            if below is None:
                continue
            if dev.get("qdev_id"):
                found[dev["qdev_id"]] = dev
            walk(below)

    for bus in pci:
        walk(bus.get("devices", []))
    return found


def _pci_bridge(name: str, kind: str, dev: dict[str, Any]) -> Bridge:
    """A bridge as query-pci shows it: its slot on its parent bus, the slots used below."""
    used = frozenset(int(d["slot"]) for d in dev["pci_bridge"]["devices"])
    return Bridge(name, kind, int(dev["slot"]), used)


def pci_device_ids(pci: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()

    def walk(devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            if dev.get("qdev_id"):
                found.add(dev["qdev_id"])
            walk(dev.get("pci_bridge", {}).get("devices", []))

    for bus in pci:
        walk(bus.get("devices", []))
    return found


__all__ = [
    "Bridge",
    "QemuHypervisor",
    "QmpnetError",
    "Slot",
    "device_id",
    "fd_name",
    "free_slots",
    "netdev_id",
]
