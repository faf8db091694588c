"""Soak of qmpnetd: many plug/unplug cycles through the service leak no memory and no fds.

``QMPNET_SOAK_SERVICE_CYCLES`` cycles (100 for ``make test``, 1000 for ``make soak``) of
``iface.add`` (model none, a tap in the host netns, waiting for the guest driver) and
``iface.remove`` on one protocol connection (:class:`qmpnet.service.client.Client`). After
each cycle the service's RSS (``VmRSS`` of ``/proc/PID/status``) and fd count
(``/proc/PID/fd``) are sampled. Over the samples after the warm-up a least-squares line is
fitted: the test fails only on a clear leak (more than 20 KiB a cycle of RSS, or an fd count
that ends above every count seen just after the warm-up). The figures are printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from qmpnet.service.client import Client, ServiceError
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.probe import fd_count, rss_kib
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

CYCLES = int(os.environ.get("QMPNET_SOAK_SERVICE_CYCLES", "100"))
WARMUP = max(10, CYCLES // 10)
MAC = "52:54:00:00:07:72"
#: a clear leak: the fitted RSS slope over the cycles after the warm-up
RSS_SLOPE_MAX_KIB = 20.0
#: fd counts taken in this many cycles just after the warm-up bound the end's
FD_WINDOW = 10

vm = module_vm("ssk", root_ports=2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    async with await ServiceProcess.start(tmp_path_factory.mktemp("qmpnetd-soak")) as svc:
        yield svc
    assert svc.returncode == 0, svc.tail()


def _cycle(client: Client, qmp: str, tap: str) -> int:
    """One plug and unplug; returns how many unplugs needed a second request (0 or 1)."""
    client.call(
        "iface.add",
        {
            "qmp": qmp,
            "interface": json.dumps({"name": "eth1", "hwAddr": MAC}),
            "model": "none",
            "queues": 1,
            "no_vhost": True,
            "tap_name": tap,
            "wait_guest": True,
            "timeouts": {"unplug": 15.0},
        },
    )
    # the guest pings 169.254.114.1 once the NIC is up: answer, so no retry loops pile up
    subprocess.run(["ip", "addr", "add", "169.254.114.1/24", "dev", tap], check=True)
    try:
        client.call("iface.remove", {"qmp": qmp, "mac": MAC, "timeouts": {"unplug": 15.0}})
    except ServiceError:
        # rarely the TCG guest misses an unplug request; asking again completes it
        client.call("iface.remove", {"qmp": qmp, "mac": MAC, "timeouts": {"unplug": 15.0}})
        return 1
    return 0


def _slope(samples: list[int]) -> float:
    fit = statistics.linear_regression(range(len(samples)), samples)
    return fit.slope


async def test_service_rss_and_fds_stay_flat(
    vm: GuestVM,
    service: ServiceProcess,
    host_link_names: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert CYCLES > WARMUP + FD_WINDOW
    tap = host_link_names("k")
    qmp = str(vm.mgmt_qmp_path)
    pid = service.pid
    start = {"rss_kib": rss_kib(pid), "fds": fd_count(pid)}
    rss: list[int] = []
    fds: list[int] = []
    late = 0
    client = Client(str(service.socket), timeout=120.0)
    await asyncio.to_thread(client.connect)
    started = time.monotonic()
    try:
        for cycle in range(CYCLES):
            late += await asyncio.to_thread(_cycle, client, qmp, tap)
            if cycle >= WARMUP:
                rss.append(rss_kib(pid))
                fds.append(fd_count(pid))
        listed: Any = await asyncio.to_thread(client.call, "iface.list", {"qmp": qmp})
    finally:
        client.close()
    elapsed = time.monotonic() - started
    rss_slope, fd_slope = _slope(rss), _slope(fds)
    with capsys.disabled():
        print(
            f"\nservice soak: {CYCLES} cycles in {elapsed:.1f} s "
            f"({elapsed / CYCLES * 1000:.0f} ms a cycle), warm-up {WARMUP}, "
            f"{late} unplug(s) asked twice"
        )
        print(
            f"  qmpnetd RSS: {start['rss_kib']} KiB at start, {rss[0]} after warm-up, "
            f"{rss[-1]} at the end; fitted {rss_slope:+.2f} KiB a cycle"
        )
        print(
            f"  qmpnetd fds: {start['fds']} at start, {fds[0]} after warm-up, {fds[-1]} at the "
            f"end; fitted {fd_slope:+.4f} a cycle"
        )
    assert listed["interfaces"] == [], listed
    assert tap not in ip_links()
    assert rss_slope <= RSS_SLOPE_MAX_KIB, f"qmpnetd's RSS grows {rss_slope:.1f} KiB a cycle"
    assert fds[-1] <= max(fds[:FD_WINDOW]), f"qmpnetd's fd count grew: {fds[:5]} … {fds[-5:]}"
    assert service.returncode is None, service.tail()
