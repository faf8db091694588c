"""Several NICs in one guest at once, and two guests driven from one event loop.

Five NICs of every kind (two taps, and CNI veths with each interworking model) go into one
VM; all must be seen by the guest and answer pings while the others are present; they are
unplugged in an order unlike the plug order, and the guest must report each one gone. Then
two VMs (q35 and pc) are driven concurrently through two ``NetworkState`` objects from one
``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from vmfixture import *  # noqa: F403
from vmfixture import (
    Harness,
    Plugged,
    e2e_name,
    free_octets,
    host_ping,
    mac_for,
    neighbour_mac,
    tap_host_side,
)

from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import host_link
from qmpnet.testing import cni
from qmpnet.testing.guest import guest_ip_for_mac
from qmpnet.testing.probe import links


async def plug_tap(h: Harness, octet: int, queues: int) -> tuple[Plugged, str]:
    """A tap endpoint in the host netns; returns it and the host device to ping from."""
    tap = e2e_name("t")
    plugged = await h.plug(
        InterfaceDescription(name="eth0", hw_addr=mac_for(octet)),
        tap_host_side,
        model=InterworkingModel.NONE,
        queues=queues,
        tap_name=tap,
    )
    return plugged, tap


async def plug_pod(
    h: Harness, stack: contextlib.AsyncExitStack, octet: int, model: InterworkingModel
) -> tuple[Plugged, str]:
    """A CNI pod's veth with ``model``; returns it and the CNI bridge to ping from."""
    net = f"169.254.{octet}"
    pod = await stack.enter_async_context(
        cni.pod_network(
            e2e_name("c"),
            f"{net}.0/24",
            mac=mac_for(octet),
            range_start=f"{net}.10",
            bridge_address=f"{net}.1/24",
        )
    )
    plugged = await h.plug(
        InterfaceDescription(name=pod.ifname, hw_addr=pod.mac),
        model=model,
        netns_path=pod.netns_path,
    )
    return plugged, pod.bridge


async def assert_traffic(plugged: Plugged, dev: str) -> None:
    guest = guest_ip_for_mac(plugged.mac)
    assert plugged.ping == "ok", f"the guest could not ping the host end of {plugged.nic}"
    assert await host_ping(guest, dev), f"no echo reply from {guest} via {dev}"
    assert neighbour_mac(dev, guest) == plugged.mac


@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_five_nics_at_once_then_unplugged_in_another_order(harness, machine: str) -> None:
    h = await harness(machine)
    octets = free_octets(5)
    async with contextlib.AsyncExitStack() as pods:
        nics = [
            await plug_tap(h, octets[0], 1),
            await plug_tap(h, octets[1], 4),
            await plug_pod(h, pods, octets[2], InterworkingModel.TCFILTER),
            await plug_pod(h, pods, octets[3], InterworkingModel.MACVTAP),
            await plug_pod(h, pods, octets[4], InterworkingModel.BRIDGED),
        ]
        names = {p.nic["name"] for p, _ in nics}
        assert len(names) == 5, f"the guest named the NICs {names}"
        assert {p.nic["mac"] for p, _ in nics} == {p.mac for p, _ in nics}
        assert len({p.endpoint.pci_path for p, _ in nics}) == 5
        # Every NIC still carries traffic with all the others present.
        for plugged, dev in nics:
            await assert_traffic(plugged, dev)

        for index in (2, 0, 4, 1, 3):
            plugged, _ = nics[index]
            nic = await h.unplug(plugged)
            assert nic["mac"] == plugged.mac
            await h.assert_gone(plugged)
        assert not [t for t in (host_link(p.endpoint) for p, _ in nics[:2]) if t in links()]


async def one_vm_round(h: Harness, octets: list[int]) -> tuple[float, float]:
    """Plug a tap and a CNI veth, prove traffic, unplug both; (start, end) times."""
    start = time.monotonic()
    async with contextlib.AsyncExitStack() as pods:
        tap = await plug_tap(h, octets[0], 2)
        veth = await plug_pod(h, pods, octets[1], InterworkingModel.TCFILTER)
        for plugged, dev in (tap, veth):
            await assert_traffic(plugged, dev)
        for plugged, _ in (veth, tap):
            assert (await h.unplug(plugged))["mac"] == plugged.mac
            await h.assert_gone(plugged)
    return start, time.monotonic()


async def test_two_vms_driven_concurrently_from_one_loop(harness) -> None:
    q35, pc = await harness("q35"), await harness("pc")
    octets = free_octets(4)
    (s1, e1), (s2, e2) = await asyncio.gather(
        one_vm_round(q35, octets[:2]), one_vm_round(pc, octets[2:])
    )
    # Both rounds ran at the same time: neither waited for the other to finish.
    assert s2 < e1
    assert s1 < e2
