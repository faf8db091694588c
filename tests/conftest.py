"""Shared fixtures of the test tiers, plus a few helpers local to ``tests/``.

The fixtures (run prefix, fresh netns, host link names, the guest image, a paused VM) come
from :mod:`qmpnet.testing.fixtures`; what is here hands the tests the host topology a CNI
plugin would leave behind (:func:`qmpnet.testing.scene.cni_veth`) and the independent views
(``ip -j``, ``tc -j``, ``/proc/<pid>/fd``, from :mod:`qmpnet.testing.probe`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest
from hypothesis import settings

from qmpnet.testing import probe
from qmpnet.testing.fixtures import *  # noqa: F403
from qmpnet.testing.scene import VethPair, cni_veth

# No timed assertions: hypothesis' per-example deadline would be one on a loaded machine.
settings.register_profile("qmpnet", deadline=None)
settings.load_profile("qmpnet")


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll a condition with a generous deadline (changes show up in netlink after a while)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout} s: {what or check}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a host tool (``ip``, ``tc``) to set up a test; a failure fails the test."""
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


class HostView:
    """The independent tools' view of the host, handed to tests by the ``host`` fixture."""

    sh = staticmethod(sh)

    ns_name = staticmethod(probe.ns_name)
    links = staticmethod(probe.links)
    qdiscs = staticmethod(probe.qdiscs)
    stable = staticmethod(probe.stable_view)
    wait_until = staticmethod(wait_until)
    tun_fds = staticmethod(probe.tun_fds)
    fd_targets = staticmethod(probe.fd_targets)


@pytest.fixture
def host() -> HostView:
    return HostView()


@pytest.fixture(name="cni_veth")
def cni_veth_factory(make_netns: Callable[[], str]) -> Callable[..., VethPair]:
    """Factory: the veth a CNI plugin would make, its far end holding ``169.254.B.1/24``.

    ``B`` is the MAC's last byte, as the test guest expects; the far end is in its own
    netns, so no traffic ever reaches the host's links. Both netns go at teardown.
    """

    def make(mac: str = "52:54:00:00:00:21", sandbox: str | None = None) -> VethPair:
        return cni_veth(sandbox or make_netns(), make_netns(), mac)

    return make
