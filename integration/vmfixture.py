"""The end-to-end suite's shared VM, its independent views, and the after-each-test leak check.

Test modules do ``from vmfixture import *`` (pytest then finds the fixtures in the module).
All their tests run on the module's event loop (``pytestmark`` below), because the booted
VMs and their monitors live as long as the module: one VM per machine type per module,
booted on first use, reused by every test of the module, stopped and reaped at its end.

What the tests compare against never comes from qmpnet:

- the guest's serial markers (``QMPNET NIC-ADD/NIC-ADDR/PING/NIC-DEL``);
- QEMU's *first* monitor, the one a VM manager holds (qmpnet uses the second): ``info
  network``, ``qom-list`` and the ``DEVICE_DELETED`` events QEMU broadcasts to every monitor;
- ``ip -j``, ``tc -j``, busybox ``ping`` and ``/proc/<qemu>/fd`` on the host.

The guest gives the NIC whose MAC ends in byte ``B`` the address ``169.254.B.2/24`` and pings
``169.254.B.1``, so every test draws its MACs from :func:`free_octets` (values of ``B`` no host
address or route uses) and puts ``.1`` on the host end of the link it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio
from qemu.qmp import EventListener, QMPClient

from qmpnet.config import Config, Timeouts
from qmpnet.endpoints import Endpoint
from qmpnet.lifecycle import Phase, Step
from qmpnet.model import InterfaceDescription
from qmpnet.network import NetworkState, host_link
from qmpnet.qmp import connect_clean
from qmpnet.testing import probe
from qmpnet.testing.guest import GuestImage, host_ip_for_mac
from qmpnet.testing.probe import ip_json, neighbour_mac
from qmpnet.testing.scene import RUN, del_link, del_netns, unique
from qmpnet.testing.steps import StepRecorder
from qmpnet.testing.vm import GuestVM, marker_fields

__all__ = [
    "MACHINES",
    "PREFIX",
    "VCPUS",
    "Harness",
    "Plugged",
    "TestVM",
    "VMPool",
    "e2e_leak_check",
    "e2e_name",
    "free_octets",
    "harness",
    "host_ping",
    "mac_for",
    "neighbour_mac",
    "pool",
    "pytestmark",
    "qemu_pids",
    "state_dirs",
    "tap_host_side",
]

pytestmark = pytest.mark.asyncio(loop_scope="module")

MACHINES = ("q35", "pc")
#: Every link, netns and QEMU of this suite is named with it (other suites share RUN).
PREFIX = f"{RUN}E"
VCPUS = 2
#: The guest retries its own ping for ~30 s before it reports a failure.
MARKER_TIMEOUT = 60.0
#: Generous deadlines: two cores are shared with other TCG guests.
TIMEOUTS = Timeouts(connect=15.0, command=30.0, unplug=30.0, guest_ready=60.0)
#: (module, what, machine, seconds): printed at the end of each module.
TIMINGS: list[tuple[str, str, str, float]] = []


# --- addresses -------------------------------------------------------------------------------

_taken: set[int] = set()


def free_octets(count: int) -> list[int]:
    """``count`` values of B with no host address or route in 169.254.B.0/24 yet.

    Values handed out earlier in this process are avoided too, until the process ends.
    """
    used = set(_taken)
    for link in ip_json("addr", "show"):
        for addr in link.get("addr_info", []):
            local = str(addr.get("local", ""))
            if local.startswith("169.254."):
                used.add(int(local.split(".")[2]))
    for route in ip_json("route", "show"):
        match = re.match(r"^169\.254\.(\d+)\.\d+/(\d+)$", str(route.get("dst", "")))
        if match and int(match[2]) >= 24:
            used.add(int(match[1]))
    free = [b for b in range(16, 250) if b not in used]
    if len(free) < count:
        if not _taken:
            pytest.fail(f"fewer than {count} free 169.254.B.0/24 subnets on this host")
        _taken.clear()  # the tests that took them are over: their links are gone
        return free_octets(count)
    chosen = secrets.SystemRandom().sample(free, count)
    _taken.update(chosen)
    return chosen


def mac_for(octet: int) -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(2)) + f":{octet:02x}"


async def host_ping(address: str, dev: str, netns: str = "", tries: int = 10) -> bool:
    """busybox ``ping`` out of ``dev`` (in ``netns``): True at the first echo reply."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.fail("busybox is missing (package busybox-static; `make setup` installs it)")
    cmd = [busybox, "ping", "-c", "1", "-W", "1", "-I", dev, address]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    for _ in range(tries):
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        if await proc.wait() == 0:
            return True
    return False


