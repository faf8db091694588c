"""Hot-plug and unplug into a real, booted QEMU (TCG) through NetworkState.

One guest is booted per module and reused: ``query-pci`` can only see behind the root ports
once the firmware has numbered the buses. Everything is checked with views that are not
qmpnet's own: QEMU's ``query-pci``, ``qom-get``, ``info network``, ``/proc/<qemu>/fd``,
``ip -d -j link``/``tc -j``, and the guest's serial-console markers. Each test removes what
it plugged, so the next one starts from an empty VM. The QMP step timings are printed
(``pytest -s``), never asserted.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qmpnet.config import Config
from qmpnet.hypervisor import QemuHypervisor, Topology
from qmpnet.marks import claimed_owner
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.store import Status
from qmpnet.testing import GuestImage, GuestVM, marker_fields
from qmpnet.testing.scene import RUN, unique
from qmpnet.testing.steps import StepRecorder

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

VIRTIO_VENDOR = 0x1AF4
VIRTIO_NET_MODERN = 0x1041  # virtio-net-pci behind a PCIe port is modern-only
GUEST_VCPUS = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def booted_vm(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GuestVM]:
    vm = await GuestVM.start(
        guest_image,
        tmp_path_factory.mktemp("vm"),
        root_ports=4,
        vcpus=GUEST_VCPUS,
        name=f"{RUN}-boot",
    )
    try:
        yield vm
    finally:
        await vm.stop()


def report(clock: StepRecorder, label: str) -> None:
    """Print each step's time (begin -> done) of what ``clock`` recorded."""
    steps = ", ".join(f"{step.value} {took * 1000:.1f} ms" for step, took in clock.durations())
    print(f"\n[qmp timings] {label}: {steps}")


async def _qemu_view(vm: GuestVM) -> dict[str, Any]:
    """What QEMU itself says, through its monitor (one client at a time: closed after)."""
    async with await QmpSession.connect(str(vm.mgmt_qmp_path)) as qmp:
        return {
            "pci": await qmp.query_pci(),
            "peripherals": {
                c["name"]: c["type"] for c in await qmp.qom_list("/machine/peripheral")
            },
            "network": str(
                await qmp.execute("human-monitor-command", {"command-line": "info network"})
            ),
        }


async def _qom(vm: GuestVM, path: str, prop: str) -> Any:
    async with await QmpSession.connect(str(vm.mgmt_qmp_path)) as qmp:
        return await qmp.qom_get(path, prop)


