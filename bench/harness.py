"""Shared pieces of every bench: the run context, names, timed processes, clocks.

Times are ``time.monotonic()`` everywhere: the event loop's clock is the same one, so a stamp
taken in a worker thread (a timed child process) and one taken in the loop (a console line)
can be subtracted.

Every host object a bench makes carries the run prefix :data:`PREFIX` (taps, libvirt
domain names), so :func:`sweep_links` can remove leftovers at the end, also after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import secrets
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

import attrs

from qmpnet.config import Config, Timeouts
from qmpnet.network import NetworkState
from qmpnet.qmp import VIRTIO_CONFIG_S_DRIVER_OK, QmpSession
from qmpnet.testing.guest import GuestImage, host_ip_for_mac
from qmpnet.testing.steps import StepEvent
from qmpnet.testing.vm import GuestVM, Machine

#: Run prefix of every link and domain a bench makes: 5 characters, names stay <= 15 bytes.
PREFIX = "qb" + secrets.token_hex(2)[:3]
_names = itertools.count()
_macs = itertools.count(1)

#: Deadlines (seconds) for waits on the guest; generous, since the machine is shared.
GUEST_TIMEOUT = 60.0
#: The DRIVER_OK poller's period: the resolution of "request -> driver ready".
POLL_PERIOD = 0.005


def name(kind: str) -> str:
    """A unique host object name with the run prefix, e.g. ``qb1a2t7``."""
    made = f"{PREFIX}{kind}{next(_names)}"
    assert len(made) <= 15, made
    return made


def mac(last: int) -> str:
    """A MAC unique in this run whose last byte is ``last`` (the guest's 169.254.<last>.2)."""
    if not 1 <= last <= 254:
        raise ValueError(f"last MAC byte must be 1..254, got {last}")
    n = next(_macs)
    return f"52:54:00:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}:{last:02x}"


def bench_config() -> Config:
    """The driver settings every bench uses: no vhost-net (libvirt's side is told the same)."""
    return Config(
        disable_vhost_net=True,
        timeouts=Timeouts(unplug=30.0, guest_ready=GUEST_TIMEOUT, command=30.0, connect=30.0),
    )


@attrs.define(eq=False)
class Context:
    """One bench run: the guest image, a scratch directory, the mode, what was seen."""

    image: GuestImage
    workdir: Path
    quick: bool
    #: accelerators of every VM that ran
    accels: set[str] = attrs.field(factory=set)

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def scratch(self, kind: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.workdir))

    async def boot(
        self,
        stack: contextlib.AsyncExitStack,
        *,
        machine: Machine = "q35",
        root_ports: int = 4,
        vcpus: int = 2,
        extra_args: Sequence[str] = (),
        paused: bool = False,
    ) -> GuestVM:
        """Start a guest whose stop is registered on ``stack`` (runs also on failure)."""
        vm = await GuestVM.start(
            self.image,
            self.workdir,
            machine=machine,
            root_ports=root_ports,
            vcpus=vcpus,
            memory_mb=256,
            extra_args=extra_args,
            paused=paused,
            name="qb",
            ready_timeout=180.0,
        )
        stack.push_async_callback(vm.stop)
        self.accels.add(vm.accel)
        return vm

    def network(self, vm: GuestVM) -> NetworkState:
        return NetworkState.open(self.scratch("state"), str(vm.mgmt_qmp_path), bench_config())


# --- child processes -----------------------------------------------------------------------

#: GNU time (package ``time``): it forks the command itself, so the command's peak RSS is
#: its own. A child of this (large) Python process would carry our RSS high-water mark
#: through its fork and exec into ``ru_maxrss``.
GNU_TIME = "/usr/bin/time"


@attrs.frozen
class Proc:
    """A finished child: exit status, wall time, peak RSS (when asked for), output."""

    argv: tuple[str, ...]
    returncode: int
    started: float
    wall: float
    maxrss_kib: int | None
    stdout: str
    stderr: str

    def check(self) -> Proc:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv)} exited with {self.returncode}: "
                f"{self.stderr.strip() or self.stdout.strip()}"
            )
        return self


