"""NetPair endpoints: a link a CNI plugin made in the sandbox netns, joined to a tap QEMU reads.

``veth`` (type ``virtual``), ``macvlan`` and ``tuntap`` share this plumbing; they differ only
in their type tag. How the sandbox link is joined to the tap is the interworking model: one
:class:`PairModel` each in :data:`MODELS`, used by every door (plug, unplug, the watcher's "is
it still joined?", reconcile's residue check, the CNI result's MAC):

- ``tcfilter``: a new tap; tc ingress + mirred redirect from the link to the tap and back.
- ``macvtap``: a bridge-mode macvtap on the link carrying the link's MAC; QEMU reads its queues.
- ``bridged``: a new tap and a new bridge enslaving both.

The guest NIC always takes the sandbox link's MAC (the address the pod network knows). Where
the link's MAC would capture the guest's frames (macvtap, bridged), the link gets a fresh MAC
and gets its own back on unplug.

The sandbox link is not qmpnet's. Before anything is changed (the ``validate`` step) it must
be of the endpoint type's kind (a veth for ``virtual``, a macvlan, a tun link for ``tuntap``),
and it is refused when it lives in qmpnet's own (the host's) namespace or is a port of a
bridge or bond, unless the caller passes ``allow_foreign_link``. What a model changes on it
(admin state, MAC) is recorded in :class:`FoundLink` and given back on unplug and on undo.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, ClassVar, Self

import attrs

from qmpnet import tuntap
from qmpnet.endpoints import plumbing, shaping
from qmpnet.endpoints.base import (
    EndpointSpec,
    PlugContext,
    described_mtu,
    new_id,
    register,
    unsupported,
    with_mtu,
)
from qmpnet.errors import InvalidInputError, NotOursError, UnsupportedError
from qmpnet.lifecycle import Operation, Step
from qmpnet.links import LinkInfo, Links, ours
from qmpnet.model import (
    EndpointType,
    InterworkingModel,
    NetworkInfo,
    NetworkInterface,
    NetworkInterfacePair,
    TapInterface,
    check_ifname,
    check_tap_mtu,
)
from qmpnet.netns import is_own_netns

if TYPE_CHECKING:
    from qmpnet.hypervisor import RxFilter

log = logging.getLogger(__name__)


#: Runs a model's host plumbing for one plug: ``(endpoint, op, queues, fds)``.
Connect = Callable[["NetPairEndpoint", Operation, int, tuntap.QueueFds], Awaitable[None]]
#: Whether a saved NIC's sandbox link is still joined: ``(pair, links, link, by_index)``.
Attached = Callable[
    [NetworkInterfacePair, Links, LinkInfo, Mapping[int, LinkInfo]], Awaitable[bool]
]
#: What a model's plumbing left on the sandbox link ``(pair, links, link)``, as sentences.
Leftover = Callable[[NetworkInterfacePair, Links, LinkInfo], Awaitable[list[str]]]
#: Refuses a sandbox link the model cannot join as it is ``(endpoint, links, link)``; it runs
#: in the validate step, so it reads and never changes.
Admit = Callable[["NetPairEndpoint", Links, LinkInfo], Awaitable[None]]


@attrs.frozen(kw_only=True)
class FoundLink:
    """The sandbox link as the plug found it: what the unplug gives back."""

    #: its ifindex: a link that took the name meanwhile is another link, left alone
    index: int
    #: its admin state (every model sets it up to carry the guest's traffic)
    up: bool


ShapeSites = tuple[shaping.Site, shaping.Site]


@attrs.frozen
class PairModel:
    """Everything one interworking model means, in one place.

    A new model is one entry of :data:`MODELS`; no other module switches on the model.
    """

    #: create the host links and open the queue fds QEMU will read
    connect: Connect
    #: remove what ``connect`` made and restore the sandbox link (idempotent)
    disconnect: Callable[[NetPairEndpoint], Awaitable[None]]
    #: whether the sandbox link is still joined to the tap (the watcher's check)
    attached: Attached
    #: what of this model's plumbing (besides marked links) may stay on the sandbox link
    leftover: Leftover
    #: the sandbox link wears :func:`parked_mac` while the guest's NIC uses its own MAC
    parks_mac: bool
    #: refuses a sandbox link this model cannot join as it is
    admit: Admit
    #: qmpnet's own links of a plugged pair, those a live MTU change sets: the ports first
    own_links: Callable[[NetworkInterfacePair], tuple[str, ...]] = lambda pair: (
        pair.tap_interface.tap_iface.name,
    )
    #: QEMU reads a tun tap's queues (the macvtap model: a macvtap's, whose fds name no link)
    reads_tun: bool = True
    #: where the guest's inbound and outbound traffic is shaped (:mod:`.shaping`); by
    #: default the tap's egress, and its ingress through the NIC's ifb
    shape_sites: Callable[[NetworkInterfacePair], ShapeSites] = lambda pair: (
        _tap_site(pair),
        _tap_site(pair, ifb=True),
    )
    #: the host link QEMU reads passes only frames for its MAC and its multicast list (a
    #: macvtap): a guest's own filter can be mirrored onto it (``--trust-guest-rx-filters``)
    filters_by_mac: bool = False
    #: the host link QEMU reads dies with the sandbox link (the kernel deletes a macvtap with
    #: its parent); QEMU 7.2 aborts when the guest resets a multiqueue NIC whose tap is gone,
    #: so a caller that cannot unplug first (the watcher) plugs one queue pair
    dies_with_link: bool = False

    async def residue(self, pair: NetworkInterfacePair, links: Links, virt: LinkInfo) -> list[str]:
        """What is left on the sandbox link after a disconnect that did not finish."""
        problems = await self.leftover(pair, links, virt)
        tap = pair.tap_interface
        if self.parks_mac and virt.mac == parked_mac(tap.id):
            problems.append(
                f"{virt.name} still has the MAC {virt.mac} qmpnet set, not its own "
                f"{tap.tap_iface.hard_addr}"
            )
        return problems


def _tap_site(pair: NetworkInterfacePair, *, ifb: bool = False) -> shaping.Site:
    return shaping.Site(pair.tap_interface.tap_iface.name, ifb=ifb)


def parked_mac(endpoint_id: str) -> str:
    """The MAC the sandbox link wears while the guest uses its own (locally administered).

    Derived from the endpoint's id, so an undo or a later process can tell the link it
    changed from a link that replaced it, and only ever gives back what it took.
    """
    digest = hashlib.sha256(endpoint_id.encode()).digest()
    return "0a:" + ":".join(f"{b:02x}" for b in digest[:5])


def bridge_name(pair: NetworkInterfacePair) -> str:
    """The bridge of the ``bridged`` model, named after the pair's tap (``br0_kata``)."""
    tap = pair.tap_interface.tap_iface.name
    return check_ifname("bridge name", "br" + tap[3:] if tap.startswith("tap") else "br-" + tap)


