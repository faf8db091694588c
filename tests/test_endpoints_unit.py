"""Building endpoints: interface -> net info per model, the link type -> endpoint type table,
tap endpoint names, and the refusals that need no host (cold plug, unpluggable types)."""

from __future__ import annotations

import logging

import attrs
import pytest
from qemu.qmp import QMPClient

from qmpnet.config import Config
from qmpnet.endpoints import (
    REGISTRY,
    IpvlanEndpoint,
    MacvlanEndpoint,
    MacvtapEndpoint,
    NetPairEndpoint,
    PhysicalEndpoint,
    PlugContext,
    TapEndpoint,
    TuntapEndpoint,
    VethEndpoint,
    VhostUserEndpoint,
    create_endpoint,
    create_tap_endpoint,
    net_info_from_interface,
)
from qmpnet.endpoints.base import LINK_TYPES, new_id, queue_pairs, random_mac
from qmpnet.endpoints.netpair import bridge_name
from qmpnet.errors import InvalidInputError, UnsupportedError
from qmpnet.hypervisor import QemuHypervisor
from qmpnet.lifecycle import Operation
from qmpnet.model import (
    EndpointType,
    InterfaceDescription,
    InterworkingModel,
    IPAddress,
    check_mac,
)
from qmpnet.qmp import QmpSession

DESC = InterfaceDescription(
    device="eth3",
    name="eth3",
    mtu=1450,
    hw_addr="52:54:00:00:00:09",
    ip_addresses=(IPAddress(family=4, address="169.254.9.2", mask="24"),),
)


@pytest.mark.parametrize(
    ("model", "link_type"),
    [
        (InterworkingModel.NONE, "tap"),
        (InterworkingModel.DEFAULT, "veth"),
        (InterworkingModel.TCFILTER, "veth"),
        (InterworkingModel.MACVTAP, "veth"),
        (InterworkingModel.BRIDGED, "veth"),
        (InterworkingModel.ENLIGHTENED, "veth"),
    ],
)
def test_net_info_link_type_follows_the_model(model: InterworkingModel, link_type: str) -> None:
    info = net_info_from_interface(DESC, model)
    assert info.link_type == link_type
    assert (info.iface.name, info.iface.hardware_addr, info.iface.mtu) == (
        "eth3",
        "52:54:00:00:00:09",
        1450,
    )
    assert info.addrs == DESC.ip_addresses


@pytest.mark.parametrize("model", list(InterworkingModel))
def test_explicit_link_type_wins(model: InterworkingModel) -> None:
    desc = attrs.evolve(DESC, link_type="macvlan")
    assert net_info_from_interface(desc, model).link_type == "macvlan"


def test_net_info_needs_a_name() -> None:
    with pytest.raises(InvalidInputError, match="needs a name"):
        net_info_from_interface(InterfaceDescription(device="eth0"), InterworkingModel.NONE)


EXPECTED = {
    "tap": TapEndpoint,
    "veth": VethEndpoint,
    "virtual": VethEndpoint,
    "macvlan": MacvlanEndpoint,
    "macvtap": MacvtapEndpoint,
    "ipvlan": IpvlanEndpoint,
    "tuntap": TuntapEndpoint,
    "tun": TuntapEndpoint,
    "physical": PhysicalEndpoint,
    "device": PhysicalEndpoint,
    "vhost-user": VhostUserEndpoint,
}


def test_link_type_table_is_complete() -> None:
    assert set(LINK_TYPES) == set(EXPECTED)
    assert {REGISTRY[k] for k in LINK_TYPES.values()} == set(REGISTRY.values())


