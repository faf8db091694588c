"""The endpoint protocol, the type registry, and building an endpoint for an interface.

Every endpoint type is a frozen attrs class registered under its :class:`EndpointType`; the
registry drives creation, JSON (un)structuring and reporting, so no code switches on type
strings and no type can be forgotten. The protocol says everything callers need: ``tap`` (what
QEMU reads, or ``None`` for a type that is never hot-plugged), ``host_link``, ``create``,
``hot_attach``/``hot_detach`` (QEMU and host) and ``teardown`` (the host side alone, for a VM
that is gone). ``hot_attach`` returns the plugged endpoint (with its PCI path and the MACs it
settled on) instead of mutating it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, TypeVar, runtime_checkable

import attrs

from qmpnet.errors import InvalidInputError, UnsupportedError
from qmpnet.model import (
    EndpointType,
    InterfaceDescription,
    InterworkingModel,
    LinkAttrs,
    NetworkInfo,
    NetworkInterfacePair,
    TapInterface,
)

if TYPE_CHECKING:
    from qmpnet.bandwidth import Bandwidth
    from qmpnet.config import Config
    from qmpnet.endpoints.shaping import Sites
    from qmpnet.hypervisor import QemuHypervisor, RxFilter
    from qmpnet.lifecycle import Operation


@attrs.frozen(kw_only=True)
class EndpointSpec:
    """What a new endpoint is built from: one value, so every type's ``create`` takes the same."""

    net_info: NetworkInfo
    #: the interface's index in the VM, for default names (``eth{idx}``, ``tap{idx}_kata``)
    idx: int
    model: InterworkingModel
    netns_path: str = ""
    tap_name: str | None = None
    #: queue pairs; 0 means "as configured / one per vCPU"
    queues: int = 0
    #: the NIC's id, chosen by a caller that answered before the plug ("": a new one)
    endpoint_id: str = ""


@attrs.define(eq=False)
class PlugContext:
    """What an endpoint needs to plug or unplug itself: the VM, settings, the operation."""

    hypervisor: QemuHypervisor
    config: Config
    op: Operation
    wait_guest: bool = False
    #: the NIC's link as the guest first sees it
    link_up: bool = True
    #: a NetPair may join a link of the host's namespace or a bridge's port (default: refused)
    allow_foreign_link: bool = False
    #: the NIC's traffic shaped from the start (None: not shaped)
    bandwidth: Bandwidth | None = None

    async def queues(self, requested: int) -> int:
        return await queue_pairs(requested, self.config.queues, self.hypervisor.vcpus)


async def queue_pairs(requested: int, configured: int, vcpus: Callable[[], Awaitable[int]]) -> int:
    """Queue pairs: as requested, else as configured, else one per guest vCPU (asked last)."""
    if requested:
        return requested
    if configured:
        return configured
    return await vcpus()


