"""64 clients plugging at once through one qmpnetd into 8 VMs: all succeed, nothing collides.

Eight paused q35 QEMUs (``-S``: no guest code runs, ``device_add`` works all the same) with 8
root ports each, one service, 64 threads each with its own protocol connection
(:class:`qmpnet.service.client.Client`), released together, each plugging one model-none tap
NIC (8 per VM, run-prefixed tap names, unique MACs). Checked afterwards, independently of the
service: no two devices on one PCI slot (``query-pci`` on each VM's first monitor), and the host
(``ip -j link``), QEMU (``qom-list /machine/peripheral``) and the service (``iface.list``) agree.

The same 64 plugs then run in the direct mode (the library, one NetworkState per VM, each VM's
8 plugs in turn: a monitor serves one client at a time) on 8 fresh paused VMs; both rates are
printed, never asserted.

Teardown stops the VMs (an unplug on a paused guest never completes), then asks for a
reconcile of each VM, which removes the taps of NICs whose QEMU is gone; no tap may be left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from qmpnet.config import Config
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.reconcile import reconcile
from qmpnet.service.client import Client
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.probe import Monitor
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.scene import RUN
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio]

VMS = 8
PER_VM = 8
CLIENTS = VMS * PER_VM


def _mac(vm: int, k: int, side: int) -> str:
    return f"52:54:00:c{side}:{vm:02x}:{k:02x}"


@contextlib.asynccontextmanager
async def paused_vms(image: GuestImage, workdir: Path, tag: str) -> AsyncIterator[list[GuestVM]]:
    """Eight paused VMs, stopped (by the GuestVM, its own pid) on the way out."""
    started: list[GuestVM] = []
    try:
        results = await asyncio.gather(
            *(
                GuestVM.start(
                    image, workdir, paused=True, root_ports=PER_VM, name=f"{RUN}-{tag}{i}"
                )
                for i in range(VMS)
            ),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, GuestVM)]
        for r in results:
            if isinstance(r, BaseException):
                raise r
        yield started
    finally:
        await asyncio.gather(*(vm.stop() for vm in started), return_exceptions=True)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


async def _qemu_side(
    vm: GuestVM,
) -> tuple[set[str], list[tuple[int, int, int, str]], dict[str, tuple[str, str]]]:
    """QOM peripherals, every PCI function query-pci shows (bus, slot, function, qdev id), and
    each NIC's (parent bus, addr) from QOM: a paused guest's firmware never numbered the root
    ports' buses, so query-pci does not show what is behind them."""
    functions: list[tuple[int, int, int, str]] = []

    def walk(devices: list[dict[str, Any]]) -> None:
        for dev in devices:
            functions.append(
                (int(dev["bus"]), int(dev["slot"]), int(dev["function"]), dev.get("qdev_id", ""))
            )
            walk(dev.get("pci_bridge", {}).get("devices", []))

    async with Monitor.connect(vm.qmp_path) as mon:
        peripherals = set(await mon.peripherals())
        for bus in await mon.execute("query-pci"):
            walk(bus.get("devices", []))
        places = {}
        for dev in (p for p in peripherals if p.endswith("-dev")):
            path = f"/machine/peripheral/{dev}"
            bus = await mon.execute("qom-get", {"path": path, "property": "parent_bus"})
            addr = await mon.execute("qom-get", {"path": path, "property": "addr"})
            places[dev] = (str(bus), str(addr))
    return peripherals, functions, places