# --- tcfilter --------------------------------------------------------------------------------


async def _tc_connect(
    ep: NetPairEndpoint, op: Operation, queues: int, fds: tuntap.QueueFds
) -> None:
    await plumbing.open_tap(op, ep.netns_path, ep.tap_name, queues, fds)

    async def join() -> None:
        async with Links.open(ep.netns_path) as links:
            virt = await links.get(ep.virt_name)
            await links.configure(ep.tap_name, mtu=virt.mtu, owner=ep.id, up=True)
            await links.add_tc_mirror(ep.virt_name, ep.tap_name)
            await links.set_up(ep.virt_name)

    # Registered first: a join that fails half-way (the mirror added, the link not up yet)
    # or is cancelled must not leave qmpnet's qdisc on the pod's link.
    op.on_undo(Step.PREPARE_LINKS, lambda: _tc_disconnect(ep))
    await op.step(Step.PREPARE_LINKS, join)


def _tap_mtu(ep: NetPairEndpoint, virt: LinkInfo) -> None:
    """The tap takes the link's MTU: one a tap cannot have is refused before it is made."""
    check_tap_mtu(f"MTU of {ep.virt_name}", virt.mtu)


async def _tc_admit(ep: NetPairEndpoint, links: Links, virt: LinkInfo) -> None:
    _tap_mtu(ep, virt)
    if await links.has_tc_ingress(virt.name):
        raise UnsupportedError(
            f"{ep.type} endpoint {ep.virt_name}",
            "tcfilter plumbing",
            "the link already has an ingress qdisc, not qmpnet's: it is left as it is",
        )


async def _tc_attached(
    pair: NetworkInterfacePair, links: Links, link: LinkInfo, by_index: Mapping[int, LinkInfo]
) -> bool:
    # A new link of the same name has no ingress qdisc: the mirror went with the old one.
    return await links.has_tc_ingress(link.name) and await links.tc_ingress_ours(link.name)