def _pci_device(pci: list[dict[str, Any]], pci_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The root-bus bridge at the path's first slot and the device at its second."""
    port_slot, dev_slot = (int(s, 16) for s in pci_path.split("/"))
    port = next(
        d for bus in pci if bus["bus"] == 0 for d in bus["devices"] if d["slot"] == port_slot
    )
    devices = port.get("pci_bridge", {}).get("devices", [])
    return port, next(d for d in devices if d["slot"] == dev_slot)


def _netdev_fds(network: str, netdev: str) -> list[int]:
    """The fd of each queue of ``netdev`` as ``info network`` shows it."""
    return [
        int(m) for m in re.findall(rf"{re.escape(netdev)}: index=\d+,type=tap,fd=(\d+)", network)
    ]


async def _unplugged_cleanly(vm: GuestVM, host: Any, endpoint_id: str, tun_before: int) -> None:
    view = await _qemu_view(vm)
    assert f"{endpoint_id}-dev" not in view["peripherals"]
    assert f"{endpoint_id}-net" not in view["network"]
    assert not any(
        d.get("qdev_id") == f"{endpoint_id}-dev"
        for bus in view["pci"]
        for port in bus["devices"]
        for d in port.get("pci_bridge", {}).get("devices", [])
    )
    host.wait_until(lambda: len(host.tun_fds(vm.pid)) == tun_before, what="QEMU closed the fds")


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("queues", "expected"), [(1, 1), (4, 4), (0, GUEST_VCPUS)])
async def test_tap_endpoint(
    booted_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path, queues: int, expected: int
) -> None:
    vm = booted_vm
    mac = f"52:54:00:00:00:{0x50 + queues:02x}"
    tap = host_link_names("t")
    clock = StepRecorder()
    state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), Config())
    state.observers.append(clock)
    tun_before = len(host.tun_fds(vm.pid))
    cursor = vm.console_cursor()

    endpoint = await state.add_interface(
        InterfaceDescription(name="eth0", hw_addr=mac, mtu=1400),
        model=InterworkingModel.NONE,
        queues=queues,
        tap_name=tap,
        wait_guest=True,
    )
    report(clock, f"tap plug, {expected} queue(s), booted q35")
    dev_id, net_id = f"{endpoint.id}-dev", f"{endpoint.id}-net"
    assert re.fullmatch(r"0[1-4]/00", endpoint.pci_path)
    assert endpoint.hardware_addr == mac

    # QEMU: the device on the chosen slot with our id, our MAC, and the netdev with our fds
    view = await _qemu_view(vm)
    port, dev = _pci_device(view["pci"], endpoint.pci_path)
    assert port["qdev_id"].startswith("rp")
    assert dev["qdev_id"] == dev_id
    assert (dev["id"]["vendor"], dev["id"]["device"]) == (VIRTIO_VENDOR, VIRTIO_NET_MODERN)
    assert view["peripherals"][dev_id] == "child<virtio-net-pci>"
    assert await _qom(vm, f"/machine/peripheral/{dev_id}", "mac") == mac
    assert await _qom(vm, f"/machine/peripheral/{dev_id}", "mq") is (expected > 1)
    if expected > 1:
        assert await _qom(vm, f"/machine/peripheral/{dev_id}", "vectors") == 2 * expected + 2
    assert f"{dev_id}: index=0,type=nic,model=virtio-net-pci,macaddr={mac}" in view["network"]
    qemu_fds = _netdev_fds(view["network"], net_id)
    assert len(qemu_fds) == expected
    for fd in qemu_fds:  # each queue's fd in QEMU is a tap queue
        assert os.readlink(f"/proc/{vm.pid}/fd/{fd}") == "/dev/net/tun"
    assert len(host.tun_fds(vm.pid)) == tun_before + expected
    assert "/dev/vhost-net" not in host.fd_targets(vm.pid)  # this host has none
    assert host.tun_fds(os.getpid()) == []  # our copies are closed

    # the host: the tap, marked, up, the MTU asked
    link = host.links()[tap]
    assert link["linkinfo"]["info_data"]["type"] == "tap"
    assert link["linkinfo"]["info_data"]["multi_queue"] is (expected > 1)
    assert claimed_owner(link["ifalias"]) == endpoint.id
    assert link["mtu"] == 1400
    assert "UP" in link["flags"]

    # the guest: a NIC with our MAC and min(queues, vCPUs) queue pairs
    added = marker_fields(await vm.wait_for(rf"^QMPNET NIC-ADD .*mac={mac}", 60, since=cursor))
    assert int(added["rxq"]) == int(added["txq"]) == min(expected, GUEST_VCPUS)

    [entry] = await state.list_interfaces()
    assert (entry.endpoint, entry.status) == (endpoint, Status.PLUGGED)

    # unplug: device, netdev, fds and the tap go; the guest sees the NIC leave
    clock = StepRecorder()
    state.observers[:] = [clock]
    await state.remove_interface(mac)
    report(clock, f"tap unplug, {expected} queue(s), booted q35")
    await _unplugged_cleanly(vm, host, endpoint.id, tun_before)
    host.wait_until(lambda: tap not in host.links(), what="tap gone")
    await vm.wait_for(rf"^QMPNET NIC-DEL name={added['name']} mac={mac}", 60, since=cursor)
    assert await state.list_interfaces() == []
    assert not state.store.journal_path.exists()


