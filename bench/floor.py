"""qmpnet against the floor: the bare QMP sequence a hot-plug cannot do without.

The floor is this bench's own code, on the same guest, in the same cycles: open the tap's
queue fds (``IFF_MULTI_QUEUE | IFF_VNET_HDR``, host netns), set the link up, pass each fd
(SCM_RIGHTS + ``getfd``), ``netdev_add``, ``device_add`` on a root port (q35) or a ``pci.0``
slot (pc) it knows is free. No state, no journal, no undo, no checks. Its unplug is
``device_del``, the DEVICE_DELETED event, ``netdev_del``.

Three sides run back to back in rotating order per cycle, so drift and noise hit them alike:
the floor, ``NetworkState`` with a kept session (``connect()``), and ``NetworkState`` with a
session per operation (the default). Each side waits for the guest's DRIVER_OK before it
unplugs, so no side's guest work spills into the next side's timings; the wait is outside
the timed plug phase for the floor (it polls itself) and is ``add_interface(wait_guest=True)``
for the library. Ratios are per cycle: qmpnet / floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from typing import Any

import attrs

from bench.harness import Context, mac, ms, name
from bench.harness import driver_ok as poll_driver_ok
from bench.stats import Report, Table
from qmpnet import tuntap
from qmpnet.hypervisor import QemuHypervisor, Slot, vectors_for
from qmpnet.lifecycle import Phase, Step
from qmpnet.links import Links
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.testing.steps import StepRecorder
from qmpnet.testing.vm import GuestVM, Machine

QUEUES = (1, 4)
SIDES = ("floor", "kept", "per-op")
LABEL = {
    "floor": "floor (bare QMP sequence)",
    "kept": "library, kept session",
    "per-op": "library, session per operation",
}
#: The independent DRIVER_OK poller's period (it runs on the other monitor).
POLL = 0.001

NOTES = [
    "request → device_add returned: QEMU holds the device. Floor: from the first syscall to"
    " device_add's reply. Library: from the add_interface call to the device-add step's"
    " DONE (lock, recovery check, state load, QEMU's MAC check, journal, links, fds,"
    " netdev, slot choice, device_add); the session per operation also connects to QMP",
    "DRIVER_OK → add_interface returned (wait_guest=True): DRIVER_OK as an independent"
    " poller sees it every 1 ms on the other monitor; the library polls it itself every"
    " 2 ms, then saves the state (the commit point, two fsyncs)",
    "unplug: DEVICE_DELETED → returned: netdev_del (the kernel's teardown of the tap when"
    " QEMU closes its last queue fd: ~20 ms, see the README), our host-side check and the"
    " state save",
    "ratios are per cycle (qmpnet / floor), then summarized; the floor has no journal,"
    " no state and no undo, so 1.0 is not reachable",
]


@attrs.define(eq=False)
class Floor:
    """The bare sequence on its own monitor, with a slot this bench keeps free."""

    qmp: QmpSession
    slot: Slot
    count: itertools.count[int] = attrs.field(factory=itertools.count)

    async def plug(self, queues: int, hw: str) -> tuple[float, str, list[int]]:
        """(request → device_add returned, device id, the fds to close after)."""
        i = next(self.count)
        tap, nd, dev = name("f"), f"bf{i}-net", f"bf{i}-dev"
        t0 = time.monotonic()
        fds = tuntap.open_tap_queues(tap, queues)
        async with Links.open() as links:
            await links.set_up(tap)
        names = [f"bf{i}-fd{q}" for q in range(queues)]
        for fd, fd_name in zip(fds, names, strict=True):
            await self.qmp.pass_fd(fd, fd_name)
        await self.qmp.netdev_add_tap(nd, names, [])
        args: dict[str, Any] = {
            "driver": "virtio-net-pci",
            "id": dev,
            "netdev": nd,
            "mac": hw,
            "bus": self.slot.bus,
            "addr": hex(self.slot.addr),
            "romfile": "",
        }
        if queues > 1:
            args.update(mq=True, vectors=vectors_for(queues))
        await self.qmp.device_add(args)
        took = time.monotonic() - t0
        return took, dev, fds

    async def unplug(self, dev: str) -> tuple[float, float]:
        """(request → DEVICE_DELETED, request → netdev_del returned)."""
        t0 = time.monotonic()
        await self.qmp.device_del(dev, 30.0)
        deleted = time.monotonic()
        await self.qmp.netdev_del(dev.removesuffix("-dev") + "-net")
        return deleted - t0, time.monotonic() - t0


async def driver_ok(qmp: QmpSession, dev: str) -> float:
    """When DRIVER_OK shows on ``dev``, polled every :data:`POLL` seconds."""
    return await poll_driver_ok(qmp, dev, period=POLL)


async def run(ctx: Context, report: Report) -> None:
    cycles = ctx.pick(30, 3)
    machines: tuple[Machine, ...] = ("q35", "pc")
    for machine in machines:
        tables = {
            q: report.table(f"qmpnet vs the floor, {machine}, {q} queue(s)", NOTES) for q in QUEUES
        }
        teardown = report.table(f"where netdev_del's time goes, {machine}", TEARDOWN_NOTES)
        async with contextlib.AsyncExitStack() as stack:
            # A third monitor: the kept session holds the second one for the whole run.
            third = ctx.workdir / f"m3-{machine}.sock"
            extra = ("-qmp", f"unix:{third},server=on,wait=off")
            vm = await ctx.boot(stack, machine=machine, root_ports=4, extra_args=extra)
            qmp = await _run_machine(ctx, vm, str(third), cycles, tables, stack)
            await _teardown_cost(qmp, ctx.pick(20, 3), teardown)
        for table in tables.values():
            _ratios(table)


async def _run_machine(
    ctx: Context,
    vm: GuestVM,
    third: str,
    cycles: int,
    tables: dict[int, Table],
    stack: contextlib.AsyncExitStack,
) -> QmpSession:
    """The cycles of one VM; returns the first monitor's session (the stack closes it)."""
    # The first monitor (no VM manager here) serves the floor and the DRIVER_OK poller.
    qmp = await QmpSession.connect(str(vm.qmp_path), name="bench-floor", command_timeout=30.0)
    stack.push_async_callback(qmp.close)
    floor = Floor(qmp, (await QemuHypervisor(qmp).free_slots())[0])
    kept = ctx.network(vm)
    per_op = NetworkState.open(ctx.scratch("state"), third, kept.config)
    await kept.connect()
    stack.push_async_callback(kept.close)
    clock = StepRecorder()
    kept.observers.append(clock)
    per_op.observers.append(clock)
    order = list(SIDES)
    for _ in range(cycles):
        for queues in QUEUES:
            for side in order:
                table = tables[queues]
                if side == "floor":
                    await _floor_cycle(floor, queues, table)
                else:
                    net = kept if side == "kept" else per_op
                    await _library_cycle(net, qmp, clock, side, queues, table)
            order.append(order.pop(0))
    return qmp


