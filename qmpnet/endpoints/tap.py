"""The ``tap`` endpoint (interworking model ``none``): a tap made directly in a namespace.

No NetPair and no netns of ours: the tap is created in the host namespace (or the given one)
by opening its queues, configured, and its fds handed to QEMU. The tap is not persistent, so
it lives exactly as long as QEMU holds a queue: a crash before the hand-over leaves nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

import attrs

from qmpnet import tuntap
from qmpnet.endpoints import plumbing, shaping
from qmpnet.endpoints.base import (
    EndpointSpec,
    PlugContext,
    described_mtu,
    new_id,
    no_rx_filter,
    random_mac,
    register,
    unsupported,
    with_mtu,
)
from qmpnet.errors import InvalidInputError
from qmpnet.lifecycle import Operation, Step
from qmpnet.links import Links

if TYPE_CHECKING:
    from qmpnet.hypervisor import RxFilter
from qmpnet.model import (
    EndpointType,
    LinkAttrs,
    NetworkInfo,
    NetworkInterface,
    NetworkInterfacePair,
    TapInterface,
    check_ifname,
    check_tap_mtu,
)


@register
@attrs.frozen(kw_only=True)
class TapEndpoint:
    """A tap QEMU reads directly; ``tap_interface.name`` is the guest-side name."""

    type: ClassVar[EndpointType] = EndpointType.TAP

    tap_interface: TapInterface
    properties: NetworkInfo | None = None
    pci_path: str = ""
    netns_path: str = ""
    #: queue pairs; 0 until plugged means "as configured / one per vCPU".
    queues: int = 0

    @property
    def name(self) -> str:
        return self.tap_interface.name

    @property
    def hardware_addr(self) -> str:
        return self.tap_interface.tap_iface.hard_addr

    @property
    def network_pair(self) -> NetworkInterfacePair | None:
        return None

    @property
    def id(self) -> str:
        return self.tap_interface.id

    @property
    def tap(self) -> TapInterface:
        return self.tap_interface

    @property
    def reads_tun(self) -> bool:
        return True

    @property
    def mtu(self) -> int:
        return described_mtu(self.properties)

    @property
    def host_link(self) -> str:
        return self.tap_interface.tap_iface.name

    @property
    def shaping(self) -> shaping.Sites:
        # what the guest sends goes into the host's stack: no egress to shape but an ifb's
        return shaping.Sites(
            netns=self.netns_path,
            owner=self.id,
            inbound=shaping.Site(self.host_link),
            outbound=shaping.Site(self.host_link, ifb=True),
        )

    @classmethod
    def create(cls, spec: EndpointSpec) -> Self:
        # a tap endpoint has no interworking: that is model none
        iface = spec.net_info.iface
        check_tap_mtu("mtu", iface.mtu)  # the kernel's limit, before anything is made
        endpoint = create_tap_endpoint(
            spec.idx,
            iface.name,
            tap_name=spec.tap_name,
            mac=iface.hardware_addr,
            endpoint_id=spec.endpoint_id,
        )
        return cls(
            tap_interface=endpoint.tap_interface,
            properties=spec.net_info,
            netns_path=spec.netns_path,
            queues=spec.queues,
        )

    async def attach(self, ctx: PlugContext) -> Self:
        raise unsupported(self, "cold plug", "a tap endpoint can only be hot-plugged")

    async def hot_attach(self, ctx: PlugContext) -> Self:
        async def open_host(queues: int, fds: tuntap.QueueFds) -> None:
            await plumbing.open_tap(ctx.op, self.netns_path, self.host_link, queues, fds)
            await plumbing.configure_tap(ctx.op, self.netns_path, self.host_link, self.id, self.mtu)

        pci_path, queues = await plumbing.plug_queues(
            ctx, self.tap, self.hardware_addr, self.queues, open_host, self.mtu, self.shaping
        )
        return attrs.evolve(self, pci_path=pci_path, queues=queues)

    async def hot_detach(self, ctx: PlugContext) -> None:
        await ctx.hypervisor.unplug_tap(self.tap, ctx.op, tun=self.reads_tun)
        await self.teardown(ctx.op)

    async def mirror_rx_filter(self, rx: RxFilter) -> None:
        raise no_rx_filter(self)  # a tap passes every frame to QEMU

    async def set_mtu(self, mtu: int) -> Self:
        check_tap_mtu("mtu", mtu)
        await plumbing.set_links_mtu(self.netns_path, [self.host_link], self.id, mtu)
        return attrs.evolve(self, properties=with_mtu(self.properties, mtu))

    async def teardown(self, op: Operation) -> None:
        async def remove() -> None:
            async with Links.open(self.netns_path) as links:
                await links.delete(self.host_link, owner=self.id)

        async def remove_all() -> None:
            await plumbing.unshape(self.shaping)
            await plumbing.best_effort(f"removing tap {self.host_link}", remove)

        await op.step(Step.REMOVE_LINKS, remove_all)


def create_tap_endpoint(
    idx: int,
    if_name: str = "",
    *,
    tap_name: str | None = None,
    mac: str = "",
    endpoint_id: str = "",
) -> TapEndpoint:
    """A tap endpoint ``tap{idx}_kata`` for guest interface ``if_name`` (``eth{idx}``)."""
    if not isinstance(idx, int) or idx < 0:
        raise InvalidInputError("index", idx, "must be an integer >= 0")
    guest_name = check_ifname("name", if_name or f"eth{idx}")
    host_name = check_ifname("tap name", tap_name or f"tap{idx}_kata")
    tap = TapInterface(
        id=endpoint_id or new_id(),
        name=guest_name,
        tap_iface=NetworkInterface(name=host_name, hard_addr=mac or random_mac()),
    )
    return TapEndpoint(
        tap_interface=tap,
        properties=NetworkInfo(
            iface=LinkAttrs(name=guest_name, hardware_addr=tap.tap_iface.hard_addr), link_type="tap"
        ),
    )
