"""A CNI-made veth endpoint in a real guest, for every interworking model, machine and 1/4 queues.

The pod netns is made as a runtime makes it: Debian's ``bridge`` + ``host-local`` plugins,
invoked with the CNI environment (:mod:`qmpnet.testing.cni`). The guest NIC takes the pod
veth's MAC; the CNI bridge (the far side of the veth, in the host namespace) is given the
guest's peer address. Traffic must cross qmpnet's plumbing both ways: the guest pings the
bridge, and the bridge's ping is answered from the guest's MAC. The plumbing itself is read
with ``ip``/``tc`` in the pod netns, and after the unplug the pod must look as the CNI plugin
left it.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from vmfixture import *  # noqa: F403
from vmfixture import VCPUS, e2e_name, free_octets, host_ping, mac_for, neighbour_mac

from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import host_link
from qmpnet.testing import cni
from qmpnet.testing.guest import guest_ip_for_mac
from qmpnet.testing.probe import links, ns_name

MODELS = [InterworkingModel.TCFILTER, InterworkingModel.MACVTAP, InterworkingModel.BRIDGED]


def _pod_network() -> tuple[str, str, AbstractAsyncContextManager[cni.Pod]]:
    """A pod network on a free 169.254.B/24: (``169.254.B``, the pod MAC, the network)."""
    octet = free_octets(1)[0]
    net = f"169.254.{octet}"
    mac = mac_for(octet)
    network = cni.pod_network(
        e2e_name("c"),
        f"{net}.0/24",
        mac=mac,
        range_start=f"{net}.10",
        range_end=f"{net}.250",
        bridge_address=f"{net}.1/24",
    )
    return net, mac, network


def tc_ingress_actions(netns: str, dev: str) -> list[dict[str, Any]]:
    """The actions of the filters on ``dev``'s ingress qdisc, as ``tc -j`` shows them."""
    out = subprocess.run(
        ["tc", "-j", "-n", netns, "filter", "show", "dev", dev, "ingress"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return []
    filters = json.loads(out.stdout or "[]")
    return [action for f in filters for action in f.get("options", {}).get("actions", [])]


def has_ingress_qdisc(netns: str, dev: str) -> bool:
    out = subprocess.run(
        ["tc", "-j", "-n", netns, "qdisc", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    )
    return any(q.get("kind") == "ingress" for q in json.loads(out.stdout or "[]"))


def assert_plumbing(model: InterworkingModel, netns: str, pod: cni.Pod, tap: str) -> None:
    """What each model must have built in the pod netns, read with ip/tc."""
    inside = links(netns)
    veth = inside[pod.ifname]
    if model is InterworkingModel.TCFILTER:
        redirects = {
            (a.get("kind"), a.get("to_dev")) for a in tc_ingress_actions(netns, pod.ifname)
        }
        assert ("mirred", tap) in redirects
        assert ("mirred", pod.ifname) in {
            (a.get("kind"), a.get("to_dev")) for a in tc_ingress_actions(netns, tap)
        }
        assert veth["address"] == pod.mac  # the veth keeps its MAC; its stack sees nothing
    elif model is InterworkingModel.MACVTAP:
        assert inside[tap]["linkinfo"]["info_kind"] == "macvtap"
        assert inside[tap]["address"] == pod.mac  # the guest's MAC, on the macvtap
        assert inside[tap]["link"] == pod.ifname
        assert veth["address"] != pod.mac  # or the veth would take the guest's frames
    else:
        bridges = [
            n for n, link in inside.items() if link.get("linkinfo", {}).get("info_kind") == "bridge"
        ]
        assert len(bridges) == 1
        assert veth.get("master") == bridges[0]
        assert inside[tap].get("master") == bridges[0]
        assert veth["address"] != pod.mac


@pytest.mark.parametrize("queues", [1, 4])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.value)
@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_cni_veth_end_to_end(
    harness, machine: str, model: InterworkingModel, queues: int
) -> None:
    h = await harness(machine)
    net, mac, network = _pod_network()
    async with network as pod:
        assert pod.mac == mac
        # host-local's address (whichever it chose) must not shadow the guest's or the host's.
        assert all(str(ip.ip) not in (f"{net}.1", f"{net}.2") for ip in pod.ips)
        before = links(pod.netns)

        plugged = await h.plug(
            InterfaceDescription(name=pod.ifname, hw_addr=mac),
            model=model,
            netns_path=pod.netns_path,
            queues=queues,
        )

        assert plugged.nic["mac"] == mac
        expected = min(queues, VCPUS)
        assert (int(plugged.nic["rxq"]), int(plugged.nic["txq"])) == (expected, expected)
        assert plugged.address == guest_ip_for_mac(mac)
        tap = host_link(plugged.endpoint)
        assert tap not in links(), "a NetPair's tap belongs in the pod netns"
        assert_plumbing(model, pod.netns, pod, tap)

        assert plugged.ping == "ok", f"the guest could not ping the CNI bridge {net}.1"
        assert await host_ping(f"{net}.2", pod.bridge), "no echo reply from the guest"
        assert neighbour_mac(pod.bridge, f"{net}.2") == mac

        nic = await h.unplug(plugged)
        assert nic["mac"] == mac
        await h.assert_gone(plugged)
        after = links(pod.netns)
        assert set(after) == set(before) == {"lo", pod.ifname}
        assert after[pod.ifname]["address"] == mac
        assert after[pod.ifname].get("master") is None
        assert not has_ingress_qdisc(pod.netns, pod.ifname)
    assert pod.host_veth not in links()


async def test_unplug_gives_a_down_sandbox_link_its_state_back(harness) -> None:
    """The plug sets the pod's veth up to carry the guest's traffic; one found down is
    down again once the NIC is unplugged (seen with ``ip -j link``)."""
    h = await harness("q35")
    _, mac, network = _pod_network()
    async with network as pod:
        ns = ns_name(pod.netns)
        subprocess.run(["ip", "-n", ns, "link", "set", pod.ifname, "down"], check=True)  # noqa: ASYNC221
        assert "UP" not in links(pod.netns)[pod.ifname]["flags"]
        plugged = await h.plug(
            InterfaceDescription(name=pod.ifname, hw_addr=mac),
            model=InterworkingModel.TCFILTER,
            netns_path=pod.netns_path,
            queues=1,
        )
        assert "UP" in links(pod.netns)[pod.ifname]["flags"]
        await h.unplug(plugged)
        await h.assert_gone(plugged)
        after = links(pod.netns)[pod.ifname]
        assert "UP" not in after["flags"]
        assert after["address"] == mac
        assert not has_ingress_qdisc(pod.netns, pod.ifname)
