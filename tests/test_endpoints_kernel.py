"""NetPair plumbing of each interworking model, in real namespaces, without QEMU.

A CNI-like veth is made in a fresh sandbox netns (its far end in another netns); the model's
connect runs as a hot-plug would run it (steps of an Operation), then its detach. What the
host looks like is read with ``ip -d -j``/``tc -j``. Failures must undo what was done and
leave a link that is not ours untouched.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import attrs
import pytest

from qmpnet import tuntap
from qmpnet.endpoints import create_endpoint, net_info_from_interface
from qmpnet.endpoints.netpair import MODELS, NetPairEndpoint, bridge_name, parked_mac
from qmpnet.errors import InvalidInputError, LinkExistsError, PlugError
from qmpnet.lifecycle import Operation, Phase, Step
from qmpnet.marks import claimed_owner
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.reconcile import host_residue
from qmpnet.testing.scene import unique

pytestmark = [pytest.mark.kernel]

B, D, F, U = Phase.BEGIN, Phase.DONE, Phase.FAILED, Phase.UNDO


def _endpoint(
    veth: Any, model: InterworkingModel, tap: str | None = None, virt: str | None = None
) -> NetPairEndpoint:
    desc = InterfaceDescription(name=virt or veth.inner, hw_addr=veth.mac)
    endpoint = create_endpoint(
        net_info_from_interface(desc, model),
        0,
        model,
        netns_path=veth.sandbox,
        tap_name=tap or unique("t"),
    )
    assert isinstance(endpoint, NetPairEndpoint)
    return endpoint


async def _connect(ep: NetPairEndpoint, queues: int) -> tuple[tuntap.QueueFds, Operation]:
    fds = tuntap.QueueFds()
    async with Operation("hot-plug", ep.name) as op:
        await MODELS[ep.network_pair.model].connect(ep, op, queues, fds)
        op.commit()
    return fds, op


async def _detach(ep: NetPairEndpoint) -> Operation:
    async with Operation("unplug", ep.name) as op:
        await ep.teardown(op)
        op.commit()
    return op


def _ingress(host: Any, netns: str, dev: str) -> bool:
    return "ingress" in [q["kind"] for q in host.qdiscs(netns, dev)]


@pytest.mark.asyncio
@pytest.mark.parametrize("queues", [1, 4])
async def test_tcfilter_connect_and_detach(cni_veth: Any, host: Any, queues: int) -> None:
    veth = cni_veth(mac="52:54:00:00:00:41")
    host.sh("ip", "-n", host.ns_name(veth.sandbox), "link", "set", veth.inner, "mtu", "1420")
    ep = _endpoint(veth, InterworkingModel.TCFILTER)
    fds, op = await _connect(ep, queues)
    try:
        assert op.history == [
            (Step.OPEN_QUEUES, B),
            (Step.OPEN_QUEUES, D),
            (Step.PREPARE_LINKS, B),
            (Step.PREPARE_LINKS, D),
        ]
        assert len(fds.tap) == queues
        assert fds.vhost == []
        seen = host.links(veth.sandbox)
        tap = seen[ep.tap_name]
        assert tap["linkinfo"]["info_data"]["type"] == "tap"
        assert claimed_owner(tap["ifalias"]) == ep.id
        assert tap["mtu"] == 1420  # follows the veth
        assert "UP" in tap["flags"]
        assert "UP" in seen[veth.inner]["flags"]
        assert seen[veth.inner]["address"] == veth.mac  # the veth keeps its MAC
        assert _ingress(host, veth.sandbox, veth.inner)
        assert _ingress(host, veth.sandbox, ep.tap_name)
    finally:
        fds.close()  # QEMU would hold them from here on; the tap lives while someone does
    op = await _detach(ep)
    assert op.history == [(Step.REMOVE_LINKS, B), (Step.REMOVE_LINKS, D)]
    assert not _ingress(host, veth.sandbox, veth.inner)
    assert sorted(host.links(veth.sandbox)) == sorted(["lo", veth.inner])


@pytest.mark.asyncio
async def test_tcfilter_detach_removes_a_tap_that_is_still_held(cni_veth: Any, host: Any) -> None:
    veth = cni_veth(mac="52:54:00:00:00:42")
    ep = _endpoint(veth, InterworkingModel.TCFILTER)
    fds, _ = await _connect(ep, 2)
    try:
        await _detach(ep)
        assert ep.tap_name not in host.links(veth.sandbox)
        assert not _ingress(host, veth.sandbox, veth.inner)
    finally:
        fds.close()


@pytest.mark.asyncio
async def test_a_failed_join_undoes_the_queues(cni_veth: Any, host: Any) -> None:
    veth = cni_veth(mac="52:54:00:00:00:43")
    ep = _endpoint(veth, InterworkingModel.TCFILTER, virt=unique("x"))  # no such veth
    fds = tuntap.QueueFds()
    with pytest.raises(PlugError) as caught:
        async with Operation("hot-plug", ep.name) as op:
            await MODELS[InterworkingModel.TCFILTER].connect(ep, op, 2, fds)
    assert caught.value.step == "prepare-links"
    assert getattr(caught.value.cause, "errno", None) == errno.ENODEV
    assert op.history == [
        (Step.OPEN_QUEUES, B),
        (Step.OPEN_QUEUES, D),
        (Step.PREPARE_LINKS, B),
        (Step.PREPARE_LINKS, F),
        # registered before the join: a half-done join (the mirror added) is undone too
        (Step.PREPARE_LINKS, U),
        (Step.OPEN_QUEUES, U),
    ]
    assert fds.tap == []
    host.wait_until(lambda: ep.tap_name not in host.links(veth.sandbox), what="tap gone")
    assert sorted(host.links(veth.sandbox)) == sorted(["lo", veth.inner])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "model", [InterworkingModel.TCFILTER, InterworkingModel.BRIDGED, InterworkingModel.MACVTAP]
)
async def test_an_existing_tap_name_is_refused_and_survives(
    cni_veth: Any, host: Any, model: InterworkingModel
) -> None:
    veth = cni_veth(mac="52:54:00:00:00:44")
    taken = unique("t")
    host.sh("ip", "-n", host.ns_name(veth.sandbox), "tuntap", "add", "dev", taken, "mode", "tap")
    before = {name: host.stable(link) for name, link in host.links(veth.sandbox).items()}
    ep = _endpoint(veth, model, tap=taken)
    fds = tuntap.QueueFds()
    with pytest.raises(PlugError) as caught:
        async with Operation("hot-plug", ep.name) as op:
            await MODELS[model].connect(ep, op, 2, fds)
    assert isinstance(caught.value.cause, LinkExistsError)
    assert fds.tap == []
    after = {name: host.stable(link) for name, link in host.links(veth.sandbox).items()}
    assert after == before  # the other tap and the veth (MAC included) are as they were
    assert not _ingress(host, veth.sandbox, veth.inner)


@pytest.mark.asyncio
async def test_macvtap_model(cni_veth: Any, host: Any) -> None:
    veth = cni_veth(mac="52:54:00:00:00:45")
    ep = _endpoint(veth, InterworkingModel.MACVTAP)
    fds, op = await _connect(ep, 2)
    try:
        assert op.history == [
            (Step.PREPARE_LINKS, B),
            (Step.PREPARE_LINKS, D),
            (Step.OPEN_QUEUES, B),
            (Step.OPEN_QUEUES, D),
        ]
        assert len(fds.tap) == 2
        seen = host.links(veth.sandbox)
        mvt = seen[ep.tap_name]
        assert mvt["linkinfo"]["info_kind"] == "macvtap"
        assert mvt["linkinfo"]["info_data"]["mode"] == "bridge"
        assert mvt["link"] == veth.inner
        assert mvt["address"] == veth.mac  # the guest's MAC is the pod's MAC
        assert claimed_owner(mvt["ifalias"]) == ep.id
        assert "UP" in mvt["flags"]
        assert seen[veth.inner]["address"] != veth.mac  # moved aside so frames reach the tap
        for fd in fds.tap:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("/tmp/qmpnet-mvt-")
    finally:
        fds.close()
    await _detach(ep)
    seen = host.links(veth.sandbox)
    assert sorted(seen) == sorted(["lo", veth.inner])
    assert seen[veth.inner]["address"] == veth.mac  # given back


@pytest.mark.asyncio
async def test_bridged_model(cni_veth: Any, host: Any) -> None:
    veth = cni_veth(mac="52:54:00:00:00:46")
    ep = _endpoint(veth, InterworkingModel.BRIDGED)
    bridge = bridge_name(ep.network_pair)
    fds, op = await _connect(ep, 1)
    try:
        assert op.history == [
            (Step.OPEN_QUEUES, B),
            (Step.OPEN_QUEUES, D),
            (Step.PREPARE_LINKS, B),
            (Step.PREPARE_LINKS, D),
        ]
        seen = host.links(veth.sandbox)
        assert seen[bridge]["linkinfo"]["info_kind"] == "bridge"
        assert claimed_owner(seen[bridge]["ifalias"]) == ep.id
        assert seen[ep.tap_name]["master"] == bridge
        assert seen[veth.inner]["master"] == bridge
        assert claimed_owner(seen[ep.tap_name]["ifalias"]) == ep.id
        assert all("UP" in seen[n]["flags"] for n in (bridge, ep.tap_name, veth.inner))
        assert seen[veth.inner]["address"] != veth.mac
    finally:
        fds.close()
    await _detach(ep)
    seen = host.links(veth.sandbox)
    assert sorted(seen) == sorted(["lo", veth.inner])
    assert seen[veth.inner]["address"] == veth.mac
    assert "master" not in seen[veth.inner]


@pytest.mark.asyncio
async def test_mac_settles_on_the_links_own(cni_veth: Any) -> None:
    veth = cni_veth(mac="52:54:00:00:00:47")
    ep = _endpoint(veth, InterworkingModel.TCFILTER)
    blank = attrs.evolve(
        ep,
        net_pair=attrs.evolve(
            ep.net_pair, virt_iface=attrs.evolve(ep.net_pair.virt_iface, hard_addr="")
        ),
    )
    settled = await blank.settle()
    assert settled.hardware_addr == veth.mac
    wrong = attrs.evolve(
        ep,
        net_pair=attrs.evolve(
            ep.net_pair,
            virt_iface=attrs.evolve(ep.net_pair.virt_iface, hard_addr="52:54:00:00:00:99"),
        ),
    )
    from qmpnet.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="the guest must use the link's own MAC"):
        await wrong.settle()


@pytest.mark.asyncio
@pytest.mark.parametrize("model", [InterworkingModel.MACVTAP, InterworkingModel.BRIDGED])
async def test_a_link_that_replaced_the_sandbox_veth_keeps_its_mac(
    cni_veth: Any, host: Any, model: InterworkingModel
) -> None:
    """While plugged the veth wears the MAC qmpnet parked it on. If it is deleted and a new
    link takes its name, the unplug must not give the new link the old veth's MAC."""
    veth = cni_veth(mac="52:54:00:00:00:48")
    ep = _endpoint(veth, model)
    fds, _ = await _connect(ep, 1)
    fds.close()
    assert host.links(veth.sandbox)[veth.inner]["address"] == parked_mac(ep.id)
    ns = host.ns_name(veth.sandbox)
    host.sh("ip", "-n", ns, "link", "del", veth.inner)
    peer = unique("w")
    host.sh("ip", "-n", ns, "link", "add", veth.inner, "type", "veth", "peer", "name", peer)
    newcomer = host.links(veth.sandbox)[veth.inner]["address"]
    await _detach(ep)
    seen = host.links(veth.sandbox)
    assert seen[veth.inner]["address"] == newcomer
    assert sorted(seen) == sorted(["lo", veth.inner, peer])


