"""qmpnet against libvirt on the same guest, machine type and queue count.

Three sides plug and unplug a virtio tap NIC, in one run, in rotating order per cycle
(L C P, C P L, P L C, …) so that drift and noise hit all of them alike:

- libvirt: ``virsh attach-device DOM if.xml --live`` / ``detach-device`` of an
  ``<interface type='ethernet'>`` into a transient TCG domain of our own libvirtd;
- qmpnet CLI: ``qmpnet add-iface`` / ``del-iface`` processes against a GuestVM's QEMU;
- qmpnet library: ``NetworkState.add_interface`` / ``remove_interface`` in this process, with
  a session per operation (the default) and with a kept session (``connect()``, on a third
  monitor of the same VM, since a monitor serves one client at a time).

Both VMs boot the same kernel and initrd, q35 with the same number of root ports, 2 vCPUs,
256 MiB, and both NICs run without vhost-net. Every side also times the guest-visible event:
from the start of the request (the process's spawn) to the guest's ``NIC-ADD`` marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs

from bench.harness import (
    GUEST_TIMEOUT,
    Context,
    Proc,
    bench_config,
    give_peer,
    ip_links,
    mac,
    marker_at,
    ms,
    name,
    nic_add_re,
    nic_del_re,
    spawn,
    watching,
)
from bench.libvirt import Domain, Libvirtd, interface_xml
from bench.stats import Report, Table
from qmpnet.lifecycle import Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.testing.steps import StepRecorder
from qmpnet.testing.vm import GuestVM

QUEUES = (1, 4)
ROOT_PORTS = 4
SIDES = ("libvirt", "cli", "lib", "kept")
LABEL = {
    "libvirt": "virsh",
    "cli": "qmpnet CLI",
    "lib": "qmpnet library",
    "kept": "qmpnet library, kept session",
}

NOTES = [
    "add/del: wall time of the whole virsh or qmpnet process (spawn → exit), or of the"
    " library call; virsh and the CLI each connect to their daemon or monitor first",
    "guest sees NIC: request start → the guest's serial NIC-ADD marker (the marker lags the"
    " guest kernel by ~50-90 ms: /sys polled every ~50 ms plus queue settling)",
    "ratios: qmpnet / libvirt per cycle (the three sides run back to back in rotating order),"
    " summarized over cycles; < 1 means qmpnet is faster",
    "libvirt's detach-device waits for DEVICE_DELETED (up to 5 s) like qmpnet's unplug",
    "after each add returns, the bench gives the tap (libvirt's or qmpnet's) 169.254.B.1/24,"
    " so the guest's ping of its peer succeeds at once",
]


@attrs.define(eq=False)
class Sides:
    """The two VMs and the means to drive them."""

    ctx: Context
    daemon: Libvirtd
    dom: Domain
    vm: GuestVM
    net: NetworkState
    kept: NetworkState
    qmpnet_bin: str
    scratch: Path

    async def libvirt(self, queues: int, table: Table) -> None:
        assert self.dom.console is not None
        console = self.dom.console
        hw, tap = mac(20 + queues), name("l")
        xml = self.scratch / f"{tap}.xml"
        xml.write_text(interface_xml(hw, tap, queues))
        cursor = console.cursor()
        async with watching(console.wait_for(nic_add_re(hw), GUEST_TIMEOUT, cursor)) as seen:
            p = (
                await self.daemon.virsh("attach-device", self.dom.name, str(xml), "--live")
            ).check()
            await give_peer(tap, hw)
            t_seen = await seen
        _add(table, "libvirt", p, t_seen)
        cursor = console.cursor()
        async with watching(console.wait_for(nic_del_re(hw), GUEST_TIMEOUT, cursor)) as gone:
            p = (
                await self.daemon.virsh("detach-device", self.dom.name, str(xml), "--live")
            ).check()
            await gone
        _del(table, "libvirt", p.wall)
        await _tap_gone(tap)

    async def cli(self, queues: int, table: Table) -> None:
        hw, tap = mac(30 + queues), name("c")
        vm_args = ["--qmp", str(self.vm.mgmt_qmp_path), "--state", str(self.net.store.dir)]
        cursor = self.vm.console_cursor()
        async with watching(marker_at(self.vm, nic_add_re(hw), cursor)) as seen:
            p = (
                await spawn(
                    [
                        self.qmpnet_bin,
                        "add-iface",
                        *vm_args,
                        "--model",
                        "none",
                        "--queues",
                        str(queues),
                        "--tap-name",
                        tap,
                        "--no-vhost",
                        "-",
                    ],
                    stdin=json.dumps({"name": "eth1", "hwAddr": hw}),
                )
            ).check()
            await give_peer(tap, hw)
            t_seen = await seen
        _add(table, "cli", p, t_seen)
        cursor = self.vm.console_cursor()
        async with watching(marker_at(self.vm, nic_del_re(hw), cursor)) as gone:
            p = (await spawn([self.qmpnet_bin, "del-iface", *vm_args, "--mac", hw])).check()
            await gone
        _del(table, "cli", p.wall)
        await _tap_gone(tap)

    async def lib(self, queues: int, table: Table) -> None:
        await self._library("lib", self.net, queues, table)

    async def kept_lib(self, queues: int, table: Table) -> None:
        await self._library("kept", self.kept, queues, table)

    async def _library(self, side: str, net: NetworkState, queues: int, table: Table) -> None:
        hw, tap = mac(40 + queues), name("b")
        clock = StepRecorder()
        net.observers.append(clock)
        cursor = self.vm.console_cursor()
        async with watching(marker_at(self.vm, nic_add_re(hw), cursor)) as seen:
            t0 = time.monotonic()
            try:
                await net.add_interface(
                    InterfaceDescription(name="eth1", hw_addr=hw),
                    model=InterworkingModel.NONE,
                    queues=queues,
                    tap_name=tap,
                )
            finally:
                net.observers.remove(clock)
            wall = time.monotonic() - t0
            await give_peer(tap, hw)
            t_seen = await seen
        table.row(f"add: {LABEL[side]}").add(ms(wall))
        held = clock.ended_at(Step.DEVICE_ADD, kind="hot-plug") - t0
        table.row(f"add → QEMU holds the device: {LABEL[side]}").add(ms(held))
        table.row(f"guest sees NIC: {LABEL[side]}").add(ms(t_seen - t0))
        cursor = self.vm.console_cursor()
        async with watching(marker_at(self.vm, nic_del_re(hw), cursor)) as gone:
            t0 = time.monotonic()
            await net.remove_interface(hw)
            wall = time.monotonic() - t0
            await gone
        _del(table, side, wall)
        await _tap_gone(tap)


def _add(table: Table, side: str, p: Proc, t_seen: float) -> None:
    table.row(f"add: {LABEL[side]}").add(ms(p.wall))
    table.row(f"guest sees NIC: {LABEL[side]}").add(ms(t_seen - p.started))


def _del(table: Table, side: str, wall: float) -> None:
    table.row(f"del: {LABEL[side]}").add(ms(wall))


async def _tap_gone(tap: str) -> None:
    """The side's unplug must have removed its tap (libvirt's and qmpnet's alike)."""
    deadline = time.monotonic() + 5.0
    while tap in await asyncio.to_thread(ip_links):
        if time.monotonic() > deadline:
            raise RuntimeError(f"tap {tap} still exists after its unplug returned")
        await asyncio.sleep(0.05)


