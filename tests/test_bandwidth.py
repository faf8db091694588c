"""A NIC's bandwidth as callers spell it: libvirt's terms, virsh's, CNI's; the state's form.

Each spelling's units against bytes (libvirt: kB/s = 1000 bytes/s, kB = 1024 bytes, as tc's
``kbps`` and ``kb``; CNI: bits), and bad input named in the caller's own field and units.
"""

from __future__ import annotations

from typing import Any

import pytest

from qmpnet.bandwidth import Bandwidth, Rate, from_options, load_saved, parse_virsh, saved
from qmpnet.errors import InvalidInputError
from qmpnet.model import InterfaceDescription, with_bandwidth


def test_libvirt_terms_are_kilobytes_per_second_and_kibibytes() -> None:
    bw = Bandwidth.from_libvirt(
        {"inbound": {"average": 2500, "peak": 5000, "burst": 64}, "outbound": {"average": 12500}}
    )
    assert bw.inbound == Rate(average=2_500_000, peak=5_000_000, burst=65_536)
    assert bw.outbound == Rate(average=12_500_000)
    assert bw.libvirt() == {
        "inbound": {"average": 2500, "peak": 5000, "burst": 64},
        "outbound": {"average": 12500},
    }


def test_cni_capability_is_bits_and_ingress_is_the_guests_inbound() -> None:
    bw = Bandwidth.from_cni({"ingressRate": 20_000_000, "ingressBurst": 800_000})
    assert bw.inbound == Rate(average=2_500_000, burst=100_000)
    assert bw.outbound is None
    out = Bandwidth.from_cni({"egressRate": 100_000_000, "egressBurst": 8_000_000})
    assert out.outbound == Rate(average=12_500_000, burst=1_000_000)
    assert out.inbound is None
    assert not Bandwidth.from_cni({"ingressRate": 0, "egressRate": 0})


def test_virsh_spelling_and_the_defaults_it_leaves() -> None:
    r = parse_virsh("--inbound", "2500")
    assert r == Rate(average=2_500_000)
    assert r.ceil == 2_500_000
    assert r.buffer == 25_000
    assert parse_virsh("--outbound", "1").buffer == 2 * 1514  # never under two frames
    assert parse_virsh("--inbound", "2500,5000,64") == Rate(
        average=2_500_000, peak=5_000_000, burst=65_536
    )


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        ({"inbound": {"average": 0}}, "bandwidth.inbound.average", "must be positive"),
        ({"inbound": {"average": -5}}, "bandwidth.inbound.average", "must be positive"),
        ({"inbound": {"average": 10**9}}, "bandwidth.inbound.average", "12500000 kB/s"),
        ({"inbound": {"average": 2.5}}, "bandwidth.inbound.average", "must be an integer"),
        ({"inbound": {"average": True}}, "bandwidth.inbound.average", "must be an integer"),
        ({"inbound": {"average": "5"}}, "bandwidth.inbound.average", "must be an integer"),
        ({"inbound": {"peak": 5}}, "bandwidth.inbound.average", "missing"),
        ({"outbound": {"average": 10, "peak": 5}}, "bandwidth.outbound.peak", "the average"),
        ({"outbound": {"average": 10, "burst": 1000}}, "bandwidth.outbound.burst", "60 s"),
        ({"outbound": {"average": 10, "burst": -1}}, "bandwidth.outbound.burst", "positive"),
        ({"inbound": {"average": 10, "floor": 5}}, "bandwidth.inbound", "unknown key"),
        ({"sideways": {}}, "bandwidth", "unknown key"),
        ({"inbound": 5}, "bandwidth.inbound", "must be an object"),
    ],
)
def test_bad_libvirt_terms_are_named_in_the_callers_units(
    doc: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        InterfaceDescription.from_json({"name": "eth0", "bandwidth": doc})
    assert info.value.field == field
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("doc", "field", "reason"),
    [
        ({"ingressRate": 1000}, "runtimeConfig.bandwidth.ingressRate", "from 8000"),
        ({"egressRate": 10**15}, "runtimeConfig.bandwidth.egressRate", "100000000000 bits/s"),
        ({"egressRate": -8}, "runtimeConfig.bandwidth.egressRate", "positive"),
        ({"egressBurst": 8000}, "runtimeConfig.bandwidth.egressBurst", "without egressRate"),
        ({"ingressRate": "1M"}, "runtimeConfig.bandwidth.ingressRate", "integer"),
        ({"ingress": 5}, "runtimeConfig.bandwidth", "unknown key"),
    ],
)
def test_bad_cni_bandwidth(doc: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        Bandwidth.from_cni(doc)
    assert info.value.field == field
    assert reason in info.value.reason


@pytest.mark.parametrize("text", ["", "0", "a", "1,2,3,4", "-5", "5,,6", "1.5"])
def test_bad_virsh_spelling(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_virsh("--inbound", text)
    assert info.value.field.startswith("--inbound")


def test_options_the_command_line_gives() -> None:
    assert from_options() is None
    assert from_options(inbound="2500") == Bandwidth(inbound=Rate(average=2_500_000))
    doc = '{"outbound": {"average": 100}}'
    assert from_options(bandwidth=doc) == Bandwidth(outbound=Rate(average=100_000))
    with pytest.raises(InvalidInputError, match="not both"):
        from_options(bandwidth=doc, inbound="5")
    with pytest.raises(InvalidInputError) as info:
        from_options(bandwidth="{nope")
    assert info.value.field == "--bandwidth"
    with pytest.raises(InvalidInputError) as info:
        from_options(bandwidth='{"inbound": {"average": 0}}')
    assert info.value.field == "--bandwidth.inbound.average"


def test_the_interface_json_and_an_option_may_not_both_say_it() -> None:
    desc = InterfaceDescription.from_json(
        {"name": "eth0", "bandwidth": {"inbound": {"average": 9}}}
    )
    assert with_bandwidth(desc, None) is desc
    with pytest.raises(InvalidInputError, match="as an option"):
        with_bandwidth(desc, Bandwidth(outbound=Rate(average=1000)))
    bare = InterfaceDescription(name="eth0")
    assert "bandwidth" not in bare.to_json()  # Kata's shape stays Kata's when not shaped
    assert with_bandwidth(bare, desc.bandwidth).to_json()["bandwidth"] == {
        "inbound": {"average": 9}
    }


def test_the_state_keeps_bytes_exactly() -> None:
    cni = Bandwidth.from_cni({"ingressRate": 20_000_800, "ingressBurst": 799_992})
    assert cni.inbound == Rate(average=2_500_100, burst=99_999)
    assert cni.libvirt()["inbound"] == {"average": 2500.1, "burst": 99_999 / 1024}
    assert load_saved(saved(cni)) == cni
    with pytest.raises(InvalidInputError):
        load_saved({"inbound": {"average": 5}})
    with pytest.raises(InvalidInputError):
        load_saved({"inbound": {"average": 0, "peak": 0, "burst": 0}})
