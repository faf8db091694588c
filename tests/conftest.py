"""Shared fixtures of the test tiers, plus a few helpers local to ``tests/``.

The fixtures (run prefix, fresh netns, host link names, the guest image, a paused VM) come
from :mod:`qmpnet.testing.fixtures`; what is here builds the host topology a CNI plugin
would leave behind (a veth with its far end in a second netns) and reads the independent
views (``ip -j``, ``tc -j``, ``/proc/<pid>/fd``) the tests compare against.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import settings

from qmpnet.testing.fixtures import *  # noqa: F403
from qmpnet.testing.fixtures import run, unique

# No timed assertions: hypothesis' per-example deadline would be one on a loaded machine.
settings.register_profile("qmpnet", deadline=None)
settings.load_profile("qmpnet")


def ns_name(path: str) -> str:
    """``/run/netns/x`` -> ``x`` (what ``ip -n`` wants)."""
    return Path(path).name


def ip_links(netns: str = "") -> dict[str, Any]:
    """``ip -d -j link show`` in a netns path (or the host), by link name."""
    cmd = ["ip", "-d", "-j", *(["-n", ns_name(netns)] if netns else []), "link", "show"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {link["ifname"]: link for link in json.loads(out.stdout or "[]")}


def tc_qdiscs(netns: str, dev: str) -> list[dict[str, Any]]:
    """``tc -j qdisc show dev DEV``; empty when the device is gone."""
    cmd = ["tc", "-j", *(["-n", ns_name(netns)] if netns else []), "qdisc", "show", "dev", dev]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []
    return list(json.loads(out.stdout or "[]"))


def stable_view(link: dict[str, Any]) -> dict[str, Any]:
    """A link as ``ip -j`` shows it, without the fields that change on their own."""
    return {k: v for k, v in link.items() if k not in ("stats", "stats64", "operstate")}


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition with a generous deadline (changes show up in netlink after a while)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s: {what or check}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def tun_fds(pid: int) -> list[str]:
    """The fds of process ``pid`` that are open on /dev/net/tun (tap queues)."""
    return _fds_to(pid, "/dev/net/tun")


def _fds_to(pid: int, target: str) -> list[str]:
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                found.append(fd)
        except FileNotFoundError:
            continue
    return found


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return out


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a host tool (``ip``, ``tc``) to set up a test; a failure fails the test."""
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


class HostView:
    """The independent tools' view of the host, handed to tests by the ``host`` fixture."""

    sh = staticmethod(sh)

    ns_name = staticmethod(ns_name)
    links = staticmethod(ip_links)
    qdiscs = staticmethod(tc_qdiscs)
    stable = staticmethod(stable_view)
    wait_until = staticmethod(wait_until)
    tun_fds = staticmethod(tun_fds)
    fd_targets = staticmethod(fd_targets)


@pytest.fixture
def host() -> HostView:
    return HostView()


@attrs.frozen
class VethPair:
    """A CNI-like veth: ``inner`` in the sandbox netns, ``outer`` in a far netns."""

    sandbox: str
    inner: str
    far: str
    outer: str
    mac: str
    far_ip: str


@pytest.fixture
def cni_veth(make_netns: Callable[[], str]) -> Callable[..., VethPair]:
    """Factory: the veth a CNI plugin would make, its far end holding ``169.254.B.1/24``.

    ``B`` is the MAC's last byte, as the test guest expects; the far end is in its own
    netns, so no traffic ever reaches the host's links. Both netns go at teardown.
    """

    def make(mac: str = "52:54:00:00:00:21", sandbox: str | None = None) -> VethPair:
        sandbox = sandbox or make_netns()
        far = make_netns()
        inner, outer = unique("v"), unique("w")
        last = int(mac.rsplit(":", 1)[1], 16)
        far_ip = f"169.254.{last}.1"
        sb, fr = ns_name(sandbox), ns_name(far)
        run("ip", "-n", sb, "link", "add", inner, "type", "veth", "peer", "name", outer)
        run("ip", "-n", sb, "link", "set", inner, "address", mac)
        run("ip", "-n", sb, "link", "set", outer, "netns", fr)
        run("ip", "-n", fr, "addr", "add", f"{far_ip}/24", "dev", outer)
        run("ip", "-n", fr, "link", "set", outer, "up")
        return VethPair(sandbox, inner, far, outer, mac, far_ip)

    return make
