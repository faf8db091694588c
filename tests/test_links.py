"""links.Links against real links in a fresh netns: ownership, refusals, and tc mirroring
that really carries frames between a veth and a tap (checked on the wire, both ways)."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
import subprocess
import time
from typing import Any

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from qmpnet import tuntap
from qmpnet.errors import HostError, LinkExistsError, NotOursError
from qmpnet.links import Links
from qmpnet.marks import claimed_owner
from qmpnet.netns import run_in_netns
from qmpnet.testing.probe import ip_json
from qmpnet.testing.scene import unique

pytestmark = [pytest.mark.kernel]

VNET_HDR = bytes(10)  # struct virtio_net_hdr, no offloads: the tap has IFF_VNET_HDR
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800


def _ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", os.path.basename(netns), *args], check=True, capture_output=True)


def _tc(netns: str, *args: str) -> None:
    subprocess.run(["tc", "-n", os.path.basename(netns), *args], check=True, capture_output=True)


@pytest.mark.asyncio
async def test_lookup_get_and_wait(netns: str) -> None:
    async with Links.open(netns) as links:
        assert await links.lookup("absent0") is None
        with pytest.raises(HostError) as caught:
            await links.get("absent0")
        assert caught.value.errno == errno.ENODEV
        assert netns in str(caught.value)  # the error says where
        await links.wait_for("absent0", present=False)
        with pytest.raises(HostError, match="still missing"):
            await links.wait_for("absent0", timeout=0.05)


@pytest.mark.asyncio
async def test_counters_are_the_links_own_as_ip_reports_them(netns: str) -> None:
    """Frames sent on lo in the netns are counted; a missing link has no counters."""
    name = os.path.basename(netns)
    await asyncio.to_thread(
        subprocess.run, ["ip", "-n", name, "link", "set", "lo", "up"], check=True
    )
    await asyncio.to_thread(
        subprocess.run,
        ["ip", "netns", "exec", name, "busybox", "ping", "-c", "3", "-W", "1", "127.0.0.1"],
        check=True,
        capture_output=True,
    )
    async with Links.open(netns) as links:
        assert await links.counters("absent0") is None
        got = await links.counters("lo")
    assert got is not None
    (lo,) = ip_json("-s", "link", "show", "lo", netns=netns)
    assert got.rx_packets >= 6  # 3 echo requests and 3 replies, all through lo
    assert got.rx_packets <= lo["stats64"]["rx"]["packets"]
    assert got.tx_bytes <= lo["stats64"]["tx"]["bytes"]
    assert got.rx_errors == got.tx_dropped == 0


@pytest.mark.asyncio
async def test_delete_refuses_links_without_our_mark(netns: str, host: Any) -> None:
    name = unique("b")
    _ip(netns, "link", "add", name, "type", "bridge")
    _ip(netns, "link", "set", name, "alias", "made by someone else")
    before = host.stable(host.links(netns)[name])
    async with Links.open(netns) as links:
        with pytest.raises(NotOursError) as caught:
            await links.delete(name)
        assert caught.value.obj.startswith(name)
        assert host.stable(host.links(netns)[name]) == before
        # marked, but for another NIC: also refused when the owner is given
        await links.mark_ours(name, "qn000000000a")
        with pytest.raises(NotOursError):
            await links.delete(name, owner="qn000000000b")
        assert name in host.links(netns)
        assert await links.delete(name, owner="qn000000000a") is True
        assert name not in host.links(netns)
        assert await links.delete(name) is False  # already gone


@pytest.mark.asyncio
async def test_creating_over_an_existing_name_is_refused(netns: str, host: Any) -> None:
    taken = unique("b")
    _ip(netns, "link", "add", taken, "type", "bridge")
    before = host.stable(host.links(netns)[taken])
    async with Links.open(netns) as links:
        with pytest.raises(LinkExistsError):
            await links.add_bridge(taken, "qn000000000c")
        with pytest.raises(LinkExistsError):
            await links.add_veth(taken, unique("p"), "qn000000000c")
        with pytest.raises(LinkExistsError):
            await links.add_macvtap(taken, "lo", "52:54:00:00:00:0c", "qn000000000c")
    assert host.stable(host.links(netns)[taken]) == before
    assert sorted(host.links(netns)) == sorted(["lo", taken])


@pytest.mark.asyncio
async def test_created_links_carry_the_mark(netns: str, host: Any) -> None:
    bridge, veth, peer = unique("b"), unique("v"), unique("p")
    async with Links.open(netns) as links:
        info = await links.add_bridge(bridge, "qn000000000d", mtu=1400)
        assert host.links(netns)[bridge]["mtu"] == 1400  # a port may lower it later
        await links.add_veth(veth, peer, "qn000000000d")
        await links.set_master(veth, bridge)
        seen = host.links(netns)
        assert (info.owner, info.kind) == ("qn000000000d", "bridge")
        assert claimed_owner(seen[bridge]["ifalias"]) == "qn000000000d"
        assert claimed_owner(seen[veth]["ifalias"]) == "qn000000000d"
        assert seen[veth]["master"] == bridge
        await links.set_master(veth, None)
        assert "master" not in host.links(netns)[veth]
        assert await links.delete(veth, owner="qn000000000d")
        assert await links.delete(bridge, owner="qn000000000d")
    assert sorted(host.links(netns)) == ["lo"]  # the peer went with its veth


# --- tc mirroring: frames really cross -------------------------------------------------------


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((ifname, 0))
    return sock


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _arp_request(src_mac: str, src_ip: str, dst_ip: str) -> bytes:
    mac = _mac_bytes(src_mac)
    return (
        b"\xff" * 6
        + mac
        + struct.pack("!H", ETH_P_ARP)
        + struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1)
        + mac
        + socket.inet_aton(src_ip)
        + bytes(6)
        + socket.inet_aton(dst_ip)
    )


def _read_frame(fd: int, want: Any, timeout: float = 10.0) -> bytes:
    """The first frame (after the vnet header) from the tap fd that ``want`` accepts."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            frame = os.read(fd, 65536)[len(VNET_HDR) :]
            if want(frame):
                return frame
    pytest.fail("no matching frame read from the tap")