def e2e_name(kind: str) -> str:
    """A host object name of this suite: the run prefix, ``E``, the kind, a counter."""
    return unique("E" + kind)


def qemu_pids() -> list[int]:
    """Running QEMU processes of this suite (their ``-name`` starts with :data:`PREFIX`)."""
    return probe.qemu_pids(PREFIX)


# --- the VMs ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class TestVM:
    """A booted guest and the VM manager's monitor on it (QEMU's first QMP socket)."""

    __test__ = False  # not a test class, despite the name

    vm: GuestVM
    machine: str
    manager: QMPClient
    #: device id -> when QEMU announced DEVICE_DELETED for it (cleared after each test).
    deleted: dict[str, float] = attrs.field(factory=dict)
    _events: asyncio.Task[None] | None = None
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event)

    @classmethod
    async def boot(cls, image: GuestImage, machine: str) -> TestVM:
        try:
            vm = await GuestVM.start(
                image,
                machine=machine,  # type: ignore[arg-type]
                root_ports=8,
                vcpus=VCPUS,
                name=f"{PREFIX}-{machine}",
                ready_timeout=120.0,
            )
        except Exception as err:
            pytest.fail(f"the test guest did not boot on {machine}: {err}")
        manager = QMPClient(f"{PREFIX}-{machine}-manager")
        try:
            await asyncio.wait_for(connect_clean(manager, str(vm.qmp_path)), 15)
        except BaseException:
            await vm.stop()
            raise
        self = cls(vm, machine, manager)
        self._events = asyncio.create_task(self._follow_deletions())
        return self

    async def _follow_deletions(self) -> None:
        listener = EventListener("DEVICE_DELETED")
        with self.manager.listen(listener):
            while True:
                event = await listener.get()
                device = event.get("data", {}).get("device")
                if device:
                    self.deleted[device] = time.monotonic()
                    self._changed.set()

    async def wait_deleted(self, device: str, timeout: float = MARKER_TIMEOUT) -> float:
        """When QEMU announced DEVICE_DELETED for ``device`` (waits for the event to arrive)."""
        async with asyncio.timeout(timeout):
            while device not in self.deleted:
                self._changed.clear()
                await self._changed.wait()
        return self.deleted[device]

    @property
    def monitor(self) -> probe.Monitor:
        return probe.Monitor(self.manager)

    async def hmp(self, command: str) -> str:
        return await self.monitor.hmp(command)

    async def peripherals(self) -> set[str]:
        return set(await self.monitor.peripherals())

    async def netdev_lines(self) -> list[str]:
        """``info network`` lines of tap netdevs (a fresh guest has none)."""
        return await self.monitor.netdev_lines()

    def tap_fds(self) -> int:
        """How many fds QEMU holds on /dev/net/tun or a macvtap's /dev/tapN."""
        return probe.tap_fd_count(self.vm.pid)

    async def leftovers(self) -> list[str]:
        """Whatever a test left in QEMU: tap netdevs, devices other than the root ports, fds."""
        found = [f"netdev: {line}" for line in await self.netdev_lines()]
        found += [f"device {d}" for d in await self.peripherals() if not d.startswith("rp")]
        if fds := self.tap_fds():
            found.append(f"{fds} tap fds held by QEMU")
        return found

    async def stop(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        with contextlib.suppress(Exception):
            await self.manager.disconnect()
        await self.vm.stop()


@attrs.define(eq=False)
class VMPool:
    """One VM per machine type, booted on first use (a module running only q35 boots one)."""

    image: GuestImage
    vms: dict[str, TestVM] = attrs.field(factory=dict)
    _lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)

    async def get(self, machine: str) -> TestVM:
        async with self._lock:
            if machine not in self.vms:
                self.vms[machine] = await TestVM.boot(self.image, machine)
            return self.vms[machine]

    async def stop(self) -> None:
        for vm in self.vms.values():
            await vm.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(
    guest_image: GuestImage,
    request: pytest.FixtureRequest,
) -> AsyncIterator[VMPool]:
    vms = VMPool(guest_image)
    try:
        yield vms
    finally:
        pids = [t.vm.pid for t in vms.vms.values()]
        await vms.stop()
        _print_timings(request)
        alive = [pid for pid in pids if pid in qemu_pids()]
        assert not alive, f"QEMU processes still alive after stop: {alive}"


