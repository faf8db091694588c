"""Soak: many plug/unplug cycles into one running guest leak nothing.

``QMPNET_SOAK_CYCLES`` cycles (30 by default for ``make test``; ``make soak`` runs 500) of
hot-plug (waiting for the guest driver) and unplug (waiting for DEVICE_DELETED) of the same
sandbox link. After a warm-up, QEMU's fd count (``/proc/<pid>/fd``), this driver's open fds
(``/proc/self/fd``) and its RSS are taken, and again at the end: they must stay flat (no fd of
the driver's may be open at the end that was not after the warm-up). No link, qdisc, QEMU
device or state entry may be left. The figures are printed.

Then ``QMPNET_SOAK_KEPT_CYCLES`` cycles (100 for ``make test``, 1000 for ``make soak``) with one
kept session (:meth:`NetworkState.connect`): no QMP event may stay queued after a cycle (each
cycle brings DEVICE_DELETED and NIC_RX_FILTER_CHANGED, which qemu.qmp's default listener used to
keep forever) and the driver's RSS after the warm-up may grow by no more than a generous slack.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpnet.config import Config, Timeouts
from qmpnet.errors import PlugError, UnplugTimeoutError
from qmpnet.model import InterfaceDescription
from qmpnet.network import NetworkState
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.probe import (
    OpenFd,
    fd_count,
    fd_targets,
    has_ingress,
    journal_file,
    marked_links,
    open_fds,
    qemu_view,
    rss_kib,
    saved_ids,
    tun_count,
)
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.scene import RUN, make_sandbox
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

CYCLES = int(os.environ.get("QMPNET_SOAK_CYCLES", "30"))
KEPT_CYCLES = int(os.environ.get("QMPNET_SOAK_KEPT_CYCLES", "100"))
WARMUP = max(3, CYCLES // 10)
MAC = "52:54:00:00:07:71"
#: the last cycle's NIC: a MAC no earlier cycle's console marker carries
LAST_MAC = "52:54:00:00:07:72"
#: RSS may wander with the allocator; a leak of even 4 KiB a cycle over 500 cycles is 2 MiB.
RSS_SLACK_KIB = 2048 + 4 * CYCLES


vm = module_vm("sk", root_ports=2)


async def _remove(state: NetworkState, mac: str = MAC) -> PlugError | None:
    try:
        await state.remove_interface(mac)
    except PlugError as err:
        return err
    return None


def _figures(pid: int) -> dict[str, int]:
    gc.collect()
    return {
        "qemu_fds": len(fd_targets(pid)),
        "qemu_tun": tun_count(pid),
        "driver_fds": fd_count(),
        "driver_rss_kib": rss_kib(),
    }


def _opened_since(before: frozenset[OpenFd]) -> list[tuple[int, str]]:
    """The driver's fds open now that were not open at ``before``.

    Not a count: one that closed meanwhile (garbage of an earlier test, collected when the
    collector likes) would hide one that was left open.
    """
    gc.collect()
    return sorted((fd.number, fd.target) for fd in open_fds() - before)


async def test_plug_unplug_cycles_stay_flat(
    vm: GuestVM, make_netns: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert CYCLES >= WARMUP + 1
    netns = make_netns()
    make_sandbox(netns, "eth1", MAC)
    make_sandbox(netns, "eth2", LAST_MAC)
    sandbox_before = set(ip_links(netns))
    host_before = {n for n in ip_links() if n.startswith(RUN)}
    state = NetworkState.open(
        tmp_path / "state", str(vm.mgmt_qmp_path), Config(queues=2, timeouts=Timeouts(unplug=15.0))
    )
    descs = [InterfaceDescription(name="eth1", hw_addr=MAC)] * (CYCLES - 1)
    descs.append(InterfaceDescription(name="eth2", hw_addr=LAST_MAC))
    start = _figures(vm.pid)
    warm: dict[str, int] = {}
    started = time.monotonic()
    late = 0
    for cycle, desc in enumerate(descs):
        cursor = vm.console_cursor()
        ep = await state.add_interface(desc, netns_path=netns, wait_guest=True)
        assert saved_ids(tmp_path / "state") == {ep.id: "plugged"}
        if desc.hw_addr == LAST_MAC:
            # The guest looks for NICs every 50 ms; a cycle can be quicker, and a NIC that
            # comes and goes between two looks is never seen. The last one stays until the
            # guest has it, so its NIC-ADD and then its NIC-DEL must be on the console.
            await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={LAST_MAC} ", 60, since=cursor)
        failure = await _remove(state, desc.hw_addr)
        if failure is not None:
            # Rarely (about once in hundreds of cycles under TCG) the guest misses an
            # unplug request: the entry is pending, and asking again completes it.
            assert isinstance(failure.cause, UnplugTimeoutError), failure
            assert saved_ids(tmp_path / "state") == {ep.id: "unplug-pending"}
            late += 1
            await state.remove_interface(desc.hw_addr)
        if cycle + 1 == WARMUP:
            warm = _figures(vm.pid)
            warm_fds = open_fds()
    elapsed = time.monotonic() - started
    end = _figures(vm.pid)

    with capsys.disabled():
        print(
            f"\nsoak: {CYCLES} plug/unplug cycles in {elapsed:.1f} s "
            f"({elapsed / CYCLES * 1000:.0f} ms a cycle), warm-up {WARMUP} cycles, "
            f"{late} unplug(s) completed by a second request"
        )
        print(f"  {'figure':<16}{'start':>10}{'after warm-up':>15}{'end':>10}")
        for key in end:
            print(f"  {key:<16}{start[key]:>10}{warm[key]:>15}{end[key]:>10}")

    assert end["qemu_fds"] == warm["qemu_fds"], "QEMU's fd count grew"
    assert end["qemu_tun"] == start["qemu_tun"]
    assert not _opened_since(warm_fds), "the driver left fds open"
    assert end["driver_rss_kib"] - warm["driver_rss_kib"] <= RSS_SLACK_KIB
    assert saved_ids(tmp_path / "state") == {}
    assert journal_file(tmp_path / "state") is None
    assert set(ip_links(netns)) == sandbox_before
    assert not has_ingress(netns, "eth1")
    assert not has_ingress(netns, "eth2")
    assert not marked_links(netns)
    assert {n for n in ip_links() if n.startswith(RUN)} == host_before
    view = await qemu_view(vm.qmp_path)
    assert not {d for d in view.devices | view.netdevs if d.startswith("qn")}
    # the guest saw the last NIC go
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={LAST_MAC}$", 60, since=cursor)


async def test_a_kept_session_stays_flat(
    vm: GuestVM, make_netns: Callable[[], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    warmup = max(10, KEPT_CYCLES // 10)
    assert warmup < KEPT_CYCLES
    netns = make_netns()
    make_sandbox(netns, "eth1", MAC)
    state = NetworkState.open(
        tmp_path / "state", str(vm.mgmt_qmp_path), Config(timeouts=Timeouts(unplug=15.0))
    )
    desc = InterfaceDescription(name="eth1", hw_addr=MAC)
    await state.connect()
    queued: list[int] = []
    try:
        for cycle in range(KEPT_CYCLES):
            await state.add_interface(desc, netns_path=netns, wait_guest=True)
            if await _remove(state) is not None:
                await state.remove_interface(MAC)  # a missed unplug request, asked again
            async with state.hypervisor() as hv:
                await hv.qmp.execute("query-status")  # events sent so far have been read
                queued.append(hv.qmp.queued_events)
            if cycle + 1 == warmup:
                warm = _figures(vm.pid)
                warm_fds = open_fds()
        end = _figures(vm.pid)
    finally:
        await state.close()
    grew = end["driver_rss_kib"] - warm["driver_rss_kib"]
    with capsys.disabled():
        print(
            f"\nkept session: {KEPT_CYCLES} cycles, queued events max {max(queued)}, "
            f"RSS {warm['driver_rss_kib']} KiB after {warmup} cycles, {end['driver_rss_kib']} "
            f"KiB at the end ({grew / (KEPT_CYCLES - warmup):+.1f} KiB a cycle)"
        )
    assert max(queued) == 0, f"events stayed queued: {queued[:5]} ... {queued[-5:]}"
    assert grew <= 2048 + 4 * KEPT_CYCLES, "the driver's RSS grew with the cycles"
    assert not _opened_since(warm_fds), "the driver left fds open"
    assert saved_ids(tmp_path / "state") == {}