def _recv_frame(sock: socket.socket, want: Any, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frame = sock.recv(65536)
        except TimeoutError:
            break
        if want(frame):
            return frame
    pytest.fail("no matching frame on the far side")


@pytest.mark.asyncio
async def test_tc_mirror_carries_frames_both_ways_and_detach_leaves_nothing(
    cni_veth: Any, host: Any
) -> None:
    veth = cni_veth(mac="52:54:00:00:00:17")
    guest_mac, guest_ip = "52:54:00:00:17:02", "169.254.23.2"
    far_ip = veth.far_ip  # 169.254.23.1
    tap = unique("t")
    fds = await run_in_netns(veth.sandbox, lambda: tuntap.open_tap_queues(tap, 1))
    sniffer = await run_in_netns(veth.far, lambda: _packet_socket(veth.outer))
    try:
        async with Links.open(veth.sandbox) as links:
            await links.configure(tap, up=True, owner="qn0000000017")
            await links.set_up(veth.inner)
            await links.add_tc_mirror(veth.inner, tap)
            assert await links.has_tc_ingress(veth.inner)
            assert await links.has_tc_ingress(tap)
        for dev in (veth.inner, tap):
            assert "ingress" in [q["kind"] for q in host.qdiscs(veth.sandbox, dev)]

        # tap -> veth: what the "guest" writes into the tap leaves on the far side ...
        request = _arp_request(guest_mac, guest_ip, far_ip)
        os.write(fds[0], VNET_HDR + request)
        seen = _recv_frame(sniffer, lambda f: f[6:12] == _mac_bytes(guest_mac))
        assert seen[: len(request)] == request
        # ... and the far side's ARP reply comes back through the tap
        reply = _read_frame(
            fds[0], lambda f: f[12:14] == struct.pack("!H", ETH_P_ARP) and f[20:22] == b"\x00\x02"
        )
        assert reply[:6] == _mac_bytes(guest_mac)
        assert reply[28:32] == socket.inet_aton(far_ip)

        # veth -> tap: a ping from the far side arrives as an ICMP echo request
        _ip(veth.far, "neigh", "replace", guest_ip, "lladdr", guest_mac, "dev", veth.outer)
        ping = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            os.path.basename(veth.far),
            "busybox",
            "ping",
            "-c",
            "3",
            "-W",
            "1",
            guest_ip,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            echo = _read_frame(
                fds[0],
                lambda f: (
                    f[12:14] == struct.pack("!H", ETH_P_IP)
                    and f[23] == socket.IPPROTO_ICMP
                    and f[34] == 8
                ),
            )
        finally:
            ping.kill()
            await ping.wait()
        assert echo[:6] == _mac_bytes(guest_mac)
        assert (echo[26:30], echo[30:34]) == (socket.inet_aton(far_ip), socket.inet_aton(guest_ip))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sniffer.close()

    # detach: the ingress qdisc (and its filter) goes, the tap goes with its fds
    async with Links.open(veth.sandbox) as links:
        await links.del_tc_ingress(veth.inner)
        await links.del_tc_ingress(veth.inner)  # twice is fine
        assert await links.delete(tap, owner="qn0000000017")
    for fd in fds:
        os.close(fd)
    assert not [q for q in host.qdiscs(veth.sandbox, veth.inner) if q["kind"] == "ingress"]
    host.wait_until(lambda: tap not in host.links(veth.sandbox), what="tap gone")
    assert sorted(host.links(veth.sandbox)) == sorted(["lo", veth.inner])


@pytest.mark.asyncio
async def test_tc_mirror_on_a_link_with_someone_elses_ingress_is_refused(
    cni_veth: Any, host: Any
) -> None:
    veth = cni_veth()
    _ip(veth.sandbox, "link", "set", veth.inner, "up")
    _tc(veth.sandbox, "qdisc", "add", "dev", veth.inner, "ingress")
    tap = unique("t")
    fds = await run_in_netns(veth.sandbox, lambda: tuntap.open_tap_queues(tap, 1))
    try:
        async with Links.open(veth.sandbox) as links:
            with pytest.raises(HostError) as caught:
                await links.add_tc_mirror(veth.inner, tap)
            assert caught.value.errno == errno.EEXIST
    finally:
        for fd in fds:
            os.close(fd)
    # theirs is still there
    assert [q["kind"] for q in host.qdiscs(veth.sandbox, veth.inner) if q["kind"] == "ingress"] == [
        "ingress"
    ]


@pytest.mark.asyncio
async def test_tc_mirror_half_made_is_taken_back(cni_veth: Any, host: Any) -> None:
    """The second direction fails (the tap already has someone's ingress qdisc): the first
    direction's qdisc, which was ours, must not stay behind on the veth."""
    veth = cni_veth()
    tap = unique("t")
    fds = await run_in_netns(veth.sandbox, lambda: tuntap.open_tap_queues(tap, 1))
    try:
        _tc(veth.sandbox, "qdisc", "add", "dev", tap, "ingress")
        async with Links.open(veth.sandbox) as links:
            with pytest.raises(HostError) as caught:
                await links.add_tc_mirror(veth.inner, tap)
        assert caught.value.errno == errno.EEXIST
        assert "ingress" not in [q["kind"] for q in host.qdiscs(veth.sandbox, veth.inner)]
        assert "ingress" in [q["kind"] for q in host.qdiscs(veth.sandbox, tap)]  # theirs
    finally:
        for fd in fds:
            os.close(fd)


# --- every netlink failure is a HostError --------------------------------------------------


@pytest.mark.asyncio
async def test_tc_queries_on_a_missing_link_are_host_errors(netns: str) -> None:
    async with Links.open(netns) as links:
        for query in (links.has_tc_ingress, links.tc_ingress_ours):
            with pytest.raises(HostError) as caught:
                await query("absent0")
            assert caught.value.errno == errno.ENODEV
            assert netns in str(caught.value)
        await links.del_tc_ingress("absent0")  # absent is fine for a removal


class _Breaking:
    """The real AsyncIPRoute, but one method fails as the kernel or a broken socket would:
    at the request, or in the middle of the dump it answers."""

    def __init__(self, ipr: Any, method: str, err: Exception, mid_dump: bool) -> None:
        self._ipr, self._method, self._err, self._mid_dump = ipr, method, err, mid_dump

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._ipr, name)
        if name != self._method:
            return real

        async def dump(first: Any) -> Any:
            async for msg in first:
                yield msg
                break
            raise self._err

        async def broken(*args: Any, **kwargs: Any) -> Any:
            if self._mid_dump:
                return dump(await real(*args, **kwargs))
            raise self._err

        return broken