def _print_timings(request: pytest.FixtureRequest) -> None:
    module = request.module.__name__
    mine = [t for t in TIMINGS if t[0] == module]
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if not mine or reporter is None:
        return
    lines = [f"{module}: guest-visible timings (ms)"]
    for what in sorted({t[1] for t in mine}):
        for machine in MACHINES:
            values = sorted(t[3] * 1000 for t in mine if t[1] == what and t[2] == machine)
            if values:
                median = values[len(values) // 2]
                lines.append(
                    f"  {what:34} {machine:4} n={len(values):2} median "
                    f"{median:7.1f}  min {values[0]:7.1f}  max {values[-1]:7.1f}"
                )
    # Teardown output is captured; the figures are meant to be seen.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


# --- plugging with evidence ------------------------------------------------------------------


@attrs.frozen
class Plugged:
    """A hot-plugged NIC and what the guest said about it."""

    endpoint: Endpoint
    #: the guest's NIC-ADD marker fields: name, mac, rxq, txq, msix.
    nic: dict[str, str]
    #: the guest's address for it (from NIC-ADDR) and the result of its own ping.
    address: str
    ping: str

    @property
    def mac(self) -> str:
        return self.endpoint.hardware_addr


@attrs.define(eq=False)
class Harness:
    """qmpnet driving one test VM, and the guest's and QEMU's evidence of what happened."""

    vm: TestVM
    state: NetworkState
    module: str
    clock: StepRecorder = attrs.field(factory=StepRecorder)

    def __attrs_post_init__(self) -> None:
        self.state.observers.append(self.clock)

    async def _marker(self, pattern: str, since: int) -> tuple[dict[str, str], float]:
        match = await self.vm.vm.wait_for(pattern, MARKER_TIMEOUT, since=since)
        return marker_fields(match), time.monotonic()

    def record(self, what: str, seconds: float) -> None:
        TIMINGS.append((self.module, what, self.vm.machine, seconds))

    async def plug(
        self,
        desc: InterfaceDescription,
        host_side: Callable[[Endpoint], Any] | None = None,
        **kwargs: Any,
    ) -> Plugged:
        """Hot-plug; ``host_side`` then gives the host end its address; wait for the guest's
        NIC-ADD (our MAC), NIC-ADDR and PING markers."""
        since = self.vm.vm.console_cursor()
        added = asyncio.create_task(
            self._marker(rf"^QMPNET NIC-ADD .*\bmac={re.escape(desc.hw_addr)}\b", since)
        )
        try:
            endpoint = await self.state.add_interface(desc, **kwargs)
            if host_side is not None:
                host_side(endpoint)
            nic, seen = await added
        finally:
            added.cancel()
        kind = kwargs.get("model")
        self.record(
            f"device_add -> NIC-ADD ({kind.value if kind else 'default'})",
            seen - self.clock.last(Step.DEVICE_ADD, Phase.DONE, mac=endpoint.hardware_addr),
        )
        name = re.escape(nic["name"])
        addr, _ = await self._marker(rf"^QMPNET NIC-ADDR name={name}\b", since)
        ping, _ = await self._marker(rf"^QMPNET PING name={name}\b", since)
        return Plugged(endpoint, nic, addr["addr"], ping["result"])

    async def unplug(self, plugged: Plugged) -> dict[str, str]:
        """Unplug; returns the guest's NIC-DEL marker after QEMU announced DEVICE_DELETED."""
        since = self.vm.vm.console_cursor()
        mac = plugged.mac
        gone = asyncio.create_task(
            self._marker(rf"^QMPNET NIC-DEL .*\bmac={re.escape(mac)}\b", since)
        )
        try:
            await self.state.remove_interface(mac)
            nic, _ = await gone
        finally:
            gone.cancel()
        device = f"{plugged.endpoint.id}-dev"
        try:
            deleted = await self.vm.wait_deleted(device)
        except TimeoutError:
            pytest.fail(f"the VM manager's monitor saw no DEVICE_DELETED for {device}")
        self.record(
            "device_del -> DEVICE_DELETED",
            deleted - self.clock.last(Step.DEVICE_DEL, Phase.BEGIN, mac=mac),
        )
        return nic

    async def assert_gone(self, plugged: Plugged) -> None:
        """QEMU has no netdev/device of the NIC and its host link is gone (where it was)."""
        ep = plugged.endpoint
        assert not [
            line for line in await self.vm.netdev_lines() if line.startswith(f"{ep.id}-net:")
        ], "netdev still in 'info network'"
        assert f"{ep.id}-dev" not in await self.vm.peripherals()
        netns = Path(ep.netns_path).name if ep.netns_path else ""
        assert host_link(ep) not in probe.links(netns)


def tap_host_side(endpoint: Endpoint) -> None:
    """Give a host-namespace tap the guest's peer address ``169.254.B.1/24``."""
    subprocess.run(
        [
            "ip",
            "addr",
            "add",
            f"{host_ip_for_mac(endpoint.hardware_addr)}/24",
            "dev",
            host_link(endpoint),
        ],
        check=True,
        capture_output=True,
    )


# --- per-test fixtures -----------------------------------------------------------------------


@pytest.fixture
def state_dirs(tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """Factory of state directories; each must end with no entry and no journal, and is
    removed after the test (no state file outlives a test)."""
    made: list[Path] = []

    def make() -> Path:
        path = tmp_path / f"state{len(made)}"
        made.append(path)
        return path

    yield make
    problems = []
    for path in made:
        problems += probe.state_leftovers(path)
        shutil.rmtree(path, ignore_errors=True)
    assert not problems, problems


@pytest_asyncio.fixture(loop_scope="module")
async def harness(
    pool: VMPool,
    state_dirs: Callable[[], Path],
    request: pytest.FixtureRequest,
) -> Callable[[str], Any]:
    """``await harness(machine)``: qmpnet on that machine's module VM, with a fresh state."""

    async def make(machine: str) -> Harness:
        vm = await pool.get(machine)
        state = NetworkState.open(state_dirs(), str(vm.vm.mgmt_qmp_path), Config(timeouts=TIMEOUTS))
        return Harness(vm, state, request.module.__name__)

    return make


def _remove(links: list[str], netns: list[str]) -> None:
    for name in links:
        del_link(name)
    for name in netns:
        del_netns(name)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def e2e_leak_check(pool: VMPool) -> AsyncIterator[None]:
    """After every test: nothing of this run on the host, nothing of the test in QEMU.

    Host: no link, netns or QEMU named with :data:`PREFIX`, but the module's VMs.
    QEMU (every module VM): no tap netdev, no device but the root ports, no tap fd.
    A leak fails the test, after it has been cleaned so the next test starts clean.
    """
    yield
    links = [name for name in probe.links() if name.startswith(PREFIX)]
    netns = sorted(name for name in probe.netns_names() if name.startswith(PREFIX))
    problems = [f"link {name}" for name in links] + [f"netns {name}" for name in netns]
    module_pids = {t.vm.pid for t in pool.vms.values()}
    problems += [f"QEMU pid {pid}" for pid in qemu_pids() if pid not in module_pids]
    for vm in pool.vms.values():
        problems += [f"{vm.machine}: {p}" for p in await vm.leftovers()]
        vm.deleted.clear()
        vm.manager.events.clear()  # the default listener queues every event: keep it short
    if problems:
        _remove(links, netns)
        for pid in qemu_pids():
            if pid not in module_pids:
                os.kill(pid, signal.SIGKILL)  # a QEMU of this run (its -name says so)
        for vm in list(pool.vms.values()):
            if await vm.leftovers():  # a dirty VM would fail every later test: replace it
                await vm.stop()
                del pool.vms[vm.machine]
        pytest.fail(f"the test left behind: {problems}")