@pytest.mark.asyncio
async def test_a_bridge_name_too_long_fails_before_anything_is_made(
    cni_veth: Any, host: Any
) -> None:
    veth = cni_veth(mac="52:54:00:00:00:49")
    ep = _endpoint(veth, InterworkingModel.BRIDGED, tap=(unique("x") + "a" * 15)[:15])
    fds = tuntap.QueueFds()
    before = sorted(host.links(veth.sandbox))
    with pytest.raises(InvalidInputError) as caught:
        async with Operation("hot-plug", ep.name) as op:
            await MODELS[InterworkingModel.BRIDGED].connect(ep, op, 1, fds)
    assert caught.value.field == "bridge name"
    assert op.history == []
    assert fds.tap == []
    assert sorted(host.links(veth.sandbox)) == before


@pytest.mark.asyncio
async def test_a_foreign_ingress_qdisc_survives_a_tcfilter_detach(cni_veth: Any, host: Any) -> None:
    """What a reconcile does for a plug that crashed before it joined the links: detach.
    The ingress qdisc on the veth belongs to another tool (its filter is not qmpnet's)."""
    veth = cni_veth(mac="52:54:00:00:00:4a")
    ns = host.ns_name(veth.sandbox)
    host.sh("tc", "-n", ns, "qdisc", "add", "dev", veth.inner, "ingress")
    other = unique("w")  # another tool's mirror (the kernel here has mirred, not gact)
    host.sh("ip", "-n", ns, "link", "add", other, "type", "veth", "peer", "name", unique("w"))
    host.sh(
        "tc",
        "-n",
        ns,
        "filter",
        "add",
        "dev",
        veth.inner,
        "parent",
        "ffff:",
        "prio",
        "5",
        "protocol",
        "all",
        "u32",
        "match",
        "u32",
        "0",
        "0",
        "action",
        "mirred",
        "egress",
        "redirect",
        "dev",
        other,
    )
    ep = _endpoint(veth, InterworkingModel.TCFILTER)
    await _detach(ep)
    assert _ingress(host, veth.sandbox, veth.inner)
    filters = json.loads(
        host.sh("tc", "-j", "-n", ns, "filter", "show", "dev", veth.inner, "ingress").stdout
    )
    assert {f.get("pref") for f in filters} == {5}