@pytest.mark.parametrize(("link_type", "cls"), sorted(EXPECTED.items()))
def test_create_endpoint_picks_the_type_from_the_link_type(
    link_type: str, cls: type[object]
) -> None:
    desc = attrs.evolve(DESC, link_type=link_type)
    info = net_info_from_interface(desc, InterworkingModel.TCFILTER)
    endpoint = create_endpoint(
        info,
        3,
        InterworkingModel.TCFILTER,
        netns_path="/run/netns/p",
        tap_name="tap3_kata",
        queues=2,
    )
    assert type(endpoint) is cls
    assert endpoint.type is cls.type
    assert (endpoint.name, endpoint.hardware_addr, endpoint.netns_path) == (
        "eth3",
        "52:54:00:00:00:09",
        "/run/netns/p",
    )
    assert endpoint.properties == info
    assert endpoint.pci_path == ""
    assert endpoint.id.startswith("qn")
    if isinstance(endpoint, NetPairEndpoint):
        pair = endpoint.network_pair
        assert pair.model is InterworkingModel.TCFILTER
        assert (pair.virt_iface.name, pair.tap_interface.tap_iface.name) == ("eth3", "tap3_kata")
        assert pair.virt_iface.addrs == DESC.ip_addresses
        assert endpoint.queues == 2
    elif isinstance(endpoint, TapEndpoint):
        assert endpoint.network_pair is None
        assert endpoint.host_link == "tap3_kata"
        assert endpoint.queues == 2


def test_create_endpoint_refuses_unknown_link_types_and_negative_index() -> None:
    info = net_info_from_interface(
        attrs.evolve(DESC, link_type="vxlan"), InterworkingModel.TCFILTER
    )
    with pytest.raises(InvalidInputError, match=r"unsupported link type; known:.*macvlan"):
        create_endpoint(info, 0, InterworkingModel.TCFILTER)
    with pytest.raises(InvalidInputError, match="index"):
        create_endpoint(
            net_info_from_interface(DESC, InterworkingModel.NONE), -1, InterworkingModel.NONE
        )


@pytest.mark.parametrize("link_type", ["tap", "veth"])
def test_a_chosen_endpoint_id_is_used_and_checked(link_type: str) -> None:
    """A pending CNI ADD chooses the id (its result names the parked MAC derived from it)."""
    model = InterworkingModel.NONE if link_type == "tap" else InterworkingModel.BRIDGED
    info = net_info_from_interface(attrs.evolve(DESC, link_type=link_type), model)
    chosen = new_id()
    assert create_endpoint(info, 0, model, endpoint_id=chosen).id == chosen
    assert create_endpoint(info, 0, model).id != chosen
    for bad in ("qn0123", "QN0123456789", "qn012345678g", "x" * 300):
        with pytest.raises(InvalidInputError, match="endpoint id"):
            create_endpoint(info, 0, model, endpoint_id=bad)


def test_netpair_model_default_is_stored_resolved() -> None:
    endpoint = create_endpoint(
        net_info_from_interface(DESC, InterworkingModel.DEFAULT), 0, InterworkingModel.DEFAULT
    )
    assert endpoint.network_pair is not None
    assert endpoint.network_pair.model is InterworkingModel.TCFILTER
    assert endpoint.network_pair.tap_interface.tap_iface.name == "tap0_kata"


def test_netpair_refuses_model_none_and_enlightened() -> None:
    veth = net_info_from_interface(attrs.evolve(DESC, link_type="veth"), InterworkingModel.NONE)
    with pytest.raises(InvalidInputError, match="model none plugs a tap endpoint"):
        create_endpoint(veth, 0, InterworkingModel.NONE)
    with pytest.raises(UnsupportedError, match="no defined plumbing") as caught:
        create_endpoint(veth, 0, InterworkingModel.ENLIGHTENED)
    assert "enlightened" in caught.value.what


@pytest.mark.parametrize("idx", [0, 7, 42])
def test_tap_endpoint_default_names(idx: int) -> None:
    endpoint = create_tap_endpoint(idx)
    assert endpoint.name == f"eth{idx}"
    assert endpoint.host_link == f"tap{idx}_kata"
    assert endpoint.type is EndpointType.TAP
    check_mac("mac", endpoint.hardware_addr)
    assert endpoint.hardware_addr.startswith("52:54:00:")
    assert endpoint.properties is not None
    assert endpoint.properties.link_type == "tap"


def test_tap_endpoint_name_overrides() -> None:
    endpoint = create_tap_endpoint(2, "net1", tap_name="vmtap2", mac="52:54:00:00:00:aa")
    assert (endpoint.name, endpoint.host_link, endpoint.hardware_addr) == (
        "net1",
        "vmtap2",
        "52:54:00:00:00:aa",
    )
    assert create_tap_endpoint(2).id != create_tap_endpoint(2).id


