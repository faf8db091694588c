"""Plug and unplug latency, per lifecycle step and end to end, q35 and pc, 1 and 4 queues.

One VM per machine type; the cycles alternate 1 and 4 queues inside it, so both queue
counts see the same background. A cycle plugs a tap NIC (interworking model ``none``) with
``add_interface(wait_guest=True)``, then unplugs it with ``remove_interface``, and checks with
QEMU and ``ip link`` that nothing is left before the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bench.harness import (
    Context,
    driver_ok_at,
    give_peer,
    ip_links,
    mac,
    marker_at,
    ms,
    name,
    nic_add_re,
    nic_del_re,
    watching,
)
from bench.stats import Report, Table
from qmpnet.hypervisor import QemuHypervisor
from qmpnet.lifecycle import Phase, Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.testing.steps import StepRecorder
from qmpnet.testing.vm import GuestVM, Machine

NOTES = [
    "request = the call to NetworkState.add_interface / remove_interface (tap NIC, model none,"
    " no vhost-net); steps are the lifecycle observers' BEGIN→DONE times; \"before the"
    " first step\" is taking the VM's lock, loading its state, connecting to QMP, QEMU's MAC"
    " check and the journal's one durable record (written at the first step's BEGIN)",
    "DRIVER_OK: x-query-virtio-status polled every 5 ms on the other QMP monitor, from the"
    " moment device_add returned (resolution ~5 ms + one QMP round trip)",
    "add_interface returned: with wait_guest=True the library polls DRIVER_OK itself every"
    " 2 ms, then saves the state (the commit point), so it returns a few ms after DRIVER_OK",
    "guest NIC-ADD marker: the guest's /init polls /sys/class/net every ~50 ms and waits for"
    " stable queue counts (3 reads ~10 ms apart), so the marker lags the kernel's own"
    " detection by ~50-90 ms; it is the guest-visible figure, not the driver's",
    "all host objects gone = remove_interface returned: device_del + DEVICE_DELETED,"
    " netdev_del, tap deleted, state saved; each cycle then checks QEMU (qom-list,"
    " info network) and ip link that the device, netdev and tap are really gone",
    "after the plug returns, the bench gives the tap 169.254.B.1/24 so the guest's ping of"
    " its peer succeeds at once (no retry loops piling up in the guest)",
]


async def run(ctx: Context, report: Report) -> None:
    cycles = ctx.pick(30, 3)
    machines: tuple[Machine, ...] = ("q35", "pc")
    for machine in machines:
        tables = {
            q: report.table(f"plug/unplug latency, {machine}, {q} queue(s)", NOTES) for q in (1, 4)
        }
        async with contextlib.AsyncExitStack() as stack:
            vm = await ctx.boot(stack, machine=machine, root_ports=4)
            net = ctx.network(vm)
            clock = StepRecorder()
            net.observers.append(clock)
            # The first monitor is free (no VM manager here): the independent poller uses it.
            poll = await QmpSession.connect(str(vm.qmp_path), name="bench-poll")
            stack.push_async_callback(poll.close)
            for i in range(cycles):
                for q in (1, 4) if i % 2 == 0 else (4, 1):
                    await _cycle(vm, net, clock, poll, q, tables[q])


async def _cycle(
    vm: GuestVM, net: NetworkState, clock: StepRecorder, poll: QmpSession, queues: int, table: Table
) -> None:
    hw = mac(10 + queues)
    tap = name("p")
    clock.clear()
    device = clock.reached(Step.DEVICE_ADD, Phase.DONE, "hot-plug")
    cursor = vm.console_cursor()
    async with (
        watching(marker_at(vm, nic_add_re(hw), cursor)) as seen,
        watching(driver_ok_at(poll, device)) as ready,
    ):
        t0 = time.monotonic()
        endpoint = await net.add_interface(
            InterfaceDescription(name="eth1", hw_addr=hw),
            model=InterworkingModel.NONE,
            queues=queues,
            tap_name=tap,
            wait_guest=True,
        )
        returned = time.monotonic()
        await give_peer(tap, hw)
        t_ok, t_seen = await ready, await seen
    table.row("plug: before the first step").add(ms(clock.began_at(kind="hot-plug") - t0))
    for step, took in clock.durations("hot-plug"):
        table.row(f"plug step {step}").add(ms(took))
    table.row("plug: request → device_add returned").add(
        ms(clock.ended_at(Step.DEVICE_ADD, kind="hot-plug") - t0)
    )
    table.row("plug: request → DRIVER_OK (5 ms poll)").add(ms(t_ok - t0))
    table.row("plug: request → add_interface returned").add(ms(returned - t0))
    table.row("plug: request → guest NIC-ADD marker").add(ms(t_seen - t0))

    clock.clear()
    cursor = vm.console_cursor()
    async with watching(marker_at(vm, nic_del_re(hw), cursor)) as gone:
        t0 = time.monotonic()
        await net.remove_interface(hw)
        removed = time.monotonic()
        t_gone = await gone
    table.row("unplug: before the first step").add(ms(clock.began_at(kind="unplug") - t0))
    for step, took in clock.durations("unplug"):
        table.row(f"unplug step {step}").add(ms(took))
    table.row("unplug: request → DEVICE_DELETED").add(
        ms(clock.ended_at(Step.DEVICE_DEL, kind="unplug") - t0)
    )
    table.row("unplug: request → all host objects gone").add(ms(removed - t0))
    table.row("unplug: request → guest NIC-DEL marker").add(ms(t_gone - t0))
    await check_gone(poll, endpoint.id, tap)


async def check_gone(session: QmpSession, endpoint_id: str, tap: str) -> None:
    """Raise unless QEMU has neither the device nor the netdev and the host has no tap."""
    hv = QemuHypervisor(session)
    left = []
    if f"{endpoint_id}-dev" in await hv.peripheral_ids():
        left.append("device")
    if f"{endpoint_id}-net" in await session.netdevs():
        left.append("netdev")
    if tap in await asyncio.to_thread(ip_links):
        left.append(f"tap {tap}")
    if left:
        raise RuntimeError(f"after remove_interface, still present: {', '.join(left)}")