def _failures() -> list[Any]:
    return [
        pytest.param(lambda: NetlinkError(errno.EPERM), errno.EPERM, id="netlink"),
        pytest.param(
            lambda: OSError(errno.EBADF, os.strerror(errno.EBADF)), errno.EBADF, id="socket"
        ),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(("make_err", "code"), _failures())
@pytest.mark.parametrize(
    ("method", "mid_dump", "call"),
    [
        pytest.param("get_links", False, lambda links, name: links.list(), id="list"),
        pytest.param("get_links", True, lambda links, name: links.list(), id="list-mid-dump"),
        pytest.param("link", False, lambda links, name: links.lookup(name), id="lookup"),
        pytest.param("link", False, lambda links, name: links.get(name), id="get"),
        pytest.param(
            "link",
            False,
            lambda links, name: links.wait_for(name, present=False),
            id="wait_for",
        ),
        pytest.param(
            "get_qdiscs", False, lambda links, name: links.has_tc_ingress(name), id="has_tc_ingress"
        ),
        pytest.param(
            "get_qdiscs",
            True,
            lambda links, name: links.has_tc_ingress(name),
            id="has_tc_ingress-mid-dump",
        ),
        pytest.param(
            "get_filters",
            False,
            lambda links, name: links.tc_ingress_ours(name),
            id="tc_ingress_ours",
        ),
        pytest.param(
            "get_filters",
            True,
            lambda links, name: links.tc_ingress_ours(name),
            id="tc_ingress_ours-mid-dump",
        ),
        pytest.param("link", False, lambda links, name: links.set_mtu(name, 1400), id="set_mtu"),
        pytest.param("link", False, lambda links, name: links.set_up(name), id="set_up"),
        pytest.param(
            "link", False, lambda links, name: links.set_master(name, None), id="set_master"
        ),
        pytest.param("link", False, lambda links, name: links.delete(name), id="delete"),
        pytest.param(
            "link",
            False,
            lambda links, name: links.add_bridge(unique("b"), "qn0123456789"),
            id="add_bridge",
        ),
        pytest.param(
            "tc", False, lambda links, name: links.add_tc_mirror(name, "lo"), id="add_tc_mirror"
        ),
    ],
)
async def test_no_netlink_error_leaves_links(
    netns: str, method: str, mid_dump: bool, call: Any, make_err: Any, code: int
) -> None:
    async with Links.open(netns) as links:
        name = unique("b")
        await links.add_bridge(name, "qn00000000aa")
        before = {link.name for link in await links.list()}
        err = make_err()
        real = links._ipr
        links._ipr = _Breaking(real, method, err, mid_dump)  # type: ignore[assignment]
        try:
            with pytest.raises(HostError) as caught:
                await call(links, name)
        finally:
            links._ipr = real
        assert caught.value.errno == code
        assert caught.value.__cause__ is err
        assert netns in str(caught.value)
        assert {link.name for link in await links.list()} == before  # nothing made or lost
        assert await links.delete(name)


@pytest.mark.asyncio
async def test_a_guests_receive_filter_mirrored_onto_a_link_and_taken_back(netns: str) -> None:
    """Promiscuity, all-multicast and the user-added groups, as ``ip`` shows them; the
    kernel's own groups (its IPv6 addresses') are never touched."""
    name = unique("m")
    _ip(netns, "link", "add", name, "type", "veth", "peer", "name", name + "p")
    _ip(netns, "link", "set", name, "up")

    def view() -> tuple[list[str], set[str]]:
        (link,) = ip_json("link", "show", "dev", name, netns=netns)
        out = subprocess.run(
            ["ip", "-n", os.path.basename(netns), "maddr", "show", "dev", name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return list(link["flags"]), {line.split()[1] for line in out.splitlines() if "link" in line}

    _, kernel_groups = view()
    groups = {"01:00:5e:01:02:03", "33:33:00:00:71:71"}
    async with Links.open(netns) as links:
        await links.mirror_rx_filter(name, promisc=True, allmulti=True, multicast=groups)
        flags, seen = view()
        assert {"PROMISC", "ALLMULTI"} <= set(flags)
        assert seen == kernel_groups | groups
        assert await links.rx_view(name) == (True, True, frozenset(groups))
        await links.mirror_rx_filter(name, promisc=False, allmulti=False, multicast=groups)
        await links.mirror_rx_filter(
            name, promisc=False, allmulti=False, multicast={"01:00:5e:01:02:03"}
        )
        flags, seen = view()
        assert not {"PROMISC", "ALLMULTI"} & set(flags)
        assert seen == kernel_groups | {"01:00:5e:01:02:03"}
        await links.mirror_rx_filter(name, promisc=False, allmulti=False, multicast=())
        assert view()[1] == kernel_groups
        with pytest.raises(HostError):
            await links.mirror_rx_filter("gone0", promisc=True, allmulti=False, multicast=())