async def _floor_cycle(floor: Floor, queues: int, table: Table) -> None:
    took, dev, fds = await floor.plug(queues, mac(60 + queues))
    try:
        await driver_ok(floor.qmp, dev)
    finally:
        for fd in fds:
            os.close(fd)
    table.row(f"request → device_add returned: {LABEL['floor']}").add(ms(took))
    deleted, done = await floor.unplug(dev)
    table.row(f"unplug: request → DEVICE_DELETED: {LABEL['floor']}").add(ms(deleted))
    table.row(f"unplug: DEVICE_DELETED → returned: {LABEL['floor']}").add(ms(done - deleted))


async def _library_cycle(
    net: NetworkState,
    poll: QmpSession,
    clock: StepRecorder,
    side: str,
    queues: int,
    table: Table,
) -> None:
    hw, tap = mac(70 + queues), name("l")
    clock.clear()
    added = clock.reached(Step.DEVICE_ADD, Phase.DONE, "hot-plug")

    async def ready() -> float:
        return await driver_ok(poll, f"{(await added).endpoint_id}-dev")

    seen = asyncio.ensure_future(ready())
    try:
        t0 = time.monotonic()
        await net.add_interface(
            InterfaceDescription(name="eth1", hw_addr=hw),
            model=InterworkingModel.NONE,
            queues=queues,
            tap_name=tap,
            wait_guest=True,
        )
        returned = time.monotonic()
        t_ok = await seen
    finally:
        seen.cancel()
        with contextlib.suppress(BaseException):
            await seen
    table.row(f"request → device_add returned: {LABEL[side]}").add(
        ms(clock.ended_at(Step.DEVICE_ADD, kind="hot-plug") - t0)
    )
    table.row(f"DRIVER_OK → add_interface returned: {LABEL[side]}").add(ms(returned - t_ok))
    clock.clear()
    t0 = time.monotonic()
    await net.remove_interface(hw)
    done = time.monotonic()
    deleted = clock.ended_at(Step.DEVICE_DEL, kind="unplug")
    table.row(f"unplug: request → DEVICE_DELETED: {LABEL[side]}").add(ms(deleted - t0))
    table.row(f"unplug: DEVICE_DELETED → returned: {LABEL[side]}").add(ms(done - deleted))


TEARDOWN_NOTES = [
    "a tap netdev without a NIC, 1 and 4 queues: netdev_del while QEMU holds the only copy"
    " of each queue fd, versus netdev_del while the bench keeps a dup of each, whose close()"
    " the bench then times: the cost moves with the last close(), so it is the kernel"
    " unregistering the non-persistent tap (RCU waits), not QEMU and not qmpnet's polling",
]


async def _teardown_cost(qmp: QmpSession, cycles: int, table: Table) -> None:
    for i in range(cycles):
        for queues in QUEUES:
            for keep in (False, True):
                tap, nd = name("d"), f"bd{i}q{queues}{int(keep)}"
                fds = tuntap.open_tap_queues(tap, queues)
                names = [f"{nd}-fd{q}" for q in range(queues)]
                for fd, fd_name in zip(fds, names, strict=True):
                    await qmp.pass_fd(fd, fd_name)
                await qmp.netdev_add_tap(nd, names, [])
                if not keep:
                    for fd in fds:
                        os.close(fd)
                t0 = time.monotonic()
                await qmp.netdev_del(nd)
                took = time.monotonic() - t0
                if keep:
                    t1 = time.monotonic()
                    for fd in fds:
                        os.close(fd)
                    table.row(f"{queues} q: then the bench's close() of its dups").add(
                        ms(time.monotonic() - t1)
                    )
                holder = "bench keeps a dup" if keep else "QEMU holds the last fd"
                table.row(f"{queues} q: netdev_del, {holder}").add(ms(took))


def _ratios(table: Table) -> None:
    """Per-cycle qmpnet / floor ratios of the rows measured back to back."""
    for what in ("request → device_add returned", "unplug: DEVICE_DELETED → returned"):
        base = table.row(f"{what}: {LABEL['floor']}").samples
        for side in ("kept", "per-op"):
            ours = table.row(f"{what}: {LABEL[side]}").samples
            ratio = table.row(f"ratio {what}: {LABEL[side]} / floor", "x")
            for a, b in zip(ours, base, strict=True):
                ratio.add(a / b)
