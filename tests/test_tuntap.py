"""Tap queues and vhost fds, against the real kernel in a fresh netns per test.

What the tap looks like is read back with ``ip -d -j link`` (the tun driver's own report),
not with qmpnet's code.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpnet import tuntap
from qmpnet.errors import HostError, InvalidInputError, LinkExistsError
from qmpnet.links import Links
from qmpnet.marks import claimed_owner
from qmpnet.netns import run_in_netns
from qmpnet.testing.scene import unique

pytestmark = [pytest.mark.kernel]


def _cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def _tun_iff(fd: int) -> str:
    with open(f"/proc/self/fdinfo/{fd}") as fh:
        for line in fh:
            if line.startswith("iff:"):
                return line[4:].strip()  # "" once detached
    return ""


@pytest.mark.asyncio
@pytest.mark.parametrize("queues", [1, 4])
async def test_tap_exists_with_the_flags_asked(netns: str, host: Any, queues: int) -> None:
    name = unique("t")
    fds = await run_in_netns(netns, lambda: tuntap.open_tap_queues(name, queues))
    try:
        assert len(fds) == queues
        assert len(set(fds)) == queues
        assert all(_cloexec(fd) for fd in fds)
        link = host.links(netns)[name]
        assert link["linkinfo"]["info_kind"] == "tun"
        info = link["linkinfo"]["info_data"]
        assert info["type"] == "tap"
        assert info["pi"] is False
        assert info["vnet_hdr"] is True
        assert info["multi_queue"] is (queues > 1)
        if queues > 1:  # ip prints the queue count only for a multiqueue tap
            assert (info["numqueues"], info["numdisabled"]) == (queues, 0)
        # each fd is attached to this tap, as the tun driver's fdinfo says
        assert all(_tun_iff(fd) == name for fd in fds)
        assert info["persist"] is False
    finally:
        for fd in fds:
            os.close(fd)
    # not persistent: closing the queues removes the tap
    host.wait_until(lambda: name not in host.links(netns), what=f"{name} gone")


@pytest.mark.asyncio
async def test_configure_applies_mtu_mac_alias_and_state(netns: str, host: Any) -> None:
    name = unique("t")
    fds = await run_in_netns(netns, lambda: tuntap.open_tap_queues(name, 2))
    try:
        before = host.links(netns)[name]
        assert "UP" not in before["flags"]
        async with Links.open(netns) as links:
            await links.configure(
                name, mtu=1400, mac="52:54:00:AB:00:01", up=True, owner="qn0000000001"
            )
            info = await links.get(name)
        after = host.links(netns)[name]
        assert after["mtu"] == 1400
        assert after["address"] == "52:54:00:ab:00:01"
        assert claimed_owner(after["ifalias"]) == "qn0000000001"
        assert "UP" in after["flags"]
        assert (info.mtu, info.mac, info.up, info.owner, info.kind) == (
            1400,
            "52:54:00:ab:00:01",
            True,
            "qn0000000001",
            "tun",
        )
        async with Links.open(netns) as links:
            await links.set_up(name, False)
        assert "UP" not in host.links(netns)[name]["flags"]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["bridge", "persistent tap"])
async def test_an_existing_link_name_is_refused_and_survives(
    netns: str, host: Any, kind: str
) -> None:
    """A persistent tap of that name is the dangerous case: TUNSETIFF would join it."""
    name = unique("t")
    ns = host.ns_name(netns)
    if kind == "bridge":
        host.sh("ip", "-n", ns, "link", "add", name, "type", "bridge")
    else:
        host.sh("ip", "-n", ns, "tuntap", "add", "dev", name, "mode", "tap", "multi_queue")
    host.sh("ip", "-n", ns, "link", "set", name, "mtu", "1300")
    before = host.stable(host.links(netns)[name])
    with pytest.raises(LinkExistsError) as caught:
        await run_in_netns(netns, lambda: tuntap.open_tap_queues(name, 2))
    assert caught.value.obj == name
    assert host.stable(host.links(netns)[name]) == before


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("name", "queues", "field"),
    [("x" * 16, 1, "tap name"), ("a b", 1, "tap name"), ("ok", 0, "queues"), ("ok", 257, "queues")],
)
async def test_bad_arguments_are_refused_before_anything_is_made(
    netns: str, host: Any, name: str, queues: int, field: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        await run_in_netns(netns, lambda: tuntap.open_tap_queues(name, queues))
    assert caught.value.field == field
    assert list(host.links(netns)) == ["lo"]


def test_flags() -> None:
    assert tuntap.tap_flags(1) == tuntap.IFF_TAP | tuntap.IFF_NO_PI | tuntap.IFF_VNET_HDR
    assert tuntap.tap_flags(2) == tuntap.tap_flags(1) | tuntap.IFF_MULTI_QUEUE


def test_queue_fds_close_is_idempotent() -> None:
    fds = tuntap.QueueFds(
        tap=[os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)],
        vhost=[os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)],
    )
    held = fds.tap + fds.vhost
    fds.close()
    fds.close()
    assert fds.tap == []
    assert fds.vhost == []
    for fd in held:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


# --- vhost-net --------------------------------------------------------------------------------
# This host has no /dev/vhost-net. The path is pointed at a file under tmp_path so that the
# same behaviour is tested on a host that has one. The warning is said once per process:
# each test starts from "not said yet".


@pytest.fixture(autouse=True)
def _vhost_warning_not_said(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuntap, "_warned_vhost", False, raising=False)


def test_vhost_missing_falls_back_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tuntap, "VHOST_NET_PATH", str(tmp_path / "vhost-net"))
    with caplog.at_level(logging.WARNING, logger="qmpnet.tuntap"):
        assert tuntap.vhost_available(disabled=False) is False
    assert "vhost-net is missing" in caplog.text
    assert "userspace virtio-net" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qmpnet.tuntap"):
        assert tuntap.vhost_available(disabled=False) is False
    assert caplog.records == []  # once per process, not once per NIC
    with pytest.raises(HostError) as caught:
        tuntap.open_vhost_fds(2)
    assert caught.value.errno == 2


def test_vhost_disabled_is_quiet(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tuntap, "VHOST_NET_PATH", str(tmp_path / "vhost-net"))
    with caplog.at_level(logging.WARNING, logger="qmpnet.tuntap"):
        assert tuntap.vhost_available(disabled=True) is False
    assert caplog.records == []


def test_this_hosts_missing_vhost_net_gives_no_fds(caplog: pytest.LogCaptureFixture) -> None:
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net")
    with caplog.at_level(logging.WARNING, logger="qmpnet.tuntap"):
        assert tuntap.vhost_available(disabled=False) is False
    assert "/dev/vhost-net is missing" in caplog.text


def test_vhost_fds_one_per_queue_cloexec(monkeypatch: pytest.MonkeyPatch) -> None:
    # a character device stands in for /dev/vhost-net: what is tested is fd ownership
    monkeypatch.setattr(tuntap, "VHOST_NET_PATH", "/dev/null")
    assert tuntap.vhost_available(disabled=False) is True
    fds = tuntap.open_vhost_fds(3)
    try:
        assert len(set(fds)) == 3
        assert all(_cloexec(fd) for fd in fds)
        assert all(os.readlink(f"/proc/self/fd/{fd}") == "/dev/null" for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.asyncio
async def test_plumbing_opens_no_vhost_fds_without_the_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from qmpnet.config import Config
    from qmpnet.endpoints.plumbing import open_vhost
    from qmpnet.lifecycle import Operation

    monkeypatch.setattr(tuntap, "VHOST_NET_PATH", str(tmp_path / "vhost-net"))
    op = Operation("hot-plug", "eth0")
    fds = tuntap.QueueFds()
    with caplog.at_level(logging.WARNING, logger="qmpnet.tuntap"):
        await open_vhost(op, Config(), 4, fds)
    assert fds.vhost == []
    assert op.history == []  # no open-vhost step at all
    assert "is missing" in caplog.text


@pytest.mark.asyncio
async def test_taps_held_by_lists_live_taps_even_in_a_deleted_netns(netns: str) -> None:
    """What an unplug's tap-gone check rests on: a tun fd keeps the netns it was opened in,
    so deleting the netns leaves the tap attached; deleting the tap itself detaches the fds,
    which then show no name, though they stay open."""
    kept, gone = unique("t"), unique("t")
    fds = [
        *await run_in_netns(netns, lambda: tuntap.open_tap_queues(kept, 2)),
        *await run_in_netns(netns, lambda: tuntap.open_tap_queues(gone, 2)),
    ]
    try:
        assert {kept, gone} <= (tuntap.taps_held_by(os.getpid()) or set())
        name = os.path.basename(netns)
        for argv in (["ip", "-n", name, "link", "del", gone], ["ip", "netns", "del", name]):
            await asyncio.to_thread(subprocess.run, argv, check=True)
        held = tuntap.taps_held_by(os.getpid()) or set()
        assert kept in held
        assert gone not in held
        assert [_tun_iff(fd) for fd in fds] == [kept, kept, "", ""]
    finally:
        for fd in fds:
            os.close(fd)
    assert tuntap.taps_held_by(1 << 30) is None  # no such process: unknown, not "none held"