@pytest.mark.asyncio
async def test_a_refused_bridged_plug_leaves_the_veth_in_its_own_bridge(
    cni_veth: Any, host: Any
) -> None:
    veth = cni_veth(mac="52:54:00:00:00:4b")
    ns = host.ns_name(veth.sandbox)
    theirs = unique("b")
    host.sh("ip", "-n", ns, "link", "add", theirs, "type", "bridge")
    host.sh("ip", "-n", ns, "link", "set", veth.inner, "master", theirs)
    ep = _endpoint(veth, InterworkingModel.BRIDGED)
    host.sh("ip", "-n", ns, "link", "add", bridge_name(ep.network_pair), "type", "bridge")
    fds = tuntap.QueueFds()
    with pytest.raises(PlugError) as caught:
        async with Operation("hot-plug", ep.name) as op:
            await MODELS[InterworkingModel.BRIDGED].connect(ep, op, 1, fds)
    assert isinstance(caught.value.cause, LinkExistsError)
    seen = host.links(veth.sandbox)
    assert seen[veth.inner]["master"] == theirs
    assert seen[veth.inner]["address"] == veth.mac
    assert bridge_name(ep.network_pair) in seen  # not ours: left alone


@pytest.mark.asyncio
@pytest.mark.parametrize("model", [InterworkingModel.MACVTAP, InterworkingModel.BRIDGED])
async def test_links_are_made_under_a_staging_name_that_reconcile_removes(
    cni_veth: Any, host: Any, model: InterworkingModel
) -> None:
    """A persistent link is created as ``<endpoint id>``, marked, then renamed: a crash
    between create and mark leaves a link named after the endpoint, which reconcile's host
    check deletes (nobody else names a link ``qn`` + 10 hex digits)."""
    veth = cni_veth(mac="52:54:00:00:00:4c")
    ep = _endpoint(veth, model)
    fds, _ = await _connect(ep, 1)
    fds.close()
    seen = host.links(veth.sandbox)
    assert ep.id not in seen
    made = ep.tap_name if model is InterworkingModel.MACVTAP else bridge_name(ep.network_pair)
    assert claimed_owner(seen[made]["ifalias"]) == ep.id
    await _detach(ep)
    # the crash: a link under the staging name, not marked yet
    ns = host.ns_name(veth.sandbox)
    host.sh("ip", "-n", ns, "link", "add", ep.id, "type", "bridge")
    assert await host_residue(ep) == []
    assert sorted(host.links(veth.sandbox)) == sorted(["lo", veth.inner])