def _ratios(table: Table) -> None:
    """Per-cycle qmpnet/libvirt ratios of the rows measured back to back."""
    for what in ("add", "guest sees NIC", "del"):
        base = table.row(f"{what}: {LABEL['libvirt']}").samples
        for side in ("cli", "lib", "kept"):
            ours = table.row(f"{what}: {LABEL[side]}").samples
            ratio = table.row(f"ratio {what}: {LABEL[side]} / virsh", "x")
            for a, b in zip(ours, base, strict=True):
                ratio.add(a / b)
    # What the target names: request → QEMU holds the device, against virsh's whole
    # attach-device (which returns once libvirt has done its device_add).
    base = table.row(f"add: {LABEL['libvirt']}").samples
    for side in ("lib", "kept"):
        ours = table.row(f"add → QEMU holds the device: {LABEL[side]}").samples
        ratio = table.row(f"ratio add → QEMU holds the device: {LABEL[side]} / virsh", "x")
        for a, b in zip(ours, base, strict=True):
            ratio.add(a / b)


async def run(ctx: Context, report: Report) -> None:
    cycles = ctx.pick(30, 3)
    tables = {q: report.table(f"qmpnet vs libvirt, q35, {q} queue(s)", NOTES) for q in QUEUES}
    async with contextlib.AsyncExitStack() as stack:
        daemon = await Libvirtd.start(ctx.scratch("libvirtd"))
        stack.push_async_callback(daemon.stop)
        report.facts["libvirtd start → ready"] = f"{daemon.startup:.1f} s"
        report.facts["libvirtd created the libvirt-qemu user"] = daemon.created_user
        # Boot both guests at once: two TCG boots share the 2 cores for a few seconds.
        dom_task = asyncio.ensure_future(
            Domain.create(
                daemon, ctx.image, ctx.scratch("domain"), machine="q35", root_ports=ROOT_PORTS
            )
        )
        third = ctx.workdir / "versus-m3.sock"
        try:
            vm = await ctx.boot(
                stack,
                machine="q35",
                root_ports=ROOT_PORTS,
                extra_args=("-qmp", f"unix:{third},server=on,wait=off"),
            )
        finally:
            dom = await dom_task
            stack.push_async_callback(dom.destroy)
        ctx.accels.add("tcg")  # <domain type='qemu'> is TCG
        qmpnet_bin = str(Path(sys.executable).with_name("qmpnet"))
        kept = NetworkState.open(ctx.scratch("state"), str(third), bench_config())
        await kept.connect()
        stack.push_async_callback(kept.close)
        sides = Sides(ctx, daemon, dom, vm, ctx.network(vm), kept, qmpnet_bin, ctx.scratch("xml"))
        drive: dict[str, Callable[[int, Table], Awaitable[None]]] = {
            "libvirt": sides.libvirt,
            "cli": sides.cli,
            "lib": sides.lib,
            "kept": sides.kept_lib,
        }
        for i in range(cycles):
            k = i % len(SIDES)
            order = SIDES[k:] + SIDES[:k]
            for q in QUEUES if i % 2 == 0 else QUEUES[::-1]:
                for side in order:
                    await drive[side](q, tables[q])
    for table in tables.values():
        _ratios(table)