async def _tc_leftover(pair: NetworkInterfacePair, links: Links, virt: LinkInfo) -> list[str]:
    if await links.has_tc_ingress(virt.name) and await links.tc_ingress_ours(virt.name):
        return [f"{virt.name} still has qmpnet's ingress qdisc"]
    return []


async def _nothing_left(pair: NetworkInterfacePair, links: Links, virt: LinkInfo) -> list[str]:
    return []  # everything it makes is a marked link, which the residue check deletes


async def _delete_ours(links: Links, name: str, owner: str) -> None:
    """Delete our link ``name``; a link of that name qmpnet did not make is left untouched.

    Not an error here: undoing a plug that found the name taken must go on and give the
    sandbox link its own MAC back.
    """
    try:
        await links.delete(name, owner=owner)
    except NotOursError as err:
        log.warning("%s", err)


async def _tc_disconnect(ep: NetPairEndpoint) -> None:
    async with Links.open(ep.netns_path) as links:
        await links.del_tc_ingress(ep.virt_name)
        await _delete_ours(links, ep.tap_name, ep.id)
        await _restore_state(links, ep)


async def _restore_state(links: Links, ep: NetPairEndpoint) -> None:
    """Set the sandbox link down again if it was down when the plug found it.

    Only the very link that was found (same ifindex); one that replaced it is not ours to
    change. An endpoint saved before the state was recorded (``found`` None) is left as is.
    """
    found = ep.found
    if found is None or found.up:
        return
    virt = await links.lookup(ep.virt_name)
    if virt is None or virt.index != found.index:
        return
    if virt.up:
        await links.set_up(ep.virt_name, False)


# --- macvtap ---------------------------------------------------------------------------------


async def _macvtap_connect(
    ep: NetPairEndpoint, op: Operation, queues: int, fds: tuntap.QueueFds
) -> None:
    async def create() -> None:
        async with Links.open(ep.netns_path) as links:
            virt = await links.get(ep.virt_name)
            await links.set_mac(ep.virt_name, parked_mac(ep.id))
            await links.add_macvtap(ep.tap_name, ep.virt_name, ep.hardware_addr, ep.id)
            await links.configure(ep.tap_name, mtu=virt.mtu, up=True)
            await links.set_up(ep.virt_name)

    # Registered first: a failure half-way (MAC already changed) is undone too.
    op.on_undo(Step.PREPARE_LINKS, lambda: _macvtap_disconnect(ep))
    await op.step(Step.PREPARE_LINKS, create)
    await plumbing.open_macvtap(op, ep.netns_path, ep.tap_name, queues, fds)


async def _macvtap_admit(ep: NetPairEndpoint, links: Links, virt: LinkInfo) -> None:
    return None  # the macvtap takes its MTU from the link: nothing more to refuse


async def _macvtap_attached(
    pair: NetworkInterfacePair, links: Links, link: LinkInfo, by_index: Mapping[int, LinkInfo]
) -> bool:
    # The kernel deletes a macvtap with its parent: the tap's presence is the proof.
    return True


async def _macvtap_disconnect(ep: NetPairEndpoint) -> None:
    async with Links.open(ep.netns_path) as links:
        await _delete_ours(links, ep.tap_name, ep.id)
        await _restore_mac(links, ep)
        await _restore_state(links, ep)


async def _restore_mac(links: Links, ep: NetPairEndpoint) -> None:
    """Give the sandbox link its MAC back, if it is still the link qmpnet parked."""
    virt = await links.lookup(ep.virt_name)
    if virt is None or virt.mac == ep.hardware_addr:
        return
    if virt.mac != parked_mac(ep.id):
        log.warning(
            "%s has MAC %s, not the one qmpnet set: a new link took its name, left alone",
            ep.virt_name,
            virt.mac,
        )
        return
    await links.set_mac(ep.virt_name, ep.hardware_addr)


# --- bridged ---------------------------------------------------------------------------------


async def _bridge_connect(
    ep: NetPairEndpoint, op: Operation, queues: int, fds: tuntap.QueueFds
) -> None:
    bridge = bridge_name(ep.net_pair)  # a name too long fails before anything is made
    await plumbing.open_tap(op, ep.netns_path, ep.tap_name, queues, fds)

    async def join() -> None:
        async with Links.open(ep.netns_path) as links:
            virt = await links.get(ep.virt_name)
            await links.configure(ep.tap_name, mtu=virt.mtu, owner=ep.id)
            await links.add_bridge(bridge, ep.id, mtu=virt.mtu)
            await links.set_mac(ep.virt_name, parked_mac(ep.id))
            await links.set_master(ep.virt_name, bridge)
            await links.set_master(ep.tap_name, bridge)
            for name in (bridge, ep.tap_name, ep.virt_name):
                await links.set_up(name)

    op.on_undo(Step.PREPARE_LINKS, lambda: _bridge_disconnect(ep))
    await op.step(Step.PREPARE_LINKS, join)


