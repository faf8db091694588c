"""A ``tap`` endpoint (model none) in a real guest, on q35 and pc, with 1 and 4 queues.

The guest must see a NIC with our MAC and min(queues, vCPUs) queue pairs; traffic must flow
both ways over the link-local addresses (the guest's own ping marker, and busybox ping from
the host answered by the guest's MAC); and the unplug must go all the way: DEVICE_DELETED on
the VM manager's monitor, the guest reporting the NIC gone, the tap gone from the host, the
netdev gone from QEMU and QEMU holding no tap fd.
"""

from __future__ import annotations

import pytest
from vmfixture import *  # noqa: F403
from vmfixture import VCPUS, e2e_name, free_octets, host_ping, mac_for, neighbour_mac, tap_host_side

from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import host_link
from qmpnet.testing.guest import guest_ip_for_mac
from qmpnet.testing.probe import links


@pytest.mark.parametrize("queues", [1, 4])
@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_tap_endpoint_end_to_end(harness, machine: str, queues: int) -> None:
    h = await harness(machine)
    mac = mac_for(free_octets(1)[0])
    tap = e2e_name("t")
    fds_before = h.vm.tap_fds()

    plugged = await h.plug(
        InterfaceDescription(name="eth0", hw_addr=mac),
        tap_host_side,
        model=InterworkingModel.NONE,
        queues=queues,
        tap_name=tap,
    )

    # What the guest kernel sees.
    assert plugged.nic["mac"] == mac
    expected = min(queues, VCPUS)
    assert (int(plugged.nic["rxq"]), int(plugged.nic["txq"])) == (expected, expected)
    # One vector per virtqueue of the device (all its queue pairs) plus the config vector.
    assert int(plugged.nic["msix"]) == 2 * queues + 1
    assert plugged.address == guest_ip_for_mac(mac)

    # What the host sees: our tap, multiqueue as asked, its queues held by QEMU.
    link = links()[tap]
    assert host_link(plugged.endpoint) == tap
    info = link["linkinfo"]["info_data"]
    assert info["type"] == "tap"
    assert info.get("multi_queue", False) == (queues > 1)
    assert h.vm.tap_fds() - fds_before == queues
    assert any(line.startswith(f"{plugged.endpoint.id}-net:") for line in await h.vm.netdev_lines())

    # Traffic both ways; the host's echo reply came from the guest's MAC.
    assert plugged.ping == "ok", "the guest could not ping the host end of its tap"
    assert await host_ping(guest_ip_for_mac(mac), tap), "no echo reply from the guest"
    assert neighbour_mac(tap, guest_ip_for_mac(mac)) == mac

    nic = await h.unplug(plugged)
    assert nic["mac"] == mac
    assert nic["name"] == plugged.nic["name"]
    await h.assert_gone(plugged)
    assert tap not in links()
    assert h.vm.tap_fds() == fds_before