async def _taps_gone(taps: set[str], timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    left = taps & set(ip_links())
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        left = taps & set(ip_links())
    return left


async def test_64_concurrent_clients_through_one_service(
    guest_image: GuestImage,
    tmp_path: Path,
    host_link_names: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    taps = {(v, k): host_link_names("c") for v in range(VMS) for k in range(PER_VM)}
    async with (
        await ServiceProcess.start(tmp_path / "svc-work") as svc,
        paused_vms(guest_image, tmp_path, "cc") as vms,
    ):
        qmps = [str(vm.mgmt_qmp_path) for vm in vms]
        go = threading.Barrier(CLIENTS)
        results: dict[tuple[int, int], Any] = {}

        def plug(v: int, k: int) -> tuple[float, float]:
            with Client(str(svc.socket), timeout=60.0) as client:
                go.wait(30)
                t0 = time.monotonic()
                results[(v, k)] = client.call(
                    "iface.add",
                    {
                        "qmp": qmps[v],
                        "interface": json.dumps({"name": f"eth{k}", "hwAddr": _mac(v, k, 1)}),
                        "model": "none",
                        "queues": 1,
                        "no_vhost": True,
                        "tap_name": taps[(v, k)],
                    },
                )
                return t0, time.monotonic()

        try:
            # a thread per client (the loop's default pool has only a few)
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
                spans = await asyncio.gather(
                    *(loop.run_in_executor(pool, plug, v, k) for v, k in taps),
                    return_exceptions=True,
                )
            failures = [s for s in spans if isinstance(s, BaseException)]
            assert not failures, f"{len(failures)} plugs failed: {failures[:3]}\n{svc.tail()}"
            ok = [s for s in spans if not isinstance(s, BaseException)]
            service_rate = CLIENTS / (max(e for _, e in ok) - min(s for s, _ in ok))

            host = set(ip_links())
            assert set(taps.values()) <= host, sorted(set(taps.values()) - host)
            with Client(str(svc.socket), timeout=60.0) as client:
                for v, vm in enumerate(vms):
                    peripherals, functions, places = await _qemu_side(vm)
                    slots = [(b, s, f) for b, s, f, _ in functions]
                    assert len(slots) == len(set(slots)), f"VM {v}: two devices on one slot"
                    nics = {p for p in peripherals if p.endswith("-dev")}
                    assert len(nics) == PER_VM, (v, sorted(peripherals))
                    assert len(set(places.values())) == PER_VM, f"VM {v}: shared slot {places}"
                    pci_paths = {results[(v, k)]["pciPath"] for k in range(PER_VM)}
                    assert len(pci_paths) == PER_VM, f"VM {v}: pciPaths {pci_paths}"
                    listed = await asyncio.to_thread(client.call, "iface.list", {"qmp": qmps[v]})
                    items = listed["interfaces"]
                    assert [i["status"] for i in items] == ["plugged"] * PER_VM, items
                    svc_taps, svc_devs = set(), set()
                    for item in items:
                        words = set(_strings(item["endpoint"]))
                        svc_taps |= words & set(taps.values())
                        svc_devs |= {f"{w}-dev" for w in words} & nics
                    assert svc_taps == {taps[(v, k)] for k in range(PER_VM)}, (v, svc_taps)
                    assert svc_devs == nics, (v, svc_devs, nics)
        finally:
            for vm in vms:
                await vm.stop()
            with Client(str(svc.socket), timeout=15.0) as client:
                for q in qmps:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(client.call, "reconcile", {"qmp": q})
        left = await _taps_gone(set(taps.values()))
        assert not left, f"taps left after the VMs stopped and a reconcile: {sorted(left)}"

    direct_rate = await _direct_mode(guest_image, tmp_path, host_link_names)
    with capsys.disabled():
        print(
            f"\n{CLIENTS} concurrent plugs into {VMS} paused VMs: through qmpnetd "
            f"{service_rate:.1f} plugs/s; direct mode (library, per VM in turn) "
            f"{direct_rate:.1f} plugs/s"
        )


async def _direct_mode(
    image: GuestImage, tmp_path: Path, host_link_names: Callable[[str], str]
) -> float:
    """The same 64 plugs in this process, one NetworkState per VM; returns plugs/s."""
    taps = {(v, k): host_link_names("d") for v in range(VMS) for k in range(PER_VM)}
    config = Config(disable_vhost_net=True)
    async with paused_vms(image, tmp_path, "cd") as vms:
        states = [
            NetworkState.open(tmp_path / f"direct-state{v}", str(vm.mgmt_qmp_path), config)
            for v, vm in enumerate(vms)
        ]

        async def one_vm(v: int) -> None:
            for k in range(PER_VM):
                await states[v].add_interface(
                    InterfaceDescription(name=f"eth{k}", hw_addr=_mac(v, k, 2)),
                    model=InterworkingModel.NONE,
                    queues=1,
                    tap_name=taps[(v, k)],
                )

        try:
            t0 = time.monotonic()
            await asyncio.gather(*(one_vm(v) for v in range(VMS)))
            rate = CLIENTS / (time.monotonic() - t0)
        finally:
            for vm in vms:
                await vm.stop()
            for state in states:
                with contextlib.suppress(Exception):
                    await reconcile(state)
    left = await _taps_gone(set(taps.values()))
    assert not left, f"direct mode: taps left after the VMs stopped: {sorted(left)}"
    return rate
