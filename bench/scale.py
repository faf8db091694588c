"""Scale: many NICs in one VM, and many VMs driven from one event loop.

Ramp: 1 … 28 NICs plugged one after another into one q35 VM with 30 root ports (each
plug waits for the guest to report the NIC before the next one), then unplugged in reverse;
repeated, with the per-N medians printed and a least-squares slope of latency over N. At each
N the floor (the bare QMP sequence of ``bench.floor``) plugs and unplugs one NIC of its own on
the last root port first, so qmpnet's growth with N is read against QEMU's own.

Concurrency: 8 VMs are booted once; for 1, 2, 4 and 8 of them, each runs plug+unplug cycles
at the same time from this one event loop, and the aggregate rate is counted. VMs not in
the current group are paused (QMP ``stop``), so an idle guest's console loop does not take
CPU from the measured ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections import defaultdict

from bench.floor import Floor, driver_ok
from bench.harness import (
    GUEST_TIMEOUT,
    Context,
    give_peer,
    mac,
    marker_at,
    ms,
    name,
    nic_add_re,
    nic_del_re,
    watching,
)
from bench.stats import Grid, Report, Table, fmt
from qmpnet.hypervisor import QemuHypervisor
from qmpnet.lifecycle import Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.testing.steps import StepRecorder
from qmpnet.testing.vm import GuestVM

MAX_NICS = 28
GROUPS = (1, 2, 4, 8)


async def run(ctx: Context, report: Report) -> None:
    await _ramp(ctx, report)
    await _concurrent(ctx, report)


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def _ramp(ctx: Context, report: Report) -> None:
    nics = ctx.pick(MAX_NICS, 8)
    ramps = ctx.pick(3, 1)
    #: metric -> N -> samples (ms)
    data: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    metrics = (
        "device_add returned",
        "add_interface returned (DRIVER_OK)",
        "guest NIC-ADD marker",
        "remove_interface returned",
        "floor: device_add returned",
    )
    async with contextlib.AsyncExitStack() as stack:
        vm = await ctx.boot(stack, machine="q35", root_ports=MAX_NICS + 2)
        net = ctx.network(vm)
        clock = StepRecorder()
        net.observers.append(clock)
        monitor = await QmpSession.connect(str(vm.qmp_path), name="bench-scale-floor")
        stack.push_async_callback(monitor.close)
        floor = Floor(monitor, (await QemuHypervisor(monitor).free_slots())[-1])
        for r in range(ramps):
            plugged = []
            for n in range(1, nics + 1):
                took, dev, fds = await floor.plug(1, mac(200 + n % 50))
                try:
                    await driver_ok(monitor, dev)
                finally:
                    for fd in fds:
                        os.close(fd)
                await floor.unplug(dev)
                data[metrics[4]][n].append(ms(took))
                hw = mac(n)
                clock.clear()
                cursor = vm.console_cursor()
                async with watching(marker_at(vm, nic_add_re(hw), cursor)) as seen:
                    t0 = time.monotonic()
                    tap = name("s")
                    await net.add_interface(
                        InterfaceDescription(name=f"eth{n}", hw_addr=hw),
                        model=InterworkingModel.NONE,
                        queues=1,
                        tap_name=tap,
                        wait_guest=True,
                    )
                    returned = time.monotonic()
                    await give_peer(tap, hw)
                    t_seen = await seen
                added = clock.ended_at(Step.DEVICE_ADD, kind="hot-plug")
                data[metrics[0]][n].append(ms(added - t0))
                data[metrics[1]][n].append(ms(returned - t0))
                data[metrics[2]][n].append(ms(t_seen - t0))
                plugged.append(hw)
            for n in range(nics, 0, -1):
                hw = plugged[n - 1]
                cursor = vm.console_cursor()
                async with watching(marker_at(vm, nic_del_re(hw), cursor)) as gone:
                    t0 = time.monotonic()
                    await net.remove_interface(hw)
                    data[metrics[3]][n].append(ms(time.monotonic() - t0))
                    await gone
            print(f"  ramp {r + 1}/{ramps} done", flush=True)

    grid = Grid(
        f"per-NIC latency as N grows (q35, 1 queue; median of {ramps} ramp(s), ms)",
        ("N", "device_add", "add (DRIVER_OK)", "guest marker", "unplug", "floor device_add"),
    )
    for n in range(1, nics + 1):
        grid.lines.append((str(n), *(fmt(statistics.median(data[m][n])) for m in metrics)))
    report.tables.append(grid)

    k = min(5, nics // 2)
    table = report.table(
        f"first {k} vs last {k} NICs of the ramp (ms)",
        [
            "N is the NIC's position: N-1 NICs are already plugged when it is plugged, and"
            " N-1 remain after it is unplugged",
            "device_add includes choosing a slot (query-pci and QOM's peripheral list once the"
            " guest numbered the buses; a QOM walk over the 30 root ports before)",
            "guest marker: the guest's /init polls /sys/class/net every ~50 ms and loops over"
            " all NICs, so its own lag can grow with N (not the driver's)",
        ],
    )
    for m in metrics:
        first, last = table.row(f"{m}, N=1..{k}"), table.row(f"{m}, N={nics - k + 1}..{nics}")
        for n in range(1, k + 1):
            first.samples.extend(data[m][n])
        for n in range(nics - k + 1, nics + 1):
            last.samples.extend(data[m][n])
    slopes = {
        m: _slope([(n, statistics.median(data[m][n])) for n in range(1, nics + 1)]) for m in metrics
    }
    table.notes += [
        "least-squares slope over N of the medians: "
        + "; ".join(f"{m} {v:+.2f} ms/NIC" for m, v in slopes.items())
    ]
    report.facts["ramp slope (ms per extra NIC)"] = {m: round(v, 3) for m, v in slopes.items()}

    def growth(metric: str) -> float:
        head = statistics.median(v for n in range(1, k + 1) for v in data[metric][n])
        tail = statistics.median(v for n in range(nics - k + 1, nics + 1) for v in data[metric][n])
        return tail - head

    ours, bare = growth(metrics[0]), growth(metrics[4])
    report.facts[f"device_add growth N=1..{k} → N={nics - k + 1}..{nics} (ms)"] = {
        "qmpnet": round(ours, 2),
        "floor": round(bare, 2),
        "qmpnet minus floor": round(ours - bare, 2),
    }


async def _concurrent(ctx: Context, report: Report) -> None:
    groups = tuple(g for g in GROUPS if g <= ctx.pick(8, 2))
    cycles = ctx.pick(10, 3)
    table = report.table(
        f"VMs driven concurrently from one event loop ({cycles} plug+unplug cycles per VM,"
        " q35, 1 vCPU, 1 queue)",
        [
            "plug = add_interface(wait_guest=True): returns once the guest driver set"
            " DRIVER_OK; unplug = remove_interface (DEVICE_DELETED, netdev, tap, state)",
            "aggregate = all VMs' plugs / wall time of the whole group run; a cycle is plug,"
            " wait for the guest's NIC-ADD marker (keeps its /init in step), unplug; one"
            " sample per group",
            "VMs outside the group are paused; 2 host cores run all the TCG guests",
        ],
    )
    async with contextlib.AsyncExitStack() as stack:
        vms = await asyncio.gather(
            *(ctx.boot(stack, machine="q35", root_ports=2, vcpus=1) for _ in range(max(groups)))
        )
        nets = [ctx.network(vm) for vm in vms]
        monitors = []
        for vm in vms:
            session = await QmpSession.connect(str(vm.qmp_path), name="bench-pause")
            stack.push_async_callback(session.close)
            monitors.append(session)
        for session in monitors:
            await session.execute("stop")
        for size in groups:
            for session in monitors[:size]:
                await session.execute("cont")
            t0 = time.monotonic()
            await asyncio.gather(
                *(
                    _cycles(vm, net, cycles, table, size, 60 + i)
                    for i, (vm, net) in enumerate(zip(vms[:size], nets[:size], strict=True))
                )
            )
            wall = time.monotonic() - t0
            table.row(f"{size} VM(s): aggregate plugs/s", "1/s").add(size * cycles / wall)
            for session in monitors[:size]:
                await session.execute("stop")


async def _cycles(
    vm: GuestVM, net: NetworkState, cycles: int, table: Table, size: int, last_byte: int
) -> None:
    """Plug and unplug one NIC ``cycles`` times; each VM has its own subnet (last byte)."""
    for _ in range(cycles):
        hw, tap = mac(last_byte), name("v")
        cursor = vm.console_cursor()
        t0 = time.monotonic()
        await net.add_interface(
            InterfaceDescription(name="eth1", hw_addr=hw),
            model=InterworkingModel.NONE,
            queues=1,
            tap_name=tap,
            wait_guest=True,
        )
        t1 = time.monotonic()
        await give_peer(tap, hw)
        await vm.wait_for(nic_add_re(hw), GUEST_TIMEOUT, since=cursor)
        t2 = time.monotonic()
        await net.remove_interface(hw)
        t3 = time.monotonic()
        table.row(f"{size} VM(s): plug").add(ms(t1 - t0))
        table.row(f"{size} VM(s): unplug").add(ms(t3 - t2))
