"""The bundled test guest: built from Debian packages, boots in real QEMU, leaves nothing.

Every integration test stands on this fixture, so it is checked against real QEMU under
TCG (no mocks): the guest must reach its init, start iperf3, and :meth:`GuestVM.stop`
must leave no process and no directory behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
from pathlib import Path
from typing import Literal

import pytest
from qemu.qmp import QMPClient

from qmpnet.testing import (
    GuestImage,
    GuestVM,
    GuestVMError,
    build_guest,
    guest_ip_for_mac,
    host_ip_for_mac,
    marker_fields,
)
from qmpnet.testing.vm import UNEXPECTED_EXITS


async def _ask(vm: GuestVM, command: str) -> object:
    """One QMP command on the VM's second monitor, on a connection of its own."""
    qmp = QMPClient("test")
    await qmp.connect(str(vm.mgmt_qmp_path))
    try:
        return await qmp.execute(command)
    finally:
        await qmp.disconnect()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


def _runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is still a process whose command line names ``marker``."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("mac", "guest", "host"),
    [
        ("52:54:00:12:34:56", "169.254.86.2", "169.254.86.1"),
        ("52:54:00:00:00:07", "169.254.7.2", "169.254.7.1"),
        ("52:54:00:00:00:00", "169.254.0.2", "169.254.0.1"),
        ("52:54:00:AA:BB:FF", "169.254.255.2", "169.254.255.1"),
    ],
)
def test_addresses_come_from_the_last_mac_byte(mac: str, guest: str, host: str) -> None:
    assert guest_ip_for_mac(mac) == guest
    assert host_ip_for_mac(mac) == host


@pytest.mark.parametrize("bad", ["", "52:54:00:12:34", "52:54:00:12:34:5g", "52-54-00-12-34-56"])
def test_address_helpers_reject_what_is_not_a_mac(bad: str) -> None:
    with pytest.raises(ValueError, match="not a MAC"):
        guest_ip_for_mac(bad)
    with pytest.raises(ValueError, match="not a MAC"):
        host_ip_for_mac(bad)


def test_marker_fields_reads_key_value_pairs() -> None:
    line = "QMPNET NIC-ADD name=eth0 mac=52:54:00:00:00:07 rxq=2 txq=2 msix=5"
    expected = {"name": "eth0", "mac": "52:54:00:00:00:07", "rxq": "2", "txq": "2", "msix": "5"}
    assert marker_fields(line) == expected
    match = re.search("rxq=2", line)
    assert match is not None
    assert marker_fields(match) == expected


def test_build_is_cached_and_complete(guest_image: GuestImage) -> None:
    again = build_guest()
    assert again == guest_image
    assert guest_image.kernel.stat().st_size > 1_000_000
    assert guest_image.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert re.fullmatch(r"\d+\.\d+\.\d+-.+", guest_image.kernel_version)


@pytest.mark.asyncio
async def test_unknown_accelerator_is_refused_before_launch(
    guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QMPNET_ACCEL", "hvf")
    with pytest.raises(ValueError, match="accel must be one of"):
        await GuestVM.start(guest_image, tmp_path)


@pytest.mark.qemu
@pytest.mark.asyncio
@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_guest_boots_and_stop_leaves_nothing(
    guest_image: GuestImage, tmp_path: Path, machine: Literal["q35", "pc"]
) -> None:
    vm = await GuestVM.start(guest_image, tmp_path, machine=machine, accel="tcg")
    pid, workdir = vm.pid, vm.workdir
    try:
        assert (vm.machine, vm.accel) == (machine, "tcg")
        assert workdir.parent == tmp_path
        assert _runs(pid, workdir.name)
        assert vm.qmp_path.is_socket()
        assert vm.mgmt_qmp_path.is_socket()
        await vm.wait_for(r"^QMPNET IPERF ready$", timeout=30)

        # A cursor hides what came before it; the error carries the console's tail.
        cursor = vm.console_cursor()
        with pytest.raises(GuestVMError, match="QMPNET READY") as caught:
            await vm.wait_for(r"^QMPNET READY$", timeout=0.5, since=cursor)
        assert "QMPNET IPERF ready" in caught.value.console_tail
    finally:
        await vm.stop()
    assert not _runs(pid, workdir.name)
    assert not workdir.exists()
    await vm.stop()  # a second stop is harmless


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_paused_guest_answers_on_the_second_monitor(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    async with await GuestVM.start(guest_image, tmp_path, paused=True, accel="tcg") as vm:
        status = await _ask(vm, "query-status")
        assert isinstance(status, dict)
        assert (status["status"], status["running"]) == ("prelaunch", False)
        pid, workdir = vm.pid, vm.workdir
    assert not _runs(pid, workdir.name)
    assert not workdir.exists()


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_a_qemu_that_dies_by_itself_is_reported_with_its_evidence(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    """An abort (here SIGABRT to the QEMU this test started) is kept for the run's summary.

    The tests that run after such a death fail with a lost connection; the summary line and
    the module fixture's error carry QEMU's exit status and its last stderr lines instead.
    """
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, accel="tcg")
    try:
        assert await vm.died_by_itself() is None
        resource.prlimit(vm.pid, resource.RLIMIT_CORE, (0, 0))  # no core file from this abort
        os.kill(vm.pid, signal.SIGABRT)
        assert await asyncio.wait_for(vm.wait_exit(), 30) == -signal.SIGABRT
        death = await vm.died_by_itself()
        assert death is not None
        assert death.returncode == -signal.SIGABRT
        assert f"QEMU pid {vm.pid} ({vm.workdir.name}) exited by itself" in str(death)
    finally:
        before = len(UNEXPECTED_EXITS)
        await vm.stop()
    (entry,) = UNEXPECTED_EXITS[before:]
    del UNEXPECTED_EXITS[before:]  # this death was the test's own, not one to report
    assert entry.startswith(f"QEMU pid {vm.pid}")
    assert f"status {-signal.SIGABRT}" in entry
    assert await vm.died_by_itself() is None, "a stopped VM is not one that died"


@pytest.mark.qemu
@pytest.mark.asyncio
async def test_tcg_runs_every_vcpu_on_one_thread(guest_image: GuestImage, tmp_path: Path) -> None:
    """A CI run lost a guest to a segfault in QEMU 7.2's multi-threaded TCG during unplugs.

    Most likely another vCPU kept using its old TLB after a hot-(un)plug changed the memory
    map, until its own thread flushed it; with every vCPU on one thread the flush happens
    at once. QEMU's own view must say so: one thread id for all vCPUs.
    """
    async with await GuestVM.start(guest_image, tmp_path, paused=True, accel="tcg") as vm:
        cpus = await _ask(vm, "query-cpus-fast")
    assert isinstance(cpus, list)
    assert len(cpus) == 2
    assert len({cpu["thread-id"] for cpu in cpus}) == 1, cpus
