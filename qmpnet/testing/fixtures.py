"""Pytest fixtures shared by ``tests/`` and ``integration/`` (imported by both conftests).

Every host object a test makes carries the run's unique prefix (:data:`RUN`) and is removed
at teardown, also on failure; a session-end sweep removes anything with the prefix that a
crashed test left. Only QEMU processes started here are killed, by pid (``GuestVM.stop``).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qmpnet.testing.guest import GuestImage, build_guest
from qmpnet.testing.vm import UNEXPECTED_EXITS, GuestVM

#: Unique per test run; 4 characters, so names like ``{RUN}t12`` stay within IFNAMSIZ.
RUN = "q" + secrets.token_hex(2)[:3]
_counter = itertools.count()


def unique(kind: str) -> str:
    """A host object name with the run prefix: ``q1a2t7`` (≤ 15 bytes)."""
    return f"{RUN}{kind}{next(_counter)}"


def ip_json(*args: str, netns: str = "") -> Any:
    """What ``ip -j`` says: the independent view the tests compare against."""
    cmd = ["ip", "-d", "-j", *(["-n", netns] if netns else []), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []
    return json.loads(out.stdout or "[]")


def links(netns: str = "") -> dict[str, Any]:
    return {link["ifname"]: link for link in ip_json("link", "show", netns=netns)}


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def sweep() -> list[str]:
    """Remove every link and netns carrying the run prefix; return what was found."""
    found = []
    for name in links():
        if name.startswith(RUN):
            found.append(name)
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    for entry in ip_json("netns", "list"):
        name = entry.get("name", "")
        if name.startswith(RUN):
            found.append("netns " + name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return found


@pytest.fixture(scope="session", autouse=True)
def sweep_at_end() -> Iterator[None]:
    """At the session's end, remove what carries the run prefix (public: conftests ``*`` it)."""
    yield
    left = sweep()
    if left:
        # Teardown is the first line of defence; this makes a leak visible, not silent.
        print(f"\nqmpnet tests: swept leftovers {left}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the QEMU processes that died by themselves: the cause behind lost connections."""
    if UNEXPECTED_EXITS:
        terminalreporter.section("QEMU exited by itself")
        for text in UNEXPECTED_EXITS:
            terminalreporter.write_line(text)
        UNEXPECTED_EXITS.clear()  # both conftests import this hook: print once


@pytest.fixture(scope="session")
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (taps, netns, QEMU): run them as root")


@pytest.fixture
def make_netns(require_root: None) -> Iterator[Callable[[], str]]:
    """Factory: a fresh named netns per call, deleted at teardown. Returns its path."""
    made: list[str] = []

    def make() -> str:
        name = unique("n")
        run("ip", "netns", "add", name)
        made.append(name)
        run("ip", "-n", name, "link", "set", "lo", "up")
        return f"/run/netns/{name}"

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    return make_netns()


@pytest.fixture
def host_link_names(require_root: None) -> Iterator[Callable[[str], str]]:
    """Factory for host-namespace link names; whatever exists under them is deleted after."""
    names: list[str] = []

    def make(kind: str = "t") -> str:
        name = unique(kind)
        names.append(name)
        return name

    yield make
    existing = links()
    for name in names:
        if name in existing:
            subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest_asyncio.fixture
async def paused_vm(guest_image: GuestImage, tmp_path: Path) -> AsyncIterator[GuestVM]:
    """A q35 QEMU with 4 root ports that never runs guest code (``-S``)."""
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=4,
                             name=f"{RUN}-paused")
    try:
        yield vm
    finally:
        await vm.stop()


def module_vm(tag: str, *, root_ports: int = 4) -> Any:
    """A fixture: one booted q35 guest shared by a test module, stopped and reaped at its end.

    Use as ``vm = module_vm("crash")``; the tests that take it run on the module's loop.
    """
    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def fixture(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory,
                      ) -> AsyncIterator[GuestVM]:
        async with await GuestVM.start(guest_image, tmp_path_factory.mktemp(tag),
                                       root_ports=root_ports, name=f"{RUN}-{tag}") as vm:
            yield vm
            if death := await vm.died_by_itself():
                raise death  # the module's failures were this, not what they say
    return fixture


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"