@pytest.mark.asyncio
async def test_a_tcfilter_join_failing_after_the_mirror_leaves_no_qdisc(
    cni_veth: Any, host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mirror is on the pod's link when bringing the link up fails: the join's undo was
    registered before it ran, so qmpnet's ingress qdisc goes with the failed plug."""
    from qmpnet.errors import HostError
    from qmpnet.links import Links

    veth = cni_veth(mac="52:54:00:00:00:4c")
    ep = _endpoint(veth, InterworkingModel.TCFILTER)
    real = Links.set_up

    async def refuse_the_pod_link(self: Links, name: str, up: bool = True) -> None:
        if name == ep.virt_name:
            raise HostError("set link state", name, errno.EPERM)
        await real(self, name, up)

    monkeypatch.setattr(Links, "set_up", refuse_the_pod_link)
    fds = tuntap.QueueFds()
    with pytest.raises(PlugError) as caught:
        async with Operation("hot-plug", ep.name) as op:
            await MODELS[InterworkingModel.TCFILTER].connect(ep, op, 1, fds)
    assert caught.value.step == "prepare-links"
    assert not _ingress(host, veth.sandbox, veth.inner)
    host.wait_until(lambda: ep.tap_name not in host.links(veth.sandbox), what="tap gone")


@pytest.mark.asyncio
async def test_a_live_mtu_change_that_fails_half_way_gives_back_what_it_changed(
    netns: str,
) -> None:
    """set_links_mtu is all or nothing: 65530 suits a veth but not a tap (at most 65521), so
    the veth, set first, is given its MTU back when the tap refuses."""
    from qmpnet.endpoints.plumbing import set_links_mtu
    from qmpnet.errors import HostError
    from qmpnet.links import Links
    from qmpnet.netns import run_in_netns

    owner, veth, tap = "qn0123456789", unique("v"), unique("t")
    fds = await run_in_netns(netns, lambda: tuntap.open_tap_queues(tap, 1))
    try:
        async with Links.open(netns) as links:
            await links.add_veth(veth, unique("p"), owner)
            await links.mark_ours(tap, owner)
            before = {name: (await links.get(name)).mtu for name in (veth, tap)}
        with pytest.raises(HostError):
            await set_links_mtu(netns, [veth, tap], owner, 65530)
        async with Links.open(netns) as links:
            assert {name: (await links.get(name)).mtu for name in (veth, tap)} == before
        await set_links_mtu(netns, [veth, tap], owner, 9000)  # one both can have
        async with Links.open(netns) as links:
            assert {(await links.get(name)).mtu for name in (veth, tap)} == {9000}
    finally:
        for fd in fds:
            os.close(fd)
