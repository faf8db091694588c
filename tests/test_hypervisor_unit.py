"""The hypervisor adapter's pure parts: which tap an endpoint hands it, QEMU ids and strings,
MSI-X vectors, and the free-slot choice."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmpnet.config import Config
from qmpnet.endpoints import (
    REGISTRY,
    PlugContext,
    create_endpoint,
    create_tap_endpoint,
    net_info_from_interface,
)
from qmpnet.endpoints.base import LINK_TYPES
from qmpnet.errors import PlugError, QmpCommandError, QmpTimeoutError, UnsupportedError
from qmpnet.hypervisor import (
    Bridge,
    QemuHypervisor,
    Slot,
    device_id,
    fd_name,
    free_slots,
    netdev_id,
    pci_device_ids,
    vectors_for,
)
from qmpnet.lifecycle import Operation
from qmpnet.model import EndpointType, InterfaceDescription, InterworkingModel
from qmpnet.qmp import QmpSession
from qmpnet.tuntap import QueueFds


def _endpoint(link_type: str) -> Any:
    model = InterworkingModel.NONE if link_type == "tap" else InterworkingModel.TCFILTER
    desc = InterfaceDescription(name="eth0", hw_addr="52:54:00:00:00:05", link_type=link_type)
    return create_endpoint(net_info_from_interface(desc, model), 0, model)


PLUGGABLE = {EndpointType.VETH, EndpointType.MACVLAN, EndpointType.TUNTAP, EndpointType.TAP}


@pytest.mark.parametrize("kind", sorted(REGISTRY), ids=str)
def test_every_registered_type_says_whether_it_has_a_tap(kind: EndpointType) -> None:
    """The registry is the one table: a type either hands the hypervisor a tap or has none."""
    link_type = next(k for k, v in sorted(LINK_TYPES.items()) if v is kind)
    endpoint = _endpoint(link_type)
    assert (endpoint.tap is not None) is (kind in PLUGGABLE)
    assert endpoint.host_link == (endpoint.tap.tap_iface.name if endpoint.tap else "")


@pytest.mark.parametrize("link_type", ["veth", "macvlan", "tuntap"])
def test_netpair_types_plug_their_pairs_tap(link_type: str) -> None:
    endpoint = _endpoint(link_type)
    assert endpoint.tap is endpoint.network_pair.tap_interface


def test_tap_plugs_its_own_tap() -> None:
    endpoint = _endpoint("tap")
    assert endpoint.tap is endpoint.tap_interface


@pytest.mark.asyncio
@pytest.mark.parametrize("link_type", ["physical", "vhost-user", "macvtap", "ipvlan"])
async def test_other_types_are_not_supported(link_type: str) -> None:
    endpoint = _endpoint(link_type)
    assert endpoint.tap is None
    session = RecordingSession()
    with pytest.raises(UnsupportedError) as caught:
        await endpoint.hot_attach(
            PlugContext(QemuHypervisor(session), Config(), Operation("hot-plug", endpoint.name))
        )
    assert caught.value.operation == "hot-plug"
    assert str(endpoint.type) in caught.value.what
    assert session.sent == []


@pytest.mark.asyncio
async def test_plug_without_queue_fds_is_refused_before_any_command() -> None:
    session = RecordingSession()
    tap = create_tap_endpoint(0).tap_interface
    with pytest.raises(UnsupportedError, match="no tap queue fds"):
        await QemuHypervisor(session).plug_tap(tap, QueueFds(), "52:54:00:00:00:01")
    assert session.sent == []


@pytest.mark.parametrize(("queues", "vectors"), [(1, 4), (2, 6), (4, 10), (8, 18), (256, 514)])
def test_vectors_are_two_per_queue_pair_plus_two(queues: int, vectors: int) -> None:
    assert vectors_for(queues) == vectors


def test_qemu_names_derive_from_the_endpoint_id() -> None:
    tap = create_tap_endpoint(0).tap_interface
    tap = attrs.evolve(tap, id="qn0123456789")
    assert netdev_id(tap) == "qn0123456789-net"
    assert device_id(tap) == "qn0123456789-dev"
    assert [fd_name(tap, "fd", i) for i in range(2)] == ["qn0123456789-fd0", "qn0123456789-fd1"]
    assert fd_name(tap, "vhost", 3) == "qn0123456789-vhost3"


class RecordingSession(QmpSession):
    """Records what would be sent. Used only for ``vhostfds``: this host has no
    /dev/vhost-net, and QEMU aborts on a tap netdev whose vhost setup fails, so real QEMU
    cannot show these arguments here. The plain ``fds`` are checked against real QEMU in
    test_qemu_plug.py."""

    def __init__(self) -> None:
        super().__init__(None, "recording", 1.0, logging.getLogger("test"))  # type: ignore[arg-type]
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        self.sent.append((command, dict(arguments or {})))
        return {}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("queues", "vhost", "expected"),
    [
        (1, 0, {"fd": "n-fd0"}),
        (4, 0, {"fds": "n-fd0:n-fd1:n-fd2:n-fd3"}),
        (1, 1, {"fd": "n-fd0", "vhost": True, "vhostfd": "n-vhost0"}),
        (2, 2, {"fds": "n-fd0:n-fd1", "vhost": True, "vhostfds": "n-vhost0:n-vhost1"}),
    ],
)
async def test_netdev_add_arguments(queues: int, vhost: int, expected: dict[str, Any]) -> None:
    session = RecordingSession()
    fds = [f"n-fd{i}" for i in range(queues)]
    vhosts = [f"n-vhost{i}" for i in range(vhost)]
    await session.netdev_add_tap("n-net", fds, vhosts)
    assert session.sent == [("netdev_add", {"type": "tap", "id": "n-net", **expected})]
    # never vhost settings without vhost fds: QEMU aborts when /dev/vhost-net is missing
    if not vhost:
        assert not any(k.startswith("vhost") for k in session.sent[0][1])


# --- slots ---------------------------------------------------------------------------------


def test_empty_root_ports_first_in_slot_order() -> None:
    bridges = [
        Bridge("rp2", "pcie-root-port", 3, frozenset()),
        Bridge("rp0", "pcie-root-port", 1, frozenset({0})),
        Bridge("rp1", "pcie-root-port", 2, frozenset()),
    ]
    assert free_slots(bridges, {0, 1, 2, 3, 31}, root_hotplug=False) == [
        Slot("rp1", 0, "02/00"),
        Slot("rp2", 0, "03/00"),
    ]


def test_q35_without_free_ports_has_no_slot() -> None:
    bridges = [Bridge("rp0", "pcie-root-port", 1, frozenset({0}))]
    assert free_slots(bridges, {0, 1, 31}, root_hotplug=False) == []
    assert free_slots([], {0, 31}, root_hotplug=False) == []


def test_pc_uses_pci0_from_slot_2_then_bridge_slots() -> None:
    used = {0, 1, 2, 3}
    bridges = [Bridge("br0", "pci-bridge", 5, frozenset({1, 2}))]
    slots = free_slots(bridges, used | {5}, root_hotplug=True)
    root = [s for s in slots if s.bus == "pci.0"]
    behind = [s for s in slots if s.bus == "br0"]
    assert slots == root + behind
    assert [s.addr for s in root] == [4, *range(6, 32)]
    assert root[0] == Slot("pci.0", 4, "04")
    assert [s.addr for s in behind] == list(range(3, 32))
    assert behind[0] == Slot("br0", 3, "05/03")


@given(
    st.lists(
        st.tuples(
            st.integers(1, 31),
            st.sampled_from(["pcie-root-port", "pci-bridge"]),
            st.frozensets(st.integers(0, 31), max_size=4),
        ),
        max_size=6,
        unique_by=lambda t: t[0],
    ),
    st.sets(st.integers(0, 31)),
    st.booleans(),
)
def test_free_slots_are_free_unique_and_well_formed(
    spec: list[Any], root_used: set[int], root_hotplug: bool
) -> None:
    bridges = [Bridge(f"b{slot}", kind, slot, used) for slot, kind, used in spec]
    slots = free_slots(bridges, root_used | {s for s, _, _ in spec}, root_hotplug)
    assert len(set(slots)) == len(slots)
    by_id = {b.qdev_id: b for b in bridges}
    for slot in slots:
        if slot.bus == "pci.0":
            assert root_hotplug
            assert 2 <= slot.addr < 32
            assert slot.addr not in root_used
            assert slot.pci_path == f"{slot.addr:02x}"
        else:
            bridge = by_id[slot.bus]
            assert slot.addr not in bridge.used
            assert slot.pci_path == f"{bridge.slot:02x}/{slot.addr:02x}"
            if bridge.kind == "pcie-root-port":
                assert slot.addr == 0
                assert not bridge.used


def test_pci_device_ids_walks_bridges() -> None:
    pci = [
        {
            "bus": 0,
            "devices": [
                {"qdev_id": "", "slot": 0},
                {
                    "qdev_id": "rp0",
                    "slot": 1,
                    "pci_bridge": {"devices": [{"qdev_id": "qn1-dev", "slot": 0}]},
                },
                {"qdev_id": "rp1", "slot": 2, "pci_bridge": {"bus": {}}},
            ],
        }
    ]
    assert pci_device_ids(pci) == {"rp0", "rp1", "qn1-dev"}


class OneRootPort(QmpSession):
    """A q35 with one empty root port, answering what the slot search and a plug send.

    A fake because real QEMU cannot be made to fail ``wait-guest`` with a guest that then
    releases the device at once (a paused guest never releases it); the topology logic it
    pins is ours, not QEMU's.
    """

    def __init__(self) -> None:
        super().__init__(None, "one-port", 1.0, logging.getLogger("test"))  # type: ignore[arg-type]
        self.occupant: str | None = None
        self.reads = 0

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        args = dict(arguments or {})
        if command in ("qom-list", "query-pci", "qom-get"):
            self.reads += 1
        if command == "qom-list" and args["path"] == "/machine/peripheral":
            kids = [{"name": "rp0", "type": "child<pcie-root-port>"}]
            if self.occupant:
                kids.append({"name": self.occupant, "type": "child<virtio-net-pci>"})
            return kids
        if command == "qom-list":
            return [{"name": "child[0]", "type": "child<x>"}] if self.occupant else []
        if command == "qom-get":
            return 1 << 3
        if command == "query-pci":
            return [{"bus": 0, "devices": [{"slot": 0, "id": {"device": 0x29C0}}]}]
        if command == "device_add":
            if self.occupant:
                raise QmpCommandError(command, args, "GenericError", "PCI: slot 0 not available")
            self.occupant = args["id"]
        return {}

    async def pass_fd(self, fd: int, name: str) -> None:
        return None

    async def device_del(self, device_id: str, timeout: float) -> bool:
        present = self.occupant == device_id
        self.occupant = None if present else self.occupant
        return present

    async def wait_driver_ok(self, device_id: str, timeout: float) -> None:
        raise QmpTimeoutError(f"wait for guest driver of {device_id}", timeout)


@pytest.mark.asyncio
async def test_a_rolled_back_plug_gives_its_slot_back_to_the_kept_topology() -> None:
    session = OneRootPort()
    hv = QemuHypervisor(session)
    taps = [create_tap_endpoint(i, "eth0", tap_name=f"t{i}").tap_interface for i in range(2)]
    with pytest.raises(PlugError, match="wait-guest"):
        await hv.plug_tap(taps[0], QueueFds(tap=[-1]), "52:54:00:00:00:01", wait_guest=True)
    assert session.occupant is None  # the undo's device_del removed it
    reads = session.reads
    assert await hv.plug_tap(taps[1], QueueFds(tap=[-1]), "52:54:00:00:00:02") == "01/00"
    assert session.occupant == device_id(taps[1])
    assert session.reads == reads, "the undo gave the slot back: no bus was read again"


@pytest.mark.asyncio
async def test_a_kept_session_reads_the_buses_once_and_rereads_when_full() -> None:
    session = OneRootPort()
    hv = QemuHypervisor(session)
    taps = [create_tap_endpoint(i, "eth0", tap_name=f"t{i}").tap_interface for i in range(3)]
    await hv.plug_tap(taps[0], QueueFds(tap=[-1]), "52:54:00:00:00:01")
    first = session.reads
    assert first > 0
    await hv.unplug_tap(taps[0])
    await hv.plug_tap(taps[1], QueueFds(tap=[-1]), "52:54:00:00:00:02")
    assert session.reads == first, "the second plug chose its slot from the kept topology"
    session.occupant = None  # unplugged behind the session's back, through another monitor
    assert await hv.plug_tap(taps[2], QueueFds(tap=[-1]), "52:54:00:00:00:03") == "01/00"
    assert session.reads > first, "a kept topology with no free slot is read again once"


class MisnumberedPorts(QmpSession):
    """A q35 with two root ports whose guest programmed rp0's secondary bus number with
    the number of rp1's bus: query-pci lists rp1's (empty) bus below both, and rp0's NIC
    below neither. A fake because the test guest has no way to write a bridge's config
    space, and QEMU lists below a bridge whatever bus carries the number the guest wrote.
    """

    def __init__(self) -> None:
        super().__init__(None, "misnumbered", 1.0, logging.getLogger("test"))  # type: ignore[arg-type]
        self.on = {"rp0": "vm-manager-nic"}
        self.sent: list[str] = []

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        args = dict(arguments or {})
        self.sent.append(command)
        if command == "qom-list" and args["path"] == "/machine/peripheral":
            kids = [{"name": p, "type": "child<pcie-root-port>"} for p in ("rp0", "rp1")]
            return kids + [{"name": d, "type": "child<virtio-net-pci>"} for d in self.on.values()]
        if command == "qom-list":  # /machine/peripheral/rpN/rpN: the port's bus
            port = args["path"].rsplit("/", 1)[1]
            return [{"name": "child[0]", "type": "child<x>"}] if port in self.on else []
        if command == "qom-get":
            return {"rp0": 2, "rp1": 3}[args["path"].rsplit("/", 1)[1]] << 3
        if command == "query-pci":
            ports = [
                {
                    "qdev_id": p,
                    "slot": slot,
                    "id": {"device": 0x000C},
                    "pci_bridge": {"devices": []},
                }
                for p, slot in (("rp0", 2), ("rp1", 3))
            ]
            return [{"bus": 0, "devices": [{"slot": 0, "id": {"device": 0x29C0}}, *ports]}]
        if command == "device_add":
            if args["bus"] in self.on:
                raise QmpCommandError(
                    command, args, "GenericError", "PCI: slot 0 function 0 not available"
                )
            self.on[args["bus"]] = args["id"]
        return {}

    async def pass_fd(self, fd: int, name: str) -> None:
        return None


@pytest.mark.asyncio
async def test_a_port_query_pci_shows_free_but_qemu_refuses_is_read_from_qom_once() -> None:
    session = MisnumberedPorts()
    hv = QemuHypervisor(session)
    fast = await hv.read_topology()
    assert not fast.exact
    assert [s.bus for s in fast.free()] == ["rp0", "rp1"]
    assert session.sent == ["qom-list", "query-pci"]
    tap = create_tap_endpoint(0, "eth0", tap_name="t0").tap_interface
    assert await hv.plug_tap(tap, QueueFds(tap=[-1]), "52:54:00:00:00:01") == "03/00"
    assert session.on == {"rp0": "vm-manager-nic", "rp1": device_id(tap)}
    assert session.sent.count("device_add") == 2
    assert "qom-get" in session.sent, "the second look walked QOM"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("", {}, id="no-nic"),
        pytest.param(
            "qn1-dev: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:9C:00:01\n"
            " \\ qn1-net: index=0,type=tap,fd=13\n",
            {"qn1-dev": "52:54:00:9c:00:01"},
            id="nic-and-its-tap",
        ),
        pytest.param(
            # QEMU 7.2's hmp_info_network: a hub NIC only inside its hub's block, after its port
            "qn1-dev: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:9c:00:01\n"
            " \\ qn1-net: index=0,type=tap,fd=13\n"
            "hub 0\n"
            " \\ hub0port1: u0: index=0,type=user,net=10.0.2.0,restrict=off\n"
            " \\ hub0port0: e1000.0: index=0,type=nic,model=e1000,macaddr=52:54:00:12:34:56\n",
            {"qn1-dev": "52:54:00:9c:00:01", "e1000.0": "52:54:00:12:34:56"},
            id="behind-a-hub",
        ),
        pytest.param("qn1-net: index=0,type=tap,fd=13\n", None, id="a-backend-alone"),
        pytest.param("unknown command: 'info network'\n", None, id="an-error"),
        pytest.param("x: index=0,type=nic,mac 52:54\n", None, id="a-shape-not-known"),
    ],
)
def test_info_network_names_each_nic_and_its_mac(
    text: str, expected: dict[str, str] | None
) -> None:
    from qmpnet.hypervisor import nic_macs

    assert nic_macs(text) == expected
