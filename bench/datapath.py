"""Data path: iperf3 host ↔ guest through a hot-plugged NIC and a cold-plugged one.

Four q35 guests with one virtio NIC each: hot-plugged by qmpnet (tap model ``none``) or
given to QEMU at launch (``-netdev tap,ifname=…,queues=N,vhost=off``), with 1 or 4 queue
pairs, both on the first root port, both without vhost-net. The host end of each tap gets
169.254.B.1/24, the guest 169.254.B.2 (B = the MAC's last byte); the guest's own ping
of the host must succeed before any measurement. The guest runs ``iperf3 -s`` from boot.

Runs alternate hot and cold (hot first in one round, cold first in the next); only the
guest being measured runs, the others are paused, since under TCG the guest's vCPUs are
the bottleneck and an idle guest would still take host CPU. The iperf3 client binds to the
tap (``--bind-dev``), so another link with the same subnet cannot take the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess

import attrs

from bench.harness import Context, mac, name
from bench.stats import Report, Table
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.testing.guest import guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.iperf import throughput
from qmpnet.testing.vm import GuestVM

#: (queues, kind) -> the MAC's last byte, distinct so the four subnets never overlap.
LAST_BYTE = {(1, "hot"): 201, (1, "cold"): 202, (4, "hot"): 203, (4, "cold"): 204}
DIRECTIONS = (("host → guest", False), ("guest → host", True))


@attrs.define(eq=False)
class Target:
    queues: int
    kind: str
    hw: str
    tap: str
    vm: GuestVM | None = None
    monitor: QmpSession | None = None
    net: NetworkState | None = None

    @property
    def streams(self) -> int:
        return self.queues

    async def pause(self, running: bool) -> None:
        assert self.monitor is not None
        await self.monitor.execute("cont" if running else "stop")


def _cold_args(t: Target) -> list[str]:
    dev = f"virtio-net-pci,netdev=coldnet,id=coldnic,mac={t.hw},bus=rp0,addr=0x0,romfile="
    if t.queues > 1:
        dev += f",mq=on,vectors={2 * t.queues + 2}"
    return [
        "-netdev",
        f"tap,id=coldnet,ifname={t.tap},script=no,downscript=no,queues={t.queues},vhost=off",
        "-device",
        dev,
    ]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], capture_output=True, text=True, check=True)


async def _iperf(t: Target, seconds: int, reverse: bool) -> float:
    return await throughput(
        guest_ip_for_mac(t.hw), reverse=reverse, seconds=seconds, streams=t.streams, bind_dev=t.tap
    )


async def run(ctx: Context, report: Report) -> None:
    rounds, seconds = ctx.pick(4, 1), ctx.pick(2, 1)
    targets = {
        key: Target(key[0], key[1], mac(b), name("h" if key[1] == "hot" else "k"))
        for key, b in LAST_BYTE.items()
    }
    tables = {
        q: report.table(
            f"iperf3 through a hot- vs cold-plugged NIC, {q} queue(s), {q} stream(s)",
            [
                f"{seconds} s per run after a 1 s omitted warm-up, receiver's rate; TCG: the"
                " guest's vCPUs bound the rate, so the figure measures emulation more than"
                " the NIC",
                "ratio hot/cold: per round, runs back to back; ≥ 1 means the"
                " hot-plugged NIC is no slower",
            ],
        )
        for q in (1, 4)
    }
    for table in tables.values():  # a fixed row order, whichever side runs first
        for label, _ in DIRECTIONS:
            for kind in ("hot", "cold"):
                table.row(f"{label}: {kind}-plugged", "Mbit/s")
    async with contextlib.AsyncExitStack() as stack:
        vms = await asyncio.gather(
            *(
                ctx.boot(
                    stack,
                    machine="q35",
                    root_ports=2,
                    extra_args=_cold_args(t) if t.kind == "cold" else (),
                )
                for t in targets.values()
            )
        )
        for t, vm in zip(targets.values(), vms, strict=True):
            t.vm = vm
            t.monitor = await QmpSession.connect(str(vm.qmp_path), name="bench-pause")
            stack.push_async_callback(t.monitor.close)
            if t.kind == "hot":
                t.net = ctx.network(vm)
                await t.net.add_interface(
                    InterfaceDescription(name="eth0", hw_addr=t.hw),
                    model=InterworkingModel.NONE,
                    queues=t.queues,
                    tap_name=t.tap,
                    wait_guest=True,
                )
            await asyncio.to_thread(_ip, "addr", "add", f"{host_ip_for_mac(t.hw)}/24", "dev", t.tap)
            await asyncio.to_thread(_ip, "link", "set", t.tap, "up")
        for t in targets.values():
            assert t.vm is not None
            ping = rf"^QMPNET PING .*peer={re.escape(host_ip_for_mac(t.hw))} result=ok"
            await t.vm.wait_for(ping, 120.0)
            await t.pause(running=False)

        for r in range(rounds):
            for q in (1, 4):
                kinds = ("hot", "cold") if (r + q) % 2 else ("cold", "hot")
                for kind in kinds:
                    t = targets[(q, kind)]
                    await t.pause(running=True)
                    for label, reverse in DIRECTIONS:
                        rate = await _iperf(t, seconds, reverse)
                        tables[q].row(f"{label}: {kind}-plugged", "Mbit/s").add(rate)
                    await t.pause(running=False)

        for t in targets.values():
            if t.net is not None:
                await t.pause(running=True)
                await t.net.remove_interface(t.hw)
    for table in tables.values():
        _ratios(table)


def _ratios(table: Table) -> None:
    for label, _ in DIRECTIONS:
        hot = table.row(f"{label}: hot-plugged", "Mbit/s").samples
        cold = table.row(f"{label}: cold-plugged", "Mbit/s").samples
        ratio = table.row(f"ratio {label}: hot / cold", "x")
        for a, b in zip(hot, cold, strict=True):
            ratio.add(a / b)
