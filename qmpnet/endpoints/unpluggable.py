"""Endpoint types that exist in the vocabulary but cannot be hot-plugged.

They parse, persist and list like every other type (so state written by another runtime is
kept), and refuse ``hot_attach``/``attach`` with the reason:

- ``physical``: a host NIC handed to the VM by VFIO passthrough, not through a tap.
- ``vhost-user``: the NIC's backend is a vhost-user socket of a userspace switch.
- ``macvtap``: a CNI-made macvtap is a cold-plug device whose queues belong to the runtime.
- ``ipvlan``: shares its parent's MAC at layer 3; no tap can carry its frames faithfully.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

import attrs

from qmpnet.endpoints.base import (
    EndpointSpec,
    PlugContext,
    described_mtu,
    new_id,
    register,
    unsupported,
)
from qmpnet.lifecycle import Operation

if TYPE_CHECKING:
    from qmpnet.hypervisor import RxFilter
from qmpnet.model import (
    EndpointType,
    NetworkInfo,
    NetworkInterface,
    NetworkInterfacePair,
)


@attrs.frozen(kw_only=True)
class UnpluggableEndpoint:
    type: ClassVar[EndpointType]
    reason: ClassVar[str]

    iface: NetworkInterface
    endpoint_id: str = attrs.field(factory=new_id)
    properties: NetworkInfo | None = None
    pci_path: str = ""
    netns_path: str = ""

    @property
    def name(self) -> str:
        return self.iface.name

    @property
    def hardware_addr(self) -> str:
        return self.iface.hard_addr

    @property
    def network_pair(self) -> NetworkInterfacePair | None:
        return None

    @property
    def id(self) -> str:
        return self.endpoint_id

    @property
    def tap(self) -> None:
        return None  # nothing of it ever lives in QEMU

    @property
    def reads_tun(self) -> bool:
        return False

    @property
    def mtu(self) -> int:
        return described_mtu(self.properties)

    @property
    def host_link(self) -> str:
        return ""

    @property
    def queues(self) -> int:
        return 0

    @property
    def shaping(self) -> None:
        return None

    @classmethod
    def create(cls, spec: EndpointSpec) -> Self:
        info = spec.net_info
        iface = NetworkInterface(
            name=info.iface.name or f"eth{spec.idx}",
            hard_addr=info.iface.hardware_addr,
            addrs=info.addrs,
        )
        return cls(iface=iface, properties=info, netns_path=spec.netns_path)

    async def attach(self, ctx: PlugContext) -> Self:
        raise unsupported(self, "cold plug", self.reason)

    async def hot_attach(self, ctx: PlugContext) -> Self:
        raise unsupported(self, "hot-plug", self.reason)

    async def hot_detach(self, ctx: PlugContext) -> None:
        raise unsupported(self, "hot-unplug", self.reason)

    async def teardown(self, op: Operation) -> None:
        return None  # qmpnet made nothing on the host for it

    async def set_mtu(self, mtu: int) -> Self:
        raise unsupported(self, "set mtu", self.reason)

    async def mirror_rx_filter(self, rx: RxFilter) -> None:
        raise unsupported(self, "trust the guest's receive filter", self.reason)


@register
@attrs.frozen(kw_only=True)
class PhysicalEndpoint(UnpluggableEndpoint):
    type: ClassVar[EndpointType] = EndpointType.PHYSICAL
    reason: ClassVar[str] = "a physical NIC is passed through with VFIO, not hot-plugged as a tap"


@register
@attrs.frozen(kw_only=True)
class VhostUserEndpoint(UnpluggableEndpoint):
    type: ClassVar[EndpointType] = EndpointType.VHOST_USER
    reason: ClassVar[str] = "a vhost-user NIC is backed by a userspace switch socket, not a tap"


@register
@attrs.frozen(kw_only=True)
class MacvtapEndpoint(UnpluggableEndpoint):
    type: ClassVar[EndpointType] = EndpointType.MACVTAP
    reason: ClassVar[str] = (
        "a CNI-made macvtap endpoint can only be cold-plugged; use a veth "
        "with interworking model macvtap to hot-plug"
    )


@register
@attrs.frozen(kw_only=True)
class IpvlanEndpoint(UnpluggableEndpoint):
    type: ClassVar[EndpointType] = EndpointType.IPVLAN
    reason: ClassVar[str] = (
        "an ipvlan shares its parent's MAC at layer 3 and cannot be "
        "joined to a tap; use a veth or macvlan"
    )
