"""State survives the process: plug with one ``qmpnet`` process, list and unplug from others.

Each step is a separate run of the installed ``qmpnet`` command, so nothing but the state
directory carries over: ``add-iface`` plugs a tap endpoint and a CNI veth (tcfilter) and
exits; a new ``list-ifaces --json`` must show both from the saved state; new ``del-iface``
processes must unplug them all the way (guest, QEMU, host links), knowing only the MAC.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from vmfixture import *  # noqa: F403
from vmfixture import e2e_name, free_octets, host_ping, mac_for

from qmpnet.testing import cni
from qmpnet.testing.guest import guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.probe import links
from qmpnet.testing.vm import marker_fields

QMPNET = Path(sys.executable).parent / "qmpnet"


async def qmpnet(*args: str, stdin: str = "") -> Any:
    """Run the ``qmpnet`` command in a new process; its JSON output (fails on non-zero)."""
    if not QMPNET.exists():
        pytest.fail(f"{QMPNET} is missing: `make setup` installs the qmpnet command")
    proc = await asyncio.create_subprocess_exec(
        str(QMPNET),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
    assert proc.returncode == 0, f"qmpnet {' '.join(args)} exited {proc.returncode}: {err.decode()}"
    return json.loads(out)


async def marker(vm: Any, pattern: str, since: int) -> dict[str, str]:
    return marker_fields(await vm.wait_for(pattern, 60.0, since=since))


@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_plug_in_one_process_list_and_unplug_from_new_ones(harness, machine: str) -> None:
    h = await harness(machine)
    guest, state = h.vm.vm, str(h.state.store.dir)
    vm_args = [
        "--qmp",
        str(guest.mgmt_qmp_path),
        "--state",
        state,
        "--timeout-unplug",
        "30",
        "--timeout-command",
        "30",
    ]
    tap_octet, pod_octet = free_octets(2)
    tap_mac, tap = mac_for(tap_octet), e2e_name("t")
    net = f"169.254.{pod_octet}"

    async with cni.pod_network(
        e2e_name("c"),
        f"{net}.0/24",
        mac=mac_for(pod_octet),
        range_start=f"{net}.10",
        bridge_address=f"{net}.1/24",
    ) as pod:
        # Process 1 and 2: plug, then exit.
        since = guest.console_cursor()
        plugged_tap = await qmpnet(
            "add-iface",
            *vm_args,
            "--model",
            "none",
            "--queues",
            "2",
            "--tap-name",
            tap,
            "-",
            stdin=json.dumps({"name": "eth0", "hwAddr": tap_mac}),
        )
        ip = await asyncio.create_subprocess_exec(
            "ip", "addr", "add", f"{host_ip_for_mac(tap_mac)}/24", "dev", tap
        )
        assert await ip.wait() == 0
        plugged_veth = await qmpnet(
            "add-iface",
            *vm_args,
            "--model",
            "tcfilter",
            "--netns",
            pod.netns_path,
            "-",
            stdin=json.dumps({"name": pod.ifname, "hwAddr": pod.mac}),
        )
        assert plugged_tap["hwAddr"] == tap_mac
        assert plugged_veth["hwAddr"] == pod.mac
        for mac in (tap_mac, pod.mac):
            nic = await marker(guest, rf"^QMPNET NIC-ADD .*\bmac={mac}\b", since)
            ping = await marker(guest, rf"^QMPNET PING name={re.escape(nic['name'])}\b", since)
            assert ping["result"] == "ok", f"guest ping over {nic} failed"
        assert await host_ping(guest_ip_for_mac(tap_mac), tap)
        assert await host_ping(guest_ip_for_mac(pod.mac), pod.bridge)

        # Process 3: list from the saved state only.
        listed = await qmpnet("list-ifaces", "--state", state, "--json")
        entries = {e["endpoint"]["type"]: e for e in listed["interfaces"]}
        assert set(entries) == {"tap", "virtual"}
        assert {e["status"] for e in entries.values()} == {"plugged"}
        assert not listed["unreadable"]
        tap_ep, veth_ep = entries["tap"]["endpoint"], entries["virtual"]["endpoint"]
        assert tap_ep["tap_interface"]["tap_iface"] == {
            "name": tap,
            "hard_addr": tap_mac,
            "addrs": [],
        }
        assert tap_ep["pci_path"] == plugged_tap["pciPath"]
        assert veth_ep["net_pair"]["virt_iface"]["hard_addr"] == pod.mac
        assert veth_ep["net_pair"]["model"] == "tcfilter"
        assert veth_ep["netns_path"] == pod.netns_path
        assert veth_ep["pci_path"] == plugged_veth["pciPath"]
        devices = {
            tap_mac: tap_ep["tap_interface"]["id"] + "-dev",
            pod.mac: veth_ep["net_pair"]["tap_interface"]["id"] + "-dev",
        }
        assert set(devices.values()) <= await h.vm.peripherals()

        # Processes 4 and 5: unplug by MAC, from the saved state only.
        for mac in (pod.mac, tap_mac):
            since = guest.console_cursor()
            removed = await qmpnet("del-iface", *vm_args, "--mac", mac)
            assert removed["hwAddr"] == mac
            gone = await marker(guest, rf"^QMPNET NIC-DEL .*\bmac={mac}\b", since)
            assert gone["mac"] == mac
            await h.vm.wait_deleted(devices[mac])  # as the VM manager's monitor saw it
        assert tap not in links()
        assert set(links(pod.netns)) == {"lo", pod.ifname}
        assert not await h.vm.netdev_lines()
        assert not [d for d in await h.vm.peripherals() if not d.startswith("rp")]
        assert h.vm.tap_fds() == 0

        # Process 6: the state is empty, and says so.
        assert (await qmpnet("list-ifaces", "--state", state, "--json"))["interfaces"] == []