@runtime_checkable
class Endpoint(Protocol):
    """What every endpoint type provides."""

    type: ClassVar[EndpointType]

    @property
    def properties(self) -> NetworkInfo | None: ...

    @property
    def pci_path(self) -> str: ...

    @property
    def netns_path(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def hardware_addr(self) -> str: ...

    @property
    def network_pair(self) -> NetworkInterfacePair | None: ...

    @property
    def id(self) -> str: ...

    @property
    def tap(self) -> TapInterface | None:
        """The tap QEMU reads (its ids name the NIC's fds, netdev and device); ``None`` for a
        type that is never hot-plugged, so nothing of it lives in QEMU."""
        ...

    @property
    def mtu(self) -> int:
        """The MTU of the host link QEMU reads (1500 when nothing was described)."""
        ...

    @property
    def reads_tun(self) -> bool:
        """QEMU reads a tun tap's queues (not a macvtap's): a tap deleted behind its back
        shows in QEMU's fds (see :class:`~qmpnet.errors.TapGoneError`)."""
        ...

    @property
    def host_link(self) -> str:
        """The host link QEMU reads (a tap or macvtap), ``""`` if there is none."""
        ...

    @property
    def queues(self) -> int:
        """Queue pairs: 0 until plugged means "as configured / one per vCPU"."""
        ...

    @property
    def shaping(self) -> Sites | None:
        """Where the NIC's bandwidth is shaped on the host; None for a type never plugged."""
        ...

    @classmethod
    def create(cls, spec: EndpointSpec) -> Self: ...

    async def attach(self, ctx: PlugContext) -> Self:
        """Cold plug; qmpnet plugs into running VMs, so every type refuses with its reason."""
        ...

    async def hot_attach(self, ctx: PlugContext) -> Self: ...

    async def hot_detach(self, ctx: PlugContext) -> None: ...

    async def teardown(self, op: Operation) -> None:
        """Remove the host side alone (links, qdiscs, a parked MAC given back), touching no
        QEMU: for a VM that is gone or a device already removed. Safe to repeat."""
        ...

    async def mirror_rx_filter(self, rx: RxFilter) -> None:
        """Let the host link pass what the guest's driver asked for (a trusted guest); a type
        whose host link does not filter refuses (:class:`UnsupportedError`)."""
        ...

    async def set_mtu(self, mtu: int) -> Self:
        """Give the host links of a plugged NIC that are qmpnet's this MTU, live; the
        endpoint as it is then. The guest's side is the guest's to follow."""
        ...


E = TypeVar("E", bound=type[Any])

#: EndpointType -> the class that implements it. Filled by :func:`register`.
REGISTRY: dict[EndpointType, type[Endpoint]] = {}


def register(cls: E) -> E:
    REGISTRY[cls.type] = cls
    return cls


def described_mtu(info: NetworkInfo | None) -> int:
    """The MTU ``info`` gives the host link (Ethernet's when nothing was described)."""
    return info.iface.mtu if info is not None else 1500


def with_mtu(info: NetworkInfo | None, mtu: int) -> NetworkInfo | None:
    """``info`` with the link's MTU set (None stays None: nothing was described)."""
    if info is None:
        return None
    return attrs.evolve(info, iface=attrs.evolve(info.iface, mtu=mtu))


def no_rx_filter(endpoint: Endpoint) -> UnsupportedError:
    """The refusal of a type whose host link passes every frame (nothing to mirror)."""
    return unsupported(
        endpoint, "trust the guest's receive filter", "its host link does not filter by MAC"
    )


def new_id() -> str:
    """A QEMU-id-safe, unique id for one NIC; also the owner mark of its host links."""
    return "qn" + secrets.token_hex(5)


_ENDPOINT_ID = re.compile(r"qn[0-9a-f]{10}")


def check_endpoint_id(field: str, value: object) -> str:
    """An id as :func:`new_id` makes them: QEMU's ids and the owner marks rest on the form."""
    if not isinstance(value, str) or not _ENDPOINT_ID.fullmatch(value):
        raise InvalidInputError(field, value, "must be 'qn' and 10 lowercase hex digits")
    return value


def random_mac() -> str:
    """A MAC in QEMU's 52:54:00 range for a guest NIC that was given none."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def net_info_from_interface(desc: InterfaceDescription, model: InterworkingModel) -> NetworkInfo:
    """NetworkInfo for a described interface: link type ``tap`` for model none, else veth.

    An explicit ``linkType`` in the description wins, so a CNI-made macvlan is not mistaken
    for a veth.
    """
    if not desc.name:
        raise InvalidInputError("name", desc.name, "an interface needs a name")
    default = "tap" if model.resolved() is InterworkingModel.NONE else "veth"
    link_type = desc.link_type or default
    return NetworkInfo(
        iface=LinkAttrs(name=desc.name, hardware_addr=desc.hw_addr, mtu=desc.mtu),
        link_type=link_type,
        addrs=desc.ip_addresses,
    )


#: netlink link kind -> endpoint type, for interfaces found in a netns or described by type.
LINK_TYPES: dict[str, EndpointType] = {
    "tap": EndpointType.TAP,
    "veth": EndpointType.VETH,
    "virtual": EndpointType.VETH,
    "macvlan": EndpointType.MACVLAN,
    "macvtap": EndpointType.MACVTAP,
    "ipvlan": EndpointType.IPVLAN,
    "tuntap": EndpointType.TUNTAP,
    "tun": EndpointType.TUNTAP,
    "physical": EndpointType.PHYSICAL,
    "device": EndpointType.PHYSICAL,
    "vhost-user": EndpointType.VHOST_USER,
}


def endpoint_type_for(link_type: str) -> EndpointType:
    try:
        return LINK_TYPES[link_type]
    except KeyError:
        raise InvalidInputError(
            "linkType", link_type, "unsupported link type; known: " + ", ".join(sorted(LINK_TYPES))
        ) from None


def create_endpoint(
    net_info: NetworkInfo,
    idx: int,
    model: InterworkingModel,
    *,
    netns_path: str = "",
    tap_name: str | None = None,
    queues: int = 0,
    endpoint_id: str = "",
) -> Endpoint:
    """An endpoint for ``net_info``, its type picked from the interface's link type."""
    if idx < 0:
        raise InvalidInputError("index", idx, "must be >= 0")
    if endpoint_id:
        check_endpoint_id("endpoint id", endpoint_id)
    kind = endpoint_type_for(net_info.link_type)
    spec = EndpointSpec(
        net_info=net_info,
        idx=idx,
        model=model,
        netns_path=netns_path,
        tap_name=tap_name,
        queues=queues,
        endpoint_id=endpoint_id,
    )
    return REGISTRY[kind].create(spec)


def unsupported(endpoint: Endpoint, operation: str, reason: str) -> UnsupportedError:
    return UnsupportedError(f"{endpoint.type} endpoint {endpoint.name}", operation, reason)