async def _bridge_admit(ep: NetPairEndpoint, links: Links, virt: LinkInfo) -> None:
    _tap_mtu(ep, virt)
    if virt.master:
        raise UnsupportedError(
            f"{ep.type} endpoint {ep.virt_name}",
            "bridged plumbing",
            "the link is a port of another master; the bridged model would take it out",
        )


async def _bridge_attached(
    pair: NetworkInterfacePair, links: Links, link: LinkInfo, by_index: Mapping[int, LinkInfo]
) -> bool:
    master = by_index.get(link.master)
    return (
        master is not None
        and master.name == bridge_name(pair)
        and ours(master, pair.tap_interface.id, by_name=True)
    )


async def _bridge_disconnect(ep: NetPairEndpoint) -> None:
    async with Links.open(ep.netns_path) as links:
        virt = await links.lookup(ep.virt_name)
        if virt is not None and virt.master:
            # only out of qmpnet's own bridge: the sandbox link may be in someone else's
            master = next((link for link in await links.list() if link.index == virt.master), None)
            if master is not None and ours(master, ep.id, by_name=True):
                await links.set_master(ep.virt_name, None)
        await _delete_ours(links, bridge_name(ep.net_pair), ep.id)
        await _delete_ours(links, ep.tap_name, ep.id)
        await _restore_mac(links, ep)
        await _restore_state(links, ep)


MODELS: Mapping[InterworkingModel, PairModel] = {
    InterworkingModel.TCFILTER: PairModel(
        _tc_connect,
        _tc_disconnect,
        _tc_attached,
        _tc_leftover,
        parks_mac=False,
        admit=_tc_admit,
        # the tap's ingress already goes to the sandbox link, and an ifb would re-inject past
        # that redirect: what the guest sends is shaped leaving the sandbox link instead
        shape_sites=lambda pair: (_tap_site(pair), shaping.Site(pair.virt_iface.name)),
    ),
    InterworkingModel.MACVTAP: PairModel(
        _macvtap_connect,
        _macvtap_disconnect,
        _macvtap_attached,
        _nothing_left,
        parks_mac=True,
        admit=_macvtap_admit,
        dies_with_link=True,
        reads_tun=False,
        filters_by_mac=True,
        # the macvtap's egress carries what the guest sends; what it receives only arrives
        shape_sites=lambda pair: (_tap_site(pair, ifb=True), _tap_site(pair)),
    ),
    InterworkingModel.BRIDGED: PairModel(
        _bridge_connect,
        _bridge_disconnect,
        _bridge_attached,
        _nothing_left,
        parks_mac=True,
        admit=_bridge_admit,
        own_links=lambda pair: (pair.tap_interface.tap_iface.name, bridge_name(pair)),
    ),
}


def pair_model(model: InterworkingModel) -> PairModel:
    resolved = model.resolved()
    if resolved is InterworkingModel.NONE:
        raise InvalidInputError(
            "interworking model",
            model.value,
            "model none plugs a tap endpoint; a NetPair needs tcfilter, macvtap or bridged",
        )
    try:
        return MODELS[resolved]
    except KeyError:
        raise UnsupportedError(
            f"interworking model {model.value}",
            "NetPair plumbing",
            "this model has no defined plumbing; use tcfilter, macvtap or bridged",
        ) from None


