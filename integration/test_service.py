"""qmpnetd with real QEMU: every door through the service, events heard as they happen.

The service runs as a subprocess with its own socket and state root; clients are the
installed ``qmpnet`` console script, as users run it. What happened is checked
independently: the guest's serial markers, QEMU's first monitor (the VM manager's), ``ip -j``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.probe import links
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM, marker_fields

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

QMPNET = str(Path(sys.executable).with_name("qmpnet"))
MARKER_TIMEOUT = 60.0

vm = module_vm("svc", root_ports=6)


def mac(last: int) -> str:
    return f"52:54:00:5e:{os.getpid() % 256:02x}:{last:02x}"


async def qmpnet(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [QMPNET, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    async with await ServiceProcess.start(tmp_path_factory.mktemp("qmpnetd")) as svc:
        yield svc
    assert svc.returncode == 0, svc.tail()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def manager(vm: GuestVM) -> AsyncIterator[QMPClient]:
    client = QMPClient("manager")
    await client.connect(str(vm.qmp_path))
    try:
        yield client
    finally:
        await client.disconnect()


async def peripherals(manager: QMPClient) -> set[str]:
    reply: Any = await manager.execute("qom-list", {"path": "/machine/peripheral"})
    return {c["name"] for c in reply}


def iface_file(tmp_path: Path, address: str, name: str = "eth7") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "hwAddr": address, "mtu": 1400}))
    return path


async def test_add_list_del_through_the_service(
    vm: GuestVM, service: ServiceProcess, manager: QMPClient, tmp_path: Path, host_link_names: Any
) -> None:
    address, tap = mac(0x11), host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    cursor = vm.console_cursor()
    added = await qmpnet(
        "add-iface",
        "--qmp",
        qmp,
        "--model",
        "none",
        "--tap-name",
        tap,
        str(iface_file(tmp_path, address)),
        env=service.env,
    )
    assert added.returncode == 0, added.stderr + service.tail()
    reply = json.loads(added.stdout)
    assert reply["hwAddr"] == address
    assert reply["pciPath"]
    # the guest saw it, and QEMU's other monitor holds it
    line = await vm.wait_for(rf"QMPNET NIC-ADD .*mac={address}", MARKER_TIMEOUT, since=cursor)
    assert marker_fields(line)["mac"] == address
    assert any(p.endswith("-dev") for p in await peripherals(manager))
    assert tap in links()
    # no --state was needed: the service keeps the VM's state under its own root
    listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert [i["status"] for i in doc["interfaces"]] == ["plugged"]
    table = await qmpnet("list-ifaces", "--qmp", qmp, env=service.env)
    assert address in table.stdout
    assert "plugged" in table.stdout
    removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", address, env=service.env)
    assert removed.returncode == 0, removed.stderr + service.tail()
    assert tap not in links()
    assert not any(p.endswith("-dev") for p in await peripherals(manager))
    listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
    assert json.loads(listed.stdout)["interfaces"] == []


async def test_a_host_link_deleted_under_a_plugged_nic_is_heard_and_shown(
    vm: GuestVM, service: ServiceProcess, tmp_path: Path, host_link_names: Any
) -> None:
    """RTM_DELLINK of a plugged NIC's tap: logged and shown, the NIC left plugged.

    One queue: QEMU 7.2 aborts when a multiqueue NIC whose tap is gone is reset (FACTS).
    """
    address, tap = mac(0x12), host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    added = await qmpnet(
        "add-iface",
        "--qmp",
        qmp,
        "--model",
        "none",
        "--queues",
        "1",
        "--tap-name",
        tap,
        str(iface_file(tmp_path, address)),
        env=service.env,
    )
    assert added.returncode == 0, added.stderr + service.tail()
    await asyncio.to_thread(subprocess.run, ["ip", "link", "del", tap], check=True)
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline:
        listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
        items = json.loads(listed.stdout)["interfaces"]
        status = str(items)
        if any(address in json.dumps(i) and i.get("host_link_gone") for i in items):
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"the deleted tap was not reported: {status} {service.tail()}")
    table = await qmpnet("list-ifaces", "--qmp", qmp, env=service.env)
    assert "plugged (host link gone)" in table.stdout
    assert any(tap in line and "deleted" in line for line in service.lines())
    removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", address, env=service.env)
    assert removed.returncode == 0, removed.stderr + service.tail()


async def test_a_vanished_link_is_forgotten_with_its_nic(
    vm: GuestVM, service: ServiceProcess, manager: QMPClient, tmp_path: Path, host_link_names: Any
) -> None:
    """A NIC whose tap vanished, dropped by a reconcile: a new NIC on that tap name is healthy."""
    tap = host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    options = ["--qmp", qmp, "--model", "none", "--queues", "1", "--tap-name", tap]
    before = await peripherals(manager)
    added = await qmpnet(
        "add-iface", *options, str(iface_file(tmp_path, mac(0x13))), env=service.env
    )
    assert added.returncode == 0, added.stderr + service.tail()
    (dev,) = await peripherals(manager) - before
    await asyncio.to_thread(subprocess.run, ["ip", "link", "del", tap], check=True)
    deadline = time.monotonic() + 30
    while not any(tap in line and "deleted" in line for line in service.lines()):
        assert time.monotonic() < deadline, service.tail()
        await asyncio.sleep(0.2)
    # the VM manager unplugs it behind qmpnet's back; a reconcile drops it from the state
    await manager.execute("device_del", {"id": dev})
    while dev in await peripherals(manager):
        assert time.monotonic() < deadline + 60, "the guest did not release the NIC"
        await asyncio.sleep(0.2)
    settled = await qmpnet("reconcile", "--qmp", qmp, env=service.env)
    assert settled.returncode == 0, settled.stdout + settled.stderr
    again = await qmpnet(
        "add-iface", *options, str(iface_file(tmp_path, mac(0x14))), env=service.env
    )
    assert again.returncode == 0, again.stderr + service.tail()
    listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
    (item,) = json.loads(listed.stdout)["interfaces"]
    assert not item.get("host_link_gone"), item
    table = await qmpnet("list-ifaces", "--qmp", qmp, env=service.env)
    assert "host link gone" not in table.stdout, table.stdout
    removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", mac(0x14), env=service.env)
    assert removed.returncode == 0, removed.stderr + service.tail()