@pytest.mark.asyncio(loop_scope="module")
async def test_veth_tcfilter_endpoint(
    booted_vm: GuestVM, host: Any, cni_veth: Any, state_dir: Path
) -> None:
    """A CNI-like veth in a sandbox netns, joined by tc to the tap: the guest pings the far
    end of the veth through it."""
    vm = booted_vm
    veth = cni_veth(mac="52:54:00:00:00:61")  # far end 169.254.97.1, the guest 169.254.97.2
    tap = unique("t")
    clock = StepRecorder()
    state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), Config())
    state.observers.append(clock)
    tun_before = len(host.tun_fds(vm.pid))
    cursor = vm.console_cursor()

    endpoint = await state.add_interface(
        InterfaceDescription(name=veth.inner, hw_addr=veth.mac),
        model=InterworkingModel.TCFILTER,
        netns_path=veth.sandbox,
        queues=2,
        tap_name=tap,
    )
    report(clock, "veth/tcfilter plug, 2 queues, booted q35")
    dev_id = f"{endpoint.id}-dev"
    assert endpoint.name == veth.inner
    assert endpoint.hardware_addr == veth.mac

    view = await _qemu_view(vm)
    _, dev = _pci_device(view["pci"], endpoint.pci_path)
    assert dev["qdev_id"] == dev_id
    assert await _qom(vm, f"/machine/peripheral/{dev_id}", "mac") == veth.mac
    assert len(_netdev_fds(view["network"], f"{endpoint.id}-net")) == 2
    assert len(host.tun_fds(vm.pid)) == tun_before + 2

    seen = host.links(veth.sandbox)
    assert claimed_owner(seen[tap]["ifalias"]) == endpoint.id
    assert seen[veth.inner]["address"] == veth.mac
    for dev_name in (veth.inner, tap):
        assert "ingress" in [q["kind"] for q in host.qdiscs(veth.sandbox, dev_name)]
    assert tap not in host.links()  # made in the sandbox, not on the host

    added = marker_fields(await vm.wait_for(rf"^QMPNET NIC-ADD .*mac={veth.mac}", 60, since=cursor))
    ping = marker_fields(
        await vm.wait_for(
            rf"^QMPNET PING name={added['name']} peer={re.escape(veth.far_ip)} ", 90, since=cursor
        )
    )
    assert ping["result"] == "ok"

    clock = StepRecorder()
    state.observers[:] = [clock]
    await state.remove_interface(veth.mac)
    report(clock, "veth/tcfilter unplug, booted q35")
    await _unplugged_cleanly(vm, host, endpoint.id, tun_before)
    seen = host.links(veth.sandbox)
    assert sorted(seen) == sorted(["lo", veth.inner])  # the tap went, the veth stays
    assert seen[veth.inner]["address"] == veth.mac
    assert "ingress" not in [q["kind"] for q in host.qdiscs(veth.sandbox, veth.inner)]
    assert await state.list_interfaces() == []


@pytest.mark.asyncio(loop_scope="module")
async def test_the_buses_read_from_query_pci_are_the_buses_qom_shows(
    booted_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    """Once the firmware has numbered the buses, the slot search reads query-pci and QOM's
    list of peripherals, two commands however many root ports there are, instead of two
    QOM reads per bridge; what it finds is what the QOM walk finds: our NIC's port and a VM
    manager's device (plugged through its own monitor) taken, the other ports free."""
    vm = booted_vm
    mac = "52:54:00:00:00:71"
    state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), Config())
    endpoint = await state.add_interface(
        InterfaceDescription(name="eth0", hw_addr=mac),
        model=InterworkingModel.NONE,
        queues=1,
        tap_name=host_link_names("t"),
    )
    theirs = f"{RUN}-theirs"
    async with await QmpSession.connect(str(vm.qmp_path)) as manager:
        [*_, last] = await QemuHypervisor(manager).free_slots()
        await manager.device_add(
            {"driver": "virtio-net-pci", "id": theirs, "bus": last.bus, "romfile": ""}
        )
        try:
            async with await QmpSession.connect(str(vm.mgmt_qmp_path)) as qmp:
                sent: list[str] = []
                execute = qmp.execute

                async def counted(
                    command: str, arguments: Any = None, timeout: float | None = None
                ) -> Any:
                    sent.append(command)
                    return await execute(command, arguments, timeout)

                qmp.execute = counted  # type: ignore[method-assign]
                hv = QemuHypervisor(qmp)
                fast = await hv.read_topology()
                assert sorted(sent) == ["qom-list", "query-pci"], sent
                walked = await hv.read_topology(exact=True)
            assert (fast.exact, walked.exact) == (False, True)
            assert fast.bridges == walked.bridges
            assert fast.root_used == walked.root_used
            used = {b.qdev_id for b in walked.bridges if b.used}
            assert used == {last.bus, _port_of(walked, endpoint.pci_path)}
            assert [s.bus for s in fast.free()] == [
                b.qdev_id for b in sorted(walked.bridges, key=lambda b: b.slot) if not b.used
            ]
        finally:
            assert await manager.device_del(theirs, 30.0), "the guest did not release it"
    await state.remove_interface(mac)


def _port_of(topology: Topology, pci_path: str) -> str:
    """The root port whose slot on pcie.0 is the first part of a guest PCI path."""
    slot = int(pci_path.split("/", maxsplit=1)[0], 16)
    [port] = [b.qdev_id for b in topology.bridges if b.slot == slot]
    return str(port)