@pytest.mark.parametrize("idx", [-1, -100])
def test_tap_endpoint_negative_index(idx: int) -> None:
    with pytest.raises(InvalidInputError, match="index") as caught:
        create_tap_endpoint(idx)
    assert caught.value.value == idx


def test_tap_endpoint_name_checks() -> None:
    with pytest.raises(InvalidInputError, match="tap name"):
        create_tap_endpoint(0, tap_name="x" * 16)
    with pytest.raises(InvalidInputError, match="name"):
        create_tap_endpoint(0, "bad name")
    # tap{idx}_kata itself goes past IFNAMSIZ for big indexes: refused, not truncated
    with pytest.raises(InvalidInputError, match="tap name"):
        create_tap_endpoint(10**7)  # tap10000000_kata: 16 bytes


def test_ids_and_macs_are_fresh_and_well_formed() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 12 and i.startswith("qn") for i in ids)
    for _ in range(50):
        check_mac("mac", random_mac())


def test_bridge_names() -> None:
    endpoint = create_endpoint(
        net_info_from_interface(DESC, InterworkingModel.BRIDGED), 4, InterworkingModel.BRIDGED
    )
    assert bridge_name(endpoint.network_pair) == "br4_kata"  # type: ignore[arg-type]
    other = create_endpoint(
        net_info_from_interface(DESC, InterworkingModel.BRIDGED),
        4,
        InterworkingModel.BRIDGED,
        tap_name="qa1t9",
    )
    assert bridge_name(other.network_pair) == "br-qa1t9"  # type: ignore[arg-type]


# --- refusals that need no host ------------------------------------------------------------


def _ctx() -> PlugContext:
    # A session that never connects: these paths must refuse before they would need QEMU.
    session = QmpSession(QMPClient("unused"), "/nonexistent", 1.0, logging.getLogger("test"))
    return PlugContext(QemuHypervisor(session), Config(), Operation("hot-plug", "x"))


@pytest.mark.asyncio
@pytest.mark.parametrize("link_type", ["tap", "veth", "macvlan", "tuntap"])
async def test_cold_plug_is_refused_with_a_clear_message(link_type: str) -> None:
    model = InterworkingModel.NONE if link_type == "tap" else InterworkingModel.TCFILTER
    endpoint = create_endpoint(
        net_info_from_interface(attrs.evolve(DESC, link_type=link_type), model), 0, model
    )
    with pytest.raises(UnsupportedError, match="cold plug") as caught:
        await endpoint.attach(_ctx())
    if link_type == "tap":
        assert "can only be hot-plugged" in str(caught.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("link_type", ["physical", "vhost-user", "macvtap", "ipvlan"])
async def test_unpluggable_types_say_why(link_type: str) -> None:
    endpoint = create_endpoint(
        net_info_from_interface(
            attrs.evolve(DESC, link_type=link_type), InterworkingModel.TCFILTER
        ),
        0,
        InterworkingModel.TCFILTER,
    )
    reason = type(endpoint).reason  # type: ignore[attr-defined]
    for call, what in (
        (endpoint.hot_attach(_ctx()), "hot-plug"),
        (endpoint.hot_detach(_ctx()), "hot-unplug"),
        (endpoint.attach(_ctx()), "cold plug"),
    ):
        with pytest.raises(UnsupportedError) as caught:
            await call
        assert caught.value.operation == what
        assert caught.value.reason == reason
        assert str(endpoint.type) in str(caught.value)
    op = Operation("teardown", endpoint.name)
    await endpoint.teardown(op)  # nothing to do, nothing raised
    assert op.history == []
    assert endpoint.tap is None
    assert endpoint.host_link == ""


@pytest.mark.asyncio
async def test_queue_count_comes_from_request_then_config_then_vcpus() -> None:
    asked: list[int] = []

    async def vcpus() -> int:
        asked.append(1)
        return 5

    assert await queue_pairs(2, 3, vcpus) == 2
    assert await queue_pairs(0, 3, vcpus) == 3
    assert asked == []  # the guest is asked only when nothing else decides
    assert await queue_pairs(0, 0, vcpus) == 5
