"""Shaping on real links (qmpnet.endpoints.shaping): what tc shows after each change, what a
refusal leaves, and that clearing leaves the links as they were.

The view is ``tc`` and ``ip -j`` in the test's netns, never qmpnet's own reading. The rates
themselves are measured through a guest in ``integration/test_live.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from qmpnet import tuntap
from qmpnet.bandwidth import Bandwidth, Rate
from qmpnet.endpoints import shaping
from qmpnet.errors import NotOursError, UnsupportedError
from qmpnet.links import Links
from qmpnet.marks import claimed_owner
from qmpnet.netns import run_in_netns
from qmpnet.testing.probe import ip_json
from qmpnet.testing.scene import unique

pytestmark = [pytest.mark.kernel, pytest.mark.asyncio]

OWNER = "qn00c0ffee00"
SLOW = Bandwidth(inbound=Rate(average=2_500_000), outbound=Rate(average=1_250_000, burst=65_536))
FAST = Bandwidth(inbound=Rate(average=12_500_000, peak=25_000_000))


def tc(netns: str, *args: str) -> str:
    done = subprocess.run(
        ["tc", "-n", os.path.basename(netns), *args], check=True, capture_output=True, text=True
    )
    return done.stdout


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", os.path.basename(netns), *args], check=True, capture_output=True)


def root(netns: str, dev: str) -> str:
    """The root qdisc's kind and handle as tc prints them (``htb 7171:``), or ``""``."""
    m = re.search(r"^qdisc (\S+) (\S+) root", tc(netns, "qdisc", "show", "dev", dev), re.M)
    return f"{m.group(1)} {m.group(2)}" if m else ""


def has_ingress(netns: str, dev: str) -> bool:
    return "qdisc ingress ffff:" in tc(netns, "qdisc", "show", "dev", dev)


def rate_of(netns: str, dev: str) -> tuple[str, str]:
    """The htb class's rate and ceil as tc prints them (``20Mbit``)."""
    text = tc(netns, "class", "show", "dev", dev)
    m = re.search(r"class htb 7171:1 .*rate (\S+) ceil (\S+)", text)
    assert m, text
    return m.group(1), m.group(2)


@pytest.fixture
def tap(netns: str) -> Iterator[str]:
    """A tap of ours, marked as the NIC's (non-persistent: it lives while the test holds
    its queue)."""
    name = unique("t")
    fds = made_tap(netns, name)
    try:
        yield name
    finally:
        tuntap.close_all(fds)


def made_tap(netns: str, name: str) -> list[int]:
    async def make() -> list[int]:
        fds = await run_in_netns(netns, lambda: tuntap.open_tap_queues(name, 1))
        async with Links.open(netns) as links:
            await links.configure(name, owner=OWNER, up=True)
        return fds

    return asyncio.run(make())


@pytest.fixture
def veth(netns: str) -> str:
    """A link that is not ours (the sandbox's, as a CNI made it)."""
    name = unique("v")
    ip(netns, "link", "add", name, "type", "veth", "peer", "name", name + "p")
    ip(netns, "link", "set", name, "up")
    return name


def sites(netns: str, inbound: shaping.Site, outbound: shaping.Site) -> shaping.Sites:
    return shaping.Sites(netns=netns, owner=OWNER, inbound=inbound, outbound=outbound)


async def test_a_taps_egress_and_its_ingress_through_the_nics_ifb(netns: str, tap: str) -> None:
    s = sites(netns, shaping.Site(tap), shaping.Site(tap, ifb=True))
    before = root(netns, tap)
    await shaping.apply(s, SLOW)
    assert root(netns, tap) == "htb 7171:"
    assert rate_of(netns, tap) == ("20Mbit", "20Mbit")
    assert has_ingress(netns, tap)
    assert "action order 1: mirred (Egress Redirect to device " + s.ifb in tc(
        netns, "filter", "show", "dev", tap, "ingress"
    )
    (ifb,) = ip_json("link", "show", "dev", s.ifb, netns=netns)
    assert claimed_owner(ifb.get("ifalias", "")) == OWNER
    assert "UP" in ifb["flags"]
    assert rate_of(netns, s.ifb) == ("10Mbit", "10Mbit")
    assert "burst 64Kb" in tc(netns, "class", "show", "dev", s.ifb)

    await shaping.apply(s, SLOW)  # again: nothing doubles
    assert tc(netns, "filter", "show", "dev", tap, "ingress").count("mirred") == 1

    await shaping.apply(s, FAST)  # the inbound class changed in place, the outbound gone
    assert rate_of(netns, tap) == ("100Mbit", "200Mbit")
    assert not has_ingress(netns, tap)
    assert s.ifb not in {link["ifname"] for link in ip_json("link", "show", netns=netns)}

    await shaping.apply(s, None)
    assert root(netns, tap) == before
    assert not has_ingress(netns, tap)


async def test_a_link_not_ours_is_shaped_on_its_egress_and_given_back(
    netns: str, tap: str, veth: str
) -> None:
    s = sites(netns, shaping.Site(tap), shaping.Site(veth))
    before = root(netns, veth)
    await shaping.apply(s, SLOW)
    assert rate_of(netns, veth) == ("10Mbit", "10Mbit")
    async with Links.open(netns) as links:
        assert await shaping.residue(links, s) == [f"{veth} still has qmpnet's htb"]
    await shaping.apply(s, None)
    assert root(netns, veth) == before
    async with Links.open(netns) as links:
        assert await shaping.residue(links, s) == []


async def test_someone_elses_root_qdisc_is_refused_and_left(
    netns: str, tap: str, veth: str
) -> None:
    tc(netns, "qdisc", "add", "dev", veth, "root", "handle", "5:", "pfifo")
    s = sites(netns, shaping.Site(tap), shaping.Site(veth))
    with pytest.raises(UnsupportedError, match="root qdisc qmpnet did not make"):
        await shaping.change(s, None, SLOW)
    assert root(netns, veth) == "pfifo 5:"
    assert root(netns, tap) != "htb 7171:", "the inbound half was not taken back"


async def test_a_failed_live_change_puts_the_shaping_before_back(
    netns: str, tap: str, veth: str
) -> None:
    s = sites(netns, shaping.Site(tap), shaping.Site(veth))
    await shaping.apply(s, FAST)
    tc(netns, "qdisc", "add", "dev", veth, "root", "handle", "5:", "pfifo")
    with pytest.raises(UnsupportedError):
        await shaping.change(s, FAST, SLOW)
    assert rate_of(netns, tap) == ("100Mbit", "200Mbit")
    assert root(netns, veth) == "pfifo 5:"
    await shaping.apply(s, None)


async def test_an_ifb_name_taken_by_a_link_not_ours_is_refused(netns: str, tap: str) -> None:
    s = sites(netns, shaping.Site(tap), shaping.Site(tap, ifb=True))
    ip(netns, "link", "add", s.ifb, "type", "bridge")
    with pytest.raises(NotOursError):
        await shaping.apply(s, SLOW)
    with pytest.raises(NotOursError):
        await shaping.apply(s, None)
    assert [link["ifname"] for link in ip_json("link", "show", "dev", s.ifb, netns=netns)] == [
        s.ifb
    ]
    assert not has_ingress(netns, tap)


async def test_clearing_links_that_are_gone_is_quiet(netns: str) -> None:
    s = sites(netns, shaping.Site("gone0"), shaping.Site("gone0", ifb=True))
    await shaping.apply(s, None)
