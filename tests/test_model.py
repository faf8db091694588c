"""The closed vocabularies and the boundary checks of model.py.

Every value from outside is checked once, when the object is built; a bad value is an
``InvalidInputError`` naming the field and the value. The property tests feed arbitrary
JSON (and near-valid JSON) to ``InterfaceDescription.from_json``: the answer is a valid
object or that error, never any other exception.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qmpnet.errors import InvalidInputError, UnknownValueError, shown
from qmpnet.model import (
    IFNAME_MAX,
    MTU_MAX,
    MTU_MIN,
    QUEUES_MAX,
    EndpointType,
    InterfaceDescription,
    InterworkingModel,
    IPAddress,
    LinkAttrs,
    NetworkInterfacePair,
    check_ifname,
    check_mac,
    check_mtu,
    check_pci_path,
    check_queues,
)

T = TypeVar("T")

# --- vocabularies --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EndpointType))
def test_endpoint_type_round_trips(kind: EndpointType) -> None:
    assert EndpointType.parse(str(kind)) is kind
    assert EndpointType.parse(kind) is kind
    assert str(kind) == kind.value


def test_endpoint_type_set_is_closed() -> None:
    assert {str(k) for k in EndpointType} == {
        "physical",
        "virtual",
        "vhost-user",
        "macvlan",
        "macvtap",
        "tap",
        "tuntap",
        "ipvlan",
    }


@pytest.mark.parametrize("bad", ["veth", "TAP", "", " tap", "macvtap0", None, 3, ["tap"]])
def test_unknown_endpoint_type_is_named(bad: object) -> None:
    with pytest.raises(UnknownValueError) as caught:
        EndpointType.parse(bad)
    err = caught.value
    assert str(err).startswith(f"Unknown endpoint type {bad}")
    assert (err.field, err.value) == ("endpoint type", bad)
    assert set(err.valid) == {k.value for k in EndpointType}
    assert isinstance(err, InvalidInputError)


@pytest.mark.parametrize("model", list(InterworkingModel))
def test_interworking_model_round_trips(model: InterworkingModel) -> None:
    assert InterworkingModel.parse(str(model)) is model
    assert InterworkingModel.is_valid(str(model))


def test_interworking_model_set_and_default() -> None:
    assert {str(m) for m in InterworkingModel} == {
        "default",
        "bridged",
        "macvtap",
        "enlightened",
        "tcfilter",
        "none",
    }
    assert InterworkingModel.DEFAULT.resolved() is InterworkingModel.TCFILTER
    for model in InterworkingModel:
        if model is not InterworkingModel.DEFAULT:
            assert model.resolved() is model


@pytest.mark.parametrize("bad", ["Default", "tc-filter", "", "macvlan", None, 1])
def test_unknown_model_names_the_valid_ones(bad: object) -> None:
    assert not InterworkingModel.is_valid(bad)
    with pytest.raises(UnknownValueError) as caught:
        InterworkingModel.parse(bad)
    message = str(caught.value)
    assert f"interworking model {bad}" in message
    for model in InterworkingModel:
        assert model.value in message


def test_enlightened_parses_but_a_netpair_refuses_it() -> None:
    """The name is kept for configuration compatibility; using it is a clear error."""
    from qmpnet.endpoints import create_endpoint, net_info_from_interface
    from qmpnet.errors import UnsupportedError

    model = InterworkingModel.parse("enlightened")
    assert model is InterworkingModel.ENLIGHTENED
    info = net_info_from_interface(InterfaceDescription(name="eth0"), model)
    with pytest.raises(UnsupportedError, match=r"enlightened.*no defined plumbing"):
        create_endpoint(info, 0, model)


def test_pair_model_field_parses_strings_and_refuses_unknown() -> None:
    from qmpnet.model import NetworkInterface, TapInterface

    tap = TapInterface(id="qn1", name="eth0", tap_iface=NetworkInterface(name="tap0"))
    virt = NetworkInterface(name="eth0")
    pair = NetworkInterfacePair(tap_interface=tap, virt_iface=virt, model="macvtap")
    assert pair.model is InterworkingModel.MACVTAP
    with pytest.raises(UnknownValueError):
        NetworkInterfacePair(tap_interface=tap, virt_iface=virt, model="nope")


# --- field checks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "eth0", "x" * IFNAME_MAX, "tap0_kata", "é" * 7, "a.b"])
def test_ifname_accepts(name: str) -> None:
    assert check_ifname("name", name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "x" * (IFNAME_MAX + 1),
        "é" * 8,  # 16 bytes
        "a/b",
        "a:b",
        "a\0b",
        "a b",
        "a\tb",
        "a\nb",
        ".",
        "..",
        "\ud800",
        5,
        None,
    ],
)
def test_ifname_refuses(name: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        check_ifname("name", name)
    assert (caught.value.field, caught.value.value) == ("name", name)
    assert repr(name) in str(caught.value)


@pytest.mark.parametrize(
    ("mtu", "ok"),
    [
        (MTU_MIN, True),
        (MTU_MAX, True),
        (1500, True),
        (MTU_MIN - 1, False),
        (MTU_MAX + 1, False),
        (0, False),
        (-1, False),
        (1500.0, False),
        ("1500", False),
        (True, False),
    ],
)
def test_mtu_range(mtu: object, ok: bool) -> None:
    if ok:
        assert check_mtu("mtu", mtu) == mtu
    else:
        with pytest.raises(InvalidInputError, match="68 to 65535"):
            check_mtu("mtu", mtu)


@pytest.mark.parametrize(
    ("queues", "ok"),
    [
        (1, True),
        (4, True),
        (QUEUES_MAX, True),
        (0, False),
        (QUEUES_MAX + 1, False),
        (-2, False),
        (2.0, False),
        (True, False),
        ("4", False),
    ],
)
def test_queue_range(queues: object, ok: bool) -> None:
    if ok:
        assert check_queues("queues", queues) == queues
    else:
        with pytest.raises(InvalidInputError, match=f"1 to {QUEUES_MAX}"):
            check_queues("queues", queues)


@pytest.mark.parametrize(
    ("mac", "normal"),
    [
        ("52:54:00:12:34:56", "52:54:00:12:34:56"),
        ("52:54:00:AB:cd:EF", "52:54:00:ab:cd:ef"),
        ("02:00:00:00:00:00", "02:00:00:00:00:00"),
        ("fe:ff:ff:ff:ff:ff", "fe:ff:ff:ff:ff:ff"),
    ],
)
def test_mac_accepts_unicast_and_lowers(mac: str, normal: str) -> None:
    assert check_mac("hwAddr", mac) == normal


@pytest.mark.parametrize(
    ("mac", "why"),
    [
        ("00:00:00:00:00:00", "all zeros"),
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("53:54:00:12:34:56", "multicast"),
        ("52:54:00:12:34", "six hex bytes"),
        ("52-54-00-12-34-56", "six hex bytes"),
        ("52:54:00:12:34:5g", "six hex bytes"),
        ("52:54:00:12:34:56\n", "six hex bytes"),
        ("525400123456", "six hex bytes"),
        (" 52:54:00:12:34:56", "six hex bytes"),
        (None, "six hex bytes"),
    ],
)
def test_mac_refuses(mac: object, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why) as caught:
        check_mac("hwAddr", mac)
    assert caught.value.value == mac


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("", True),
        ("02", True),
        ("02/00", True),
        ("1F/1f", True),
        ("01/02/03/04/05/06/07/08", True),
        ("20", False),
        ("2", False),
        ("02/", False),
        ("/02", False),
        ("02\n", False),
        ("01/02/03/04/05/06/07/08/09", False),
        ("0x02", False),
    ],
)
def test_pci_path(path: str, ok: bool) -> None:
    if ok:
        assert check_pci_path("pciPath", path) == path.lower()
    else:
        with pytest.raises(InvalidInputError, match=r"slots 00\.\.1f"):
            check_pci_path("pciPath", path)


@pytest.mark.parametrize(
    ("family", "address", "mask", "field"),
    [
        (4, "169.254.1.2", "33", "mask"),
        (6, "fd00::1", "129", "mask"),
        (4, "169.254.1.2", "-1", "mask"),
        (4, "169.254.1.2", "²", "mask"),
        (4, "169.254.1.2", "", "mask"),
        (4, "fd00::1", "64", "address"),
        (6, "169.254.1.2", "24", "address"),
        (4, "169.254.1.256", "24", "address"),
        (4, "not-an-ip", "24", "address"),
        (5, "169.254.1.2", "24", "family"),
        (6, "fe80::1%eth0", "64", "address"),
        (4, 5, "24", "address"),
    ],
)
def test_ip_address_refuses(family: int, address: object, mask: str, field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        IPAddress(family=family, address=address, mask=mask)
    assert caught.value.field == field


def test_ip_address_limits() -> None:
    assert IPAddress(family=4, address="169.254.1.2", mask="0").cidr == "169.254.1.2/0"
    assert IPAddress(family=4, address="169.254.1.2", mask="32").mask == "32"
    assert IPAddress(family=6, address="fd00::2", mask="128").cidr == "fd00::2/128"


def test_link_attrs_check_at_construction() -> None:
    assert (
        LinkAttrs(name="eth0", hardware_addr="52:54:00:AA:00:01").hardware_addr
        == "52:54:00:aa:00:01"
    )
    with pytest.raises(InvalidInputError, match="name"):
        LinkAttrs(name="x" * 16)
    with pytest.raises(InvalidInputError, match="mtu"):
        LinkAttrs(name="eth0", mtu=67)
    with pytest.raises(InvalidInputError, match="hardware_addr"):
        LinkAttrs(name="eth0", hardware_addr="01:00:00:00:00:01")


# --- InterfaceDescription.from_json --------------------------------------------------------

FULL = {
    "device": "eth0",
    "name": "eth0",
    "mtu": 1400,
    "hwAddr": "52:54:00:00:00:07",
    "pciPath": "02/00",
    "linkType": "veth",
    "raw_flags": 0,
    "IPAddresses": [
        {"family": 4, "address": "169.254.7.2", "mask": "24"},
        {"family": 6, "address": "fd00::7", "mask": "64"},
    ],
}


def test_from_json_reads_the_agent_shape_and_round_trips() -> None:
    desc = InterfaceDescription.from_json(FULL)
    assert desc.mtu == 1400
    assert [a.cidr for a in desc.ip_addresses] == ["169.254.7.2/24", "fd00::7/64"]
    assert desc.to_json() == FULL
    assert InterfaceDescription.from_json(json.loads(json.dumps(desc.to_json()))) == desc


def test_from_json_accepts_protobuf_families_and_integer_masks() -> None:
    desc = InterfaceDescription.from_json(
        {
            "IPAddresses": [
                {"family": 0, "address": "169.254.1.2", "mask": 24},
                {"family": 1, "address": "fd00::2", "mask": "64"},
            ]
        }
    )
    assert [(a.family, a.mask) for a in desc.ip_addresses] == [(4, "24"), (6, "64")]


@pytest.mark.parametrize(
    ("patch", "field", "value"),
    [
        ({"name": "x" * 16}, "name", "x" * 16),
        ({"device": "a/b"}, "device", "a/b"),
        ({"mtu": 65536}, "mtu", 65536),
        ({"mtu": "1500"}, "mtu", "1500"),
        ({"hwAddr": "01:00:00:00:00:00"}, "hwAddr", "01:00:00:00:00:00"),
        ({"pciPath": "40"}, "pciPath", "40"),
        ({"raw_flags": 1.5}, "raw_flags", 1.5),
        ({"linkType": 4}, "linkType", 4),
        ({"bogus": 1}, "interface", "bogus"),
        ({"IPAddresses": "169.254.1.2/24"}, "IPAddresses", "169.254.1.2/24"),
        ({"IPAddresses": [{"family": True, "address": "fd00::1", "mask": "64"}]}, "family", True),
        ({"IPAddresses": [{"family": 4, "address": "169.254.1.2", "mask": "40"}]}, "mask", "40"),
        (
            {"IPAddresses": [{"family": 4, "address": "169.254.1.2", "mask": "24", "extra": 1}]},
            "IPAddresses",
            "extra",
        ),
        ({"IPAddresses": [{"family": 4, "address": "169.254.1.2"}]}, "mask", None),
    ],
)
def test_from_json_names_the_field_and_value(
    patch: dict[str, Any], field: str, value: object
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        InterfaceDescription.from_json({**FULL, **patch})
    assert (caught.value.field, caught.value.value) == (field, value)
    assert field in str(caught.value)
    assert shown(value) in str(caught.value)


def test_from_json_refuses_non_objects() -> None:
    data: object
    for data in (None, [], "eth0", 3):
        with pytest.raises(InvalidInputError, match="JSON object"):
            InterfaceDescription.from_json(data)


# Text that reaches the awkward corners: separators, white space, non-ASCII digits, lone
# surrogates (valid JSON escapes), long strings.
_text = st.text(st.characters(codec=None, categories=None), max_size=20) | st.sampled_from(
    [
        "eth0",
        "x" * 15,
        "x" * 16,
        "a/b",
        "a b",
        ".",
        "..",
        "²",
        "٣",
        "\ud800",
        "02/00",
        "1f",
        "52:54:00:12:34:56",
        "01:00:00:00:00:00",
        "00:00:00:00:00:00",
        "52:54:00:12:34:56\n",
        "169.254.1.2",
        "fd00::1",
        "fe80::1%eth0",
        "24",
        "64",
        "129",
        " 1",
    ]
)
_int = st.integers() | st.sampled_from([0, 1, 4, 6, 67, 68, 1500, 65535, 65536, -1])
_json = st.recursive(
    st.none() | st.booleans() | _int | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_address = (
    st.fixed_dictionaries(
        {},
        optional={
            "family": st.sampled_from([0, 1, 4, 6, 5, True, "4"]) | _json,
            "address": _text | _json,
            "mask": _text | _int | _json,
        },
    )
    | _json
)
_description = (
    st.fixed_dictionaries(
        {},
        optional={
            "device": _text | _json,
            "name": _text | _json,
            "mtu": _int | _json,
            "hwAddr": _text | _json,
            "pciPath": _text | _json,
            "linkType": _text | _json,
            "raw_flags": _int | _json,
            "IPAddresses": st.lists(_address, max_size=3) | _json,
        },
    )
    | st.dictionaries(_text, _json, max_size=3)
    | _json
)


def _outcome(parse: Callable[[Any], T], data: object) -> tuple[T | None, InvalidInputError | None]:
    """The parsed object, or the InvalidInputError; any other exception fails the test."""
    try:
        return parse(data), None
    except InvalidInputError as err:
        return None, err


_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def _assert_valid(desc: InterfaceDescription) -> None:
    for name in (desc.device, desc.name):
        if name:
            assert 1 <= len(name.encode("utf-8", "surrogateescape")) <= IFNAME_MAX
            assert not any(c in name for c in "/:\0")
            assert not any(c.isspace() for c in name)
    assert MTU_MIN <= desc.mtu <= MTU_MAX
    assert type(desc.mtu) is int
    assert desc.hw_addr == "" or (
        _MAC.fullmatch(desc.hw_addr) and not int(desc.hw_addr[:2], 16) & 1
    )
    assert desc.pci_path == "" or re.fullmatch(r"[01][0-9a-f](/[01][0-9a-f]){0,7}", desc.pci_path)
    for addr in desc.ip_addresses:
        assert addr.family in (4, 6)
        assert type(addr.family) is int
        assert ipaddress.ip_address(addr.address).version == addr.family
        assert re.fullmatch(r"[0-9]+", addr.mask)
        assert int(addr.mask) <= (32 if addr.family == 4 else 128)
    assert isinstance(desc.link_type, str)
    assert type(desc.raw_flags) is int
    # What is valid once stays valid: its own JSON reads back equal.
    assert InterfaceDescription.from_json(json.loads(json.dumps(desc.to_json()))) == desc


@given(_description)
@example({"name": "\ud800"})
@example({"hwAddr": "52:54:00:12:34:56\n"})
@example({"pciPath": "02\n"})
@example({"IPAddresses": [{"family": 4, "address": "169.254.1.2", "mask": "²"}]})
@example({"IPAddresses": [{"family": True, "address": "fd00::1", "mask": "64"}]})
def test_from_json_gives_a_valid_object_or_a_named_error(data: object) -> None:
    desc, err = _outcome(InterfaceDescription.from_json, data)
    if err is not None:
        assert isinstance(err.field, str)
        assert err.field
        assert err.field in str(err)
        assert shown(err.value) in str(err)
        return
    assert desc is not None
    _assert_valid(desc)


@given(
    st.builds(
        InterfaceDescription,
        name=st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True),
        mtu=st.integers(MTU_MIN, MTU_MAX),
        hw_addr=st.binary(min_size=6, max_size=6).map(
            lambda b: ":".join(f"{x:02x}" for x in bytes([b[0] & 0xFE | 0x02]) + b[1:])
        ),
        ip_addresses=st.lists(
            st.builds(
                lambda a, m: IPAddress(family=4, address=str(a), mask=str(m)),
                st.ip_addresses(v=4),
                st.integers(0, 32),
            ),
            max_size=3,
        ).map(tuple),
    )
)
def test_valid_descriptions_round_trip(desc: InterfaceDescription) -> None:
    assert InterfaceDescription.from_json(json.loads(json.dumps(desc.to_json()))) == desc
