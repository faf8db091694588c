"""qmpnet through qmpnetd against libvirt, in one run, on the same guest and queue count.

Two sides plug and unplug a 1-queue virtio tap NIC (model none, tap in the host netns),
alternating which goes first each cycle:

- libvirt: ``virsh attach-device DOM if.xml --live`` / ``detach-device`` into a transient TCG
  domain of our own libvirtd (see :mod:`bench.libvirt`);
- qmpnet service: ``qmpnet add-iface`` / ``del-iface`` client processes (the stdlib-only thin
  client, ``QMPNET_SOCKET`` set) against a ``qmpnetd`` that keeps the VM's session open.

del-iface's time beyond DEVICE_DELETED is the client process's end minus QEMU's own timestamp
of the event, read on the VM's first monitor (the VM manager's; the service holds the second).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from bench.harness import (
    GUEST_TIMEOUT,
    Context,
    give_peer,
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
from qmpnet.service.client import Client
from qmpnet.testing.gobuild import cli_shim
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

ROOT_PORTS = 4
QUEUES = 1
SIDES = ("libvirt", "service", "compiled")
LABEL = {
    "libvirt": "virsh",
    "service": "qmpnet via qmpnetd",
    "compiled": "compiled qmpnet via qmpnetd",
}
#: the issue's targets, printed next to the figures (never asserted)
ADD_RATIO_TARGET = 0.8
BEYOND_DELETED_TARGET_MS = 15.0

NOTES = [
    "add/del: wall time of the whole virsh or qmpnet client process (spawn → exit); the qmpnet"
    " client is the thin Python one or the compiled front (QMPNET_SOCKET set; the service runs"
    " the compiled front's command line, cli.exec), qmpnetd already holds the VM's monitor and"
    " logs at info level, as a node runs it",
    "protocol request: the same iface.add / iface.remove sent by a caller that speaks the"
    " protocol itself (a runtime's shim, a VM manager: one JSON line on the socket), no client"
    " process; its ratio is against the same cycle's virsh process",
    "guest sees NIC: request start → the guest's serial NIC-ADD marker",
    "ratio: qmpnet via qmpnetd / virsh per cycle (the three run back to back, alternating"
    " order); < 1 means qmpnet is faster",
    f"targets: add ratio ≤ {ADD_RATIO_TARGET}x, del beyond DEVICE_DELETED ≤"
    f" {BEYOND_DELETED_TARGET_MS:g} ms",
    "del beyond DEVICE_DELETED: the del process's exit minus QEMU's timestamp of DEVICE_DELETED"
    " (the event's own clock, read on the VM's first monitor): netdev_del, the tap's removal,"
    " the state save, the reply and the client's exit. Negative: qmpnet was done before QEMU"
    " sent the event. QEMU 7.2 sends DEVICE_DELETED when the device object is finalized, an"
    " RCU grace period (~20-30 ms here) after the guest released it and it left"
    " /machine/peripheral; qmpnet's wait ends at the first of the event and that absence",
    "request → DEVICE_DELETED: the del process's spawn → QEMU's event timestamp",
    "beyond DEVICE_DELETED's arrival on monitor 1: the same, from when the bench read the"
    " event on the first monitor (an upper bound of the event's time, so a lower bound here)",
]


def _mac(n: int) -> str:
    return f"52:54:00:5d:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"


class Deletions:
    """DEVICE_DELETED events of one monitor, as ``time.monotonic()`` stamps of QEMU's clock."""

    def __init__(self, client: QMPClient) -> None:
        self._client = client
        #: (device id, QEMU's stamp, arrival here) in arrival order; a backend's has no id
        self._seen: list[tuple[str, float, float]] = []
        self._wake = asyncio.Event()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        with self._client.listener(("DEVICE_DELETED",)) as listener:
            async for event in listener:
                data: Any = event.get("data", {})
                stamp: Any = event["timestamp"]
                wall = stamp["seconds"] + stamp["microseconds"] / 1e6
                # QEMU stamps events with the realtime clock; map it onto the monotonic one
                now = time.monotonic()
                device = str(data.get("device") or "")
                self._seen.append((device, wall - time.time() + now, now))
                self._wake.set()

    def cursor(self) -> int:
        return len(self._seen)

    async def first_after(self, cursor: int, timeout: float = GUEST_TIMEOUT) -> tuple[float, float]:
        """QEMU's stamp and the arrival here of the first DEVICE_DELETED of a device with an
        id after ``cursor``."""
        deadline = time.monotonic() + timeout
        while True:
            for device, stamp, arrived in self._seen[cursor:]:
                if device:
                    return stamp, arrived
            self._wake.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no DEVICE_DELETED within {timeout:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


async def _libvirt(daemon: Libvirtd, dom: Domain, scratch: Path, n: int, table: Table) -> None:
    assert dom.console is not None
    console = dom.console
    hw, tap = _mac(n), name("l")
    xml = scratch / f"{tap}.xml"
    xml.write_text(interface_xml(hw, tap, QUEUES))
    cursor = console.cursor()
    async with watching(console.wait_for(nic_add_re(hw), GUEST_TIMEOUT, cursor)) as seen:
        p = (await daemon.virsh("attach-device", dom.name, str(xml), "--live")).check()
        await give_peer(tap, hw)
        t_seen = await seen
    table.row(f"add: {LABEL['libvirt']}").add(ms(p.wall))
    table.row(f"guest sees NIC: {LABEL['libvirt']}").add(ms(t_seen - p.started))
    cursor = console.cursor()
    async with watching(console.wait_for(nic_del_re(hw), GUEST_TIMEOUT, cursor)) as gone:
        p = (await daemon.virsh("detach-device", dom.name, str(xml), "--live")).check()
        await gone
    table.row(f"del: {LABEL['libvirt']}").add(ms(p.wall))


async def _service(
    vm: GuestVM,
    svc: ServiceProcess,
    deleted: Deletions,
    n: int,
    table: Table,
    side: str = "service",
) -> None:
    qmpnet_bin = str(Path(sys.executable).with_name("qmpnet") if side == "service" else cli_shim())
    env = {**os.environ, **svc.env}
    hw, tap = _mac(n), name("s")
    qmp = ["--qmp", str(vm.mgmt_qmp_path)]
    cursor = vm.console_cursor()
    async with watching(marker_at(vm, nic_add_re(hw), cursor)) as seen:
        p = (
            await spawn(
                [
                    qmpnet_bin,
                    "add-iface",
                    *qmp,
                    "--model",
                    "none",
                    "--queues",
                    str(QUEUES),
                    "--tap-name",
                    tap,
                    "--no-vhost",
                    "-",
                ],
                stdin=json.dumps({"name": "eth1", "hwAddr": hw}),
                env=env,
            )
        ).check()
        await give_peer(tap, hw)
        t_seen = await seen
    table.row(f"add: {LABEL[side]}").add(ms(p.wall))
    table.row(f"guest sees NIC: {LABEL[side]}").add(ms(t_seen - p.started))
    cursor, events = vm.console_cursor(), deleted.cursor()
    async with watching(marker_at(vm, nic_del_re(hw), cursor)) as gone:
        p = (await spawn([qmpnet_bin, "del-iface", *qmp, "--mac", hw], env=env)).check()
        await gone
    end = p.started + p.wall
    table.row(f"del: {LABEL[side]}").add(ms(p.wall))
    at, arrived = await deleted.first_after(events)
    table.row(f"del: request → DEVICE_DELETED: {LABEL[side]}").add(ms(at - p.started))
    table.row(f"del: beyond DEVICE_DELETED: {LABEL[side]}").add(ms(end - at))
    table.row(f"del: beyond DEVICE_DELETED's arrival on monitor 1: {LABEL[side]}").add(
        ms(end - arrived)
    )
    if side == "service":
        await _request(vm, svc, n, table)


async def _request(vm: GuestVM, svc: ServiceProcess, n: int, table: Table) -> None:
    """The same plug and unplug as one protocol request each, with no client process."""
    hw, tap = _mac(n + 0x4000), name("p")
    qmp = str(vm.mgmt_qmp_path)

    def call(method: str, params: dict[str, Any]) -> float:
        with Client(str(svc.socket)) as client:
            started = time.monotonic()
            client.call(method, {"qmp": qmp, **params})
            return time.monotonic() - started

    cursor = vm.console_cursor()
    async with watching(marker_at(vm, nic_add_re(hw), cursor)) as seen:
        interface = json.dumps({"name": "eth1", "hwAddr": hw})
        params = {"interface": interface, "model": "none", "queues": QUEUES, "tap_name": tap}
        took = await asyncio.to_thread(call, "iface.add", {**params, "no_vhost": True})
        await give_peer(tap, hw)
        await seen
    table.row("add: protocol request").add(ms(took))
    cursor = vm.console_cursor()
    async with watching(marker_at(vm, nic_del_re(hw), cursor)) as gone:
        took = await asyncio.to_thread(call, "iface.remove", {"mac": hw})
        await gone
    table.row("del: protocol request").add(ms(took))


def _ratios(table: Table) -> None:
    for what in ("add", "guest sees NIC", "del"):
        base = table.row(f"{what}: {LABEL['libvirt']}").samples
        for side in ("service", "compiled"):
            ours = table.row(f"{what}: {LABEL[side]}").samples
            ratio = table.row(f"ratio {what}: {LABEL[side]} / virsh", "x")
            for a, b in zip(ours, base, strict=True):
                ratio.add(a / b)
    for what in ("add", "del"):
        base = table.row(f"{what}: {LABEL['libvirt']}").samples
        ours = table.row(f"{what}: protocol request").samples[-len(base) :] if base else []
        ratio = table.row(f"ratio {what}: protocol request / virsh", "x")
        for a, b in zip(ours, base, strict=True):
            ratio.add(a / b)


async def run(ctx: Context, report: Report) -> None:
    cycles = ctx.pick(30, 3)
    table = report.table(f"qmpnet via qmpnetd vs libvirt, q35, {QUEUES} queue", NOTES)
    async with contextlib.AsyncExitStack() as stack:
        daemon = await Libvirtd.start(ctx.scratch("libvirtd"))
        stack.push_async_callback(daemon.stop)
        report.facts["libvirtd start → ready"] = f"{daemon.startup:.1f} s"
        dom_task = asyncio.ensure_future(
            Domain.create(
                daemon, ctx.image, ctx.scratch("domain"), machine="q35", root_ports=ROOT_PORTS
            )
        )
        try:
            vm = await ctx.boot(stack, machine="q35", root_ports=ROOT_PORTS)
        finally:
            dom = await dom_task
            stack.push_async_callback(dom.destroy)
        ctx.accels.add("tcg")
        svc = await ServiceProcess.start(ctx.scratch("qmpnetd"), verbose=1)
        stack.push_async_callback(svc.stop)
        manager = QMPClient("bench-manager")
        await manager.connect(str(vm.qmp_path))
        stack.push_async_callback(manager.disconnect)
        deleted = Deletions(manager)
        stack.push_async_callback(deleted.close)
        scratch = ctx.scratch("xml")
        # one request first, so that the service has its session to the VM (as in steady use)
        await _service(vm, svc, deleted, 0, Table("warm-up"))
        await _service(vm, svc, deleted, 0x3FFF, Table("warm-up"), "compiled")
        for i in range(cycles):
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            for side in order:
                if side == "libvirt":
                    await _libvirt(daemon, dom, scratch, 3 * i + 1, table)
                else:
                    n = 3 * i + (2 if side == "service" else 3)
                    await _service(vm, svc, deleted, n, table, side)
    _ratios(table)
    for side in ("service", "compiled"):
        add = table.row(f"ratio add: {LABEL[side]} / virsh", "x").samples
        beyond = table.row(f"del: beyond DEVICE_DELETED: {LABEL[side]}").samples
        if add and beyond:
            report.facts[f"add ratio median, {LABEL[side]} (target ≤ 0.8)"] = (
                f"{statistics.median(add):.2f}"
            )
            report.facts[f"del beyond DEVICE_DELETED median, {LABEL[side]} (target ≤ 15 ms)"] = (
                f"{statistics.median(beyond):.1f} ms"
            )