def _run_blocking(
    argv: Sequence[str], stdin: str | None, env: dict[str, str] | None, rss: bool
) -> Proc:
    with tempfile.NamedTemporaryFile("r") as rss_file:
        cmd = [GNU_TIME, "-f", "%M", "-o", rss_file.name, *argv] if rss else list(argv)
        started = time.monotonic()
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=env, check=False
        )
        wall = time.monotonic() - started
        maxrss = int(rss_file.read().split()[-1]) if rss else None
    return Proc(tuple(argv), done.returncode, started, wall, maxrss, done.stdout, done.stderr)


async def spawn(
    argv: Sequence[str],
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    *,
    rss: bool = False,
) -> Proc:
    """Run a whole process to its end in a worker thread; the loop keeps serving consoles.

    With ``rss``, the command runs under GNU time for its peak RSS (its wall time then
    includes time's own fork and exec, about a millisecond).
    """
    return await asyncio.to_thread(_run_blocking, argv, stdin, env, rss)


async def give_peer(tap: str, hw: str) -> None:
    """Give the host end of ``tap`` the address the guest pings for the NIC ``hw``.

    The guest's /init pings 169.254.B.1 once a NIC is up and retries for ~30 s when nobody
    answers; with the address there one ping succeeds, so plug after plug does not pile up
    retry loops (forks) that would load the TCG guest and skew its timings.
    """
    (await spawn(["ip", "addr", "add", f"{host_ip_for_mac(hw)}/24", "dev", tap])).check()


def ip_links() -> dict[str, Any]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=False)
    return {link["ifname"]: link for link in json.loads(out.stdout or "[]")}


def sweep_links() -> list[str]:
    """Delete every host link carrying the run prefix; return their names."""
    found = [n for n in ip_links() if n.startswith(PREFIX)]
    for n in found:
        subprocess.run(["ip", "link", "del", n], capture_output=True, check=False)
    return found


# --- clocks --------------------------------------------------------------------------------


async def driver_ok_at(
    session: QmpSession, added: asyncio.Future[StepEvent], timeout: float = GUEST_TIMEOUT
) -> float:
    """When the guest driver set DRIVER_OK on the device whose ``device_add`` is ``added``
    (a :meth:`StepRecorder.reached` future), polled every 5 ms on ``session``."""
    return await driver_ok(session, f"{(await added).endpoint_id}-dev", timeout=timeout)


async def driver_ok(
    session: QmpSession, dev_id: str, *, period: float = POLL_PERIOD, timeout: float = GUEST_TIMEOUT
) -> float:
    """When the guest driver set DRIVER_OK on ``dev_id``, polled every ``period`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        status = await session.virtio_status(dev_id)
        now = time.monotonic()
        if status & VIRTIO_CONFIG_S_DRIVER_OK:
            return now
        if now > deadline:
            raise TimeoutError(f"guest driver of {dev_id} not ready within {timeout:g} s")
        await asyncio.sleep(period)


def nic_add_re(hw: str) -> re.Pattern[str]:
    return re.compile(rf"^QMPNET NIC-ADD .*\bmac={re.escape(hw.lower())}\b")


def nic_del_re(hw: str) -> re.Pattern[str]:
    return re.compile(rf"^QMPNET NIC-DEL .*\bmac={re.escape(hw.lower())}\b")


async def marker_at(
    vm: GuestVM, pattern: re.Pattern[str], since: int, timeout: float = GUEST_TIMEOUT
) -> float:
    """When a console line matching ``pattern`` arrived (start this before the request)."""
    await vm.wait_for(pattern, timeout, since=since)
    return time.monotonic()


@contextlib.asynccontextmanager
async def watching(stamp: Coroutine[Any, Any, float]) -> AsyncIterator[asyncio.Task[float]]:
    """Run a stamping coroutine alongside the body; cancel it if the body fails."""
    task = asyncio.ensure_future(stamp)
    try:
        yield task
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise


def ms(seconds: float) -> float:
    return seconds * 1000.0
