"""The pytest plugin of qmpnet's test tiers: fixtures shared by ``tests/`` and ``integration/``.

Only pytest code imports this module (both conftests ``*`` it; test modules take
:func:`module_vm` from it); everything else of the kit (:mod:`.scene`, :mod:`.probe`,
:mod:`.steps`, :mod:`.guest`, :mod:`.vm`) imports without pytest.

Every host object a test makes carries the run's unique prefix (:data:`~.scene.RUN`) and is
removed at teardown, also on failure; a session-end sweep removes anything with the prefix
that a crashed test left. Only QEMU processes started here are killed, by pid
(``GuestVM.stop``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qmpnet.testing import probe
from qmpnet.testing.guest import GuestImage, build_guest
from qmpnet.testing.scene import RUN, add_netns, del_link, del_netns, sweep, unique
from qmpnet.testing.vm import UNEXPECTED_EXITS, GuestVM

__all__ = [
    "guest_image",
    "isolated_logging",
    "host_link_names",
    "make_netns",
    "module_vm",
    "netns",
    "paused_vm",
    "pytest_terminal_summary",
    "require_root",
    "state_dir",
    "sweep_at_end",
]


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
        made.append(name)
        return add_netns(name)

    yield make
    for name in made:
        del_netns(name)


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
    existing = probe.links()
    for name in names:
        if name in existing:
            del_link(name)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest_asyncio.fixture
async def paused_vm(guest_image: GuestImage, tmp_path: Path) -> AsyncIterator[GuestVM]:
    """A q35 QEMU with 4 root ports that never runs guest code (``-S``)."""
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=4, name=f"{RUN}-paused")
    try:
        yield vm
    finally:
        await vm.stop()


def module_vm(tag: str, *, root_ports: int = 4) -> Any:
    """A fixture: one booted q35 guest shared by a test module, stopped and reaped at its end.

    Use as ``vm = module_vm("crash")``; the tests that take it run on the module's loop.
    """

    @pytest_asyncio.fixture(scope="module", loop_scope="module")
    async def fixture(
        guest_image: GuestImage,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> AsyncIterator[GuestVM]:
        async with await GuestVM.start(
            guest_image, tmp_path_factory.mktemp(tag), root_ports=root_ports, name=f"{RUN}-{tag}"
        ) as vm:
            yield vm
            if death := await vm.died_by_itself():
                raise death  # the module's failures were this, not what they say

    return fixture


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


#: Loggers the CLI's set-up changes process-wide (a test running the CLI in-process would
#: leave them changed for every later test).
_CLI_LOGGERS = ("", "qemu.qmp", "pyroute2", "asyncio", "qmpnet")


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """Give every test the logging levels and root handlers it started with."""
    loggers = [logging.getLogger(name) for name in _CLI_LOGGERS]
    levels = [lg.level for lg in loggers]
    handlers = list(logging.getLogger().handlers)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