@attrs.frozen(kw_only=True)
class NetPairEndpoint:
    """A sandbox link (``virt_iface``) joined to a tap by ``net_pair.model``."""

    type: ClassVar[EndpointType] = EndpointType.VETH
    #: the netlink kind the sandbox link must have
    link_kind: ClassVar[str] = "veth"

    net_pair: NetworkInterfacePair
    properties: NetworkInfo | None = None
    pci_path: str = ""
    netns_path: str = ""
    queues: int = 0
    #: the sandbox link as the plug found it (None: saved before qmpnet recorded it)
    found: FoundLink | None = None

    @property
    def name(self) -> str:
        return self.net_pair.virt_iface.name

    @property
    def hardware_addr(self) -> str:
        return self.net_pair.tap_interface.tap_iface.hard_addr

    @property
    def network_pair(self) -> NetworkInterfacePair:
        return self.net_pair

    @property
    def id(self) -> str:
        return self.net_pair.tap_interface.id

    @property
    def tap(self) -> TapInterface:
        return self.net_pair.tap_interface

    @property
    def reads_tun(self) -> bool:
        return self.pair_model.reads_tun

    @property
    def mtu(self) -> int:
        return described_mtu(self.properties)

    @property
    def host_link(self) -> str:
        return self.net_pair.tap_interface.tap_iface.name

    @property
    def virt_name(self) -> str:
        return self.net_pair.virt_iface.name

    @property
    def tap_name(self) -> str:
        return self.net_pair.tap_interface.tap_iface.name

    @property
    def pair_model(self) -> PairModel:
        return pair_model(self.net_pair.model)

    @property
    def shaping(self) -> shaping.Sites:
        inbound, outbound = self.pair_model.shape_sites(self.net_pair)
        return shaping.Sites(
            netns=self.netns_path, owner=self.id, inbound=inbound, outbound=outbound
        )

    @classmethod
    def create(cls, spec: EndpointSpec) -> Self:
        if spec.idx < 0:
            raise InvalidInputError("index", spec.idx, "must be >= 0")
        pair_model(spec.model)  # an unusable model is refused before anything is made
        info = spec.net_info
        virt_name = info.iface.name or f"eth{spec.idx}"
        tap = TapInterface(
            id=spec.endpoint_id or new_id(),
            name=virt_name,
            tap_iface=NetworkInterface(
                name=check_ifname("tap name", spec.tap_name or f"tap{spec.idx}_kata"),
                hard_addr=info.iface.hardware_addr,
            ),
        )
        pair = NetworkInterfacePair(
            tap_interface=tap,
            model=spec.model.resolved(),
            virt_iface=NetworkInterface(
                name=virt_name, hard_addr=info.iface.hardware_addr, addrs=info.addrs
            ),
        )
        return cls(net_pair=pair, properties=info, netns_path=spec.netns_path, queues=spec.queues)

    async def attach(self, ctx: PlugContext) -> Self:
        raise unsupported(self, "cold plug", "qmpnet plugs into a running VM: use hot_attach")

    async def settle(self, *, allow_foreign_link: bool = False) -> Self:
        """Read the sandbox link, refuse one this endpoint must not join, and record it.

        Changes nothing. The guest MAC is the link's own (as the pod network knows it); the
        link's admin state is kept in :attr:`found` for the unplug. Refused: a link of
        another kind (:class:`InvalidInputError`), and unless ``allow_foreign_link`` a link
        of qmpnet's own (the host's) namespace or a port of a bridge or bond; then what the
        model cannot join (:class:`UnsupportedError`).
        """
        if not allow_foreign_link and is_own_netns(self.netns_path):
            raise InvalidInputError(
                "netns",
                self.netns_path,
                f"{self.virt_name} would be a link of qmpnet's own (the host's) namespace, "
                "not of a sandbox; allow foreign links to join it anyway",
            )
        async with Links.open(self.netns_path) as links:
            virt = await links.get(self.virt_name)
            if virt.kind != self.link_kind:
                raise InvalidInputError(
                    f"kind of {self.virt_name}",
                    virt.kind or "device",
                    f"a {self.type} endpoint joins a {self.link_kind} link, not this one",
                )
            if virt.master and not allow_foreign_link:
                master = next((x.name for x in await links.list() if x.index == virt.master), "")
                raise InvalidInputError(
                    f"master of {self.virt_name}",
                    master or virt.master,
                    "the link is a port of a bridge or bond and carries others' traffic; "
                    "allow foreign links to join it anyway",
                )
            await self.pair_model.admit(self, links, virt)
        given = self.net_pair.virt_iface.hard_addr
        if given and given != virt.mac:
            raise InvalidInputError(
                "hwAddr",
                given,
                f"{self.virt_name} in the netns has MAC "
                f"{virt.mac}; the guest must use the link's own MAC",
            )
        tap = self.net_pair.tap_interface
        tap = attrs.evolve(tap, tap_iface=attrs.evolve(tap.tap_iface, hard_addr=virt.mac))
        virt_iface = attrs.evolve(self.net_pair.virt_iface, hard_addr=virt.mac)
        return attrs.evolve(
            self,
            net_pair=attrs.evolve(self.net_pair, tap_interface=tap, virt_iface=virt_iface),
            found=FoundLink(index=virt.index, up=virt.up),
            # the tap takes the link's MTU, whatever the description said: record what it is
            properties=with_mtu(self.properties, virt.mtu),
        )

    async def hot_attach(self, ctx: PlugContext) -> Self:
        model = self.pair_model
        ep = await ctx.op.step(
            Step.VALIDATE, lambda: self.settle(allow_foreign_link=ctx.allow_foreign_link)
        )
        # The journal's one record is written at the next step, from the subject: with the
        # settled MAC and the state found, a recovery after a crash can give the sandbox link
        # back as it was.
        ctx.op.subject = ep

        async def open_host(queues: int, fds: tuntap.QueueFds) -> None:
            await model.connect(ep, ctx.op, queues, fds)

        pci_path, queues = await plumbing.plug_queues(
            ctx, ep.tap, ep.hardware_addr, self.queues, open_host, ep.mtu, ep.shaping
        )
        return attrs.evolve(ep, pci_path=pci_path, queues=queues)

    async def hot_detach(self, ctx: PlugContext) -> None:
        await ctx.hypervisor.unplug_tap(self.tap, ctx.op, tun=self.reads_tun)
        await self.teardown(ctx.op)

    async def set_mtu(self, mtu: int) -> Self:
        check_tap_mtu("mtu", mtu)
        async with Links.open(self.netns_path) as links:
            virt = await links.get(self.virt_name)
        if mtu > virt.mtu:
            raise InvalidInputError(
                "mtu",
                mtu,
                f"above the MTU of {self.virt_name} ({virt.mtu}), the sandbox link that carries "
                "the NIC's frames: raise that link's first",
            )
        names = self.pair_model.own_links(self.net_pair)
        if mtu < self.mtu:  # a bridge's MTU may not exceed its ports': lower it first
            names = names[::-1]
        await plumbing.set_links_mtu(self.netns_path, names, self.id, mtu)
        return attrs.evolve(self, properties=with_mtu(self.properties, mtu))

    async def mirror_rx_filter(self, rx: RxFilter) -> None:
        """Let the host link pass what the guest's driver asked for (a trusted guest, libvirt's
        ``trustGuestRxFilters``): its MAC, its multicast groups or all of them, promiscuity.
        A macvtap cannot hold extra unicast MACs: a guest that asks for some (or for all
        unicast) gets promiscuity."""
        if not self.pair_model.filters_by_mac:
            raise UnsupportedError(
                f"{self.type} endpoint {self.virt_name}",
                "trust the guest's receive filter",
                f"model {self.net_pair.model}'s host link does not filter by MAC",
            )
        async with Links.open(self.netns_path) as links:
            info = await links.get(self.tap_name)
            if not ours(info, self.id):
                raise NotOursError("set the receive filter of", self.tap_name)
            if info.mac != rx.main_mac:
                await links.set_mac(self.tap_name, rx.main_mac)
            await links.mirror_rx_filter(
                self.tap_name,
                promisc=rx.promiscuous or rx.unicast == "all" or bool(rx.unicast_table),
                allmulti=rx.multicast == "all",
                multicast=rx.multicast_table if rx.multicast == "normal" else (),
            )

    async def teardown(self, op: Operation) -> None:
        disconnect = self.pair_model.disconnect

        async def remove() -> None:
            await plumbing.unshape(self.shaping)  # first: an htb may be on the sandbox link
            await plumbing.best_effort(
                f"removing the NetPair of {self.name}", lambda: disconnect(self)
            )

        await op.step(Step.REMOVE_LINKS, remove)


@register
@attrs.frozen(kw_only=True)
class VethEndpoint(NetPairEndpoint):
    """A CNI-made veth (type ``virtual``)."""

    type: ClassVar[EndpointType] = EndpointType.VETH


@register
@attrs.frozen(kw_only=True)
class MacvlanEndpoint(NetPairEndpoint):
    """A CNI-made macvlan, joined to the tap like a veth."""

    type: ClassVar[EndpointType] = EndpointType.MACVLAN
    link_kind: ClassVar[str] = "macvlan"


@register
@attrs.frozen(kw_only=True)
class TuntapEndpoint(NetPairEndpoint):
    """A CNI-made tun/tap link in the sandbox, joined to a tap QEMU reads."""

    type: ClassVar[EndpointType] = EndpointType.TUNTAP
    link_kind: ClassVar[str] = "tun"
