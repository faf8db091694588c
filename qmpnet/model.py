"""The closed vocabularies and the data qmpnet passes between layers.

Every value that comes from outside is checked here, once, when the object is built: the
kernel's limits (IFNAMSIZ, the MTU range, tun's queue limit) and the shape of MACs, addresses
and PCI paths. The layers below never see a bad value, and a bad value is reported as an
``InvalidInputError`` naming the field and the value.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self, TypeVar

import attrs

from qmpnet.bandwidth import Bandwidth
from qmpnet.boundary import Boundary
from qmpnet.errors import InvalidInputError, UnknownValueError

#: IFNAMSIZ is 16 including the terminating NUL.
IFNAME_MAX = 15
MTU_MIN = 68
MTU_MAX = 65535
#: A tap's largest MTU: tun's 65535 less the Ethernet header (the kernel's max_mtu of a tap).
TAP_MTU_MAX = MTU_MAX - 14
#: tun's MAX_TAP_QUEUES; QEMU's virtio-net allows more pairs, the tap is the tighter limit.
QUEUES_MAX = 256

_E = TypeVar("_E", bound=enum.StrEnum)


class EndpointType(enum.StrEnum):
    """The closed set of endpoint types (the ``type`` tag in saved state)."""

    PHYSICAL = "physical"
    VETH = "virtual"
    VHOST_USER = "vhost-user"
    MACVLAN = "macvlan"
    MACVTAP = "macvtap"
    TAP = "tap"
    TUNTAP = "tuntap"
    IPVLAN = "ipvlan"

    @classmethod
    def parse(cls, value: object) -> EndpointType:
        return _parse_enum(cls, "endpoint type", value)


class InterworkingModel(enum.StrEnum):
    """How a sandbox veth is joined to the tap QEMU reads.

    - ``default``: the documented default, which is ``tcfilter``.
    - ``tcfilter``: tc ingress + mirred redirect between the veth and a tap, both ways.
    - ``macvtap``: a macvtap on top of the veth; QEMU reads the macvtap's queues.
    - ``bridged``: a bridge enslaving the veth and a tap.
    - ``enlightened``: a name kept for configuration compatibility; it has no plumbing.
    - ``none``: no netns of our own; a tap is made directly in the host namespace.
    """

    DEFAULT = "default"
    BRIDGED = "bridged"
    MACVTAP = "macvtap"
    ENLIGHTENED = "enlightened"
    TCFILTER = "tcfilter"
    NONE = "none"

    @classmethod
    def parse(cls, value: object) -> InterworkingModel:
        return _parse_enum(cls, "interworking model", value)

    @staticmethod
    def is_valid(value: object) -> bool:
        return isinstance(value, str) and value in InterworkingModel._value2member_map_

    def resolved(self) -> InterworkingModel:
        """The model actually used: ``default`` means ``tcfilter``."""
        return InterworkingModel.TCFILTER if self is InterworkingModel.DEFAULT else self


class LinkState(enum.StrEnum):
    """A guest NIC's link as qmpnet sets it (QMP ``set_link``): the guest sees its carrier."""

    UP = "up"
    DOWN = "down"

    @classmethod
    def parse(cls, value: object) -> LinkState:
        return _parse_enum(cls, "link", value)


def _parse_enum(cls: type[_E], field: str, value: object) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and value in cls._value2member_map_:
        return cls(value)
    raise UnknownValueError(field, value, tuple(m.value for m in cls))


# --- field checks: each raises InvalidInputError(field, value, reason) -------------------------


def check_ifname(field: str, value: object) -> str:
    """A Linux interface name, as the kernel's dev_valid_name() accepts it."""
    if not isinstance(value, str):
        raise InvalidInputError(field, value, "must be a string")
    try:
        # a name from a command line that was not UTF-8 arrives with surrogate escapes
        raw = value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidInputError(field, value, "must be UTF-8 text") from err
    if not 1 <= len(raw) <= IFNAME_MAX:
        raise InvalidInputError(field, value, f"must be 1 to {IFNAME_MAX} bytes (IFNAMSIZ)")
    if value in (".", "..") or any(c in value for c in "/:\0") or any(c.isspace() for c in value):
        raise InvalidInputError(
            field, value, "must not be '.' or '..' nor contain '/', ':', NUL or white space"
        )
    return value


_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")


def check_mac(field: str, value: object) -> str:
    """A unicast, non-zero Ethernet address, normalised to lower case."""
    if not isinstance(value, str) or not _MAC_RE.fullmatch(value.lower()):
        raise InvalidInputError(field, value, "must be six hex bytes like 52:54:00:12:34:56")
    mac = value.lower()
    if mac == "00:00:00:00:00:00":
        raise InvalidInputError(field, value, "must not be all zeros")
    if int(mac[:2], 16) & 1:
        raise InvalidInputError(field, value, "must be unicast (the multicast bit is set)")
    return mac


def check_mtu(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not MTU_MIN <= value <= MTU_MAX:
        raise InvalidInputError(field, value, f"must be an integer from {MTU_MIN} to {MTU_MAX}")
    return value


def check_tap_mtu(field: str, value: object) -> int:
    """An MTU a tap takes: a link's range, up to :data:`TAP_MTU_MAX`."""
    mtu = check_mtu(field, value)
    if mtu > TAP_MTU_MAX:
        raise InvalidInputError(
            field,
            value,
            f"a tap's MTU is at most {TAP_MTU_MAX} (65535 less the 14-byte Ethernet header)",
        )
    return mtu


def check_queues(field: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= QUEUES_MAX:
        raise InvalidInputError(field, value, f"must be an integer from 1 to {QUEUES_MAX}")
    return value


_PCI_PATH_RE = re.compile(r"[0-9a-f]{2}(/[0-9a-f]{2}){0,7}")


def check_pci_path(field: str, value: object) -> str:
    """A guest PCI path: slot numbers from the root bus down, like ``02/00`` (may be empty)."""
    if value == "":
        return ""
    if (
        not isinstance(value, str)
        or not _PCI_PATH_RE.fullmatch(value.lower())
        or any(int(s, 16) > 0x1F for s in value.split("/"))
    ):
        raise InvalidInputError(field, value, "must be slots 00..1f joined by '/', like 02/00")
    return value.lower()


def checked_by(check: Callable[[str, object], object]) -> Callable[[Any, Any, Any], None]:
    """An attrs validator running ``check`` on the value, naming the attribute."""

    def validate(_inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        check(attribute.alias or attribute.name, value)

    return validate


def checked_if_set(check: Callable[[str, object], object]) -> Callable[[Any, Any, Any], None]:
    """Like :func:`checked_by`, but an empty value ("not set") passes."""
    inner = checked_by(check)

    def validate(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in (None, ""):
            inner(inst, attribute, value)

    return validate


def lowered(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


# --- data ---------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class IPAddress:
    """One address of an interface as the agent's ``IPAddress``: family 4 or 6, prefix as text."""

    family: int
    address: str
    mask: str

    def __attrs_post_init__(self) -> None:
        if self.family not in (4, 6):
            raise InvalidInputError("family", self.family, "must be 4 or 6")
        if not isinstance(self.address, str):
            # ipaddress would read an integer as an address (5 -> 0.0.0.5)
            raise InvalidInputError("address", self.address, "must be a string")
        try:
            addr = ipaddress.ip_address(self.address)
        except ValueError as err:
            raise InvalidInputError("address", self.address, "not an IP address") from err
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            raise InvalidInputError(
                "address", self.address, "a zone index (%...) cannot be set on an interface"
            )
        if addr.version != self.family:
            raise InvalidInputError("address", self.address, f"is not an IPv{self.family} address")
        limit = 32 if self.family == 4 else 128
        if not (
            isinstance(self.mask, str)
            and self.mask.isascii()
            and self.mask.isdigit()
            and len(self.mask) <= 3
            and 0 <= int(self.mask) <= limit
        ):
            raise InvalidInputError("mask", self.mask, f"must be a prefix length 0..{limit}")

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.mask}"


@attrs.frozen(kw_only=True)
class Route:
    """A route the guest should have; empty strings mean "not set", as in the agent's protocol."""

    dest: str = ""
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0


@attrs.frozen(kw_only=True)
class LinkAttrs:
    """The attributes of a host link that qmpnet reads and sets."""

    name: str = attrs.field(validator=checked_by(check_ifname))
    hardware_addr: str = attrs.field(
        default="", converter=lowered, validator=checked_if_set(check_mac)
    )
    mtu: int = attrs.field(default=1500, validator=checked_by(check_mtu))


@attrs.frozen(kw_only=True)
class NetworkInfo:
    """What is known of the interface to plug: its link, the link type, addresses and routes."""

    iface: LinkAttrs
    link_type: str
    addrs: tuple[IPAddress, ...] = ()
    routes: tuple[Route, ...] = ()


@attrs.frozen(kw_only=True)
class NetworkInterface:
    """A named interface with a MAC and addresses (the guest side, or a host side)."""

    name: str = attrs.field(validator=checked_if_set(check_ifname))
    hard_addr: str = attrs.field(default="", converter=lowered, validator=checked_if_set(check_mac))
    addrs: tuple[IPAddress, ...] = ()


@attrs.frozen(kw_only=True)
class TapInterface:
    """The tap QEMU reads: ``id`` names the netdev/device pair, ``tap_iface`` the host link.

    Open fds are never part of it: a hot-plug holds them in a ``tuntap.QueueFds`` of its own,
    so what is persisted cannot carry a descriptor number.
    """

    id: str
    name: str = attrs.field(validator=checked_if_set(check_ifname))
    tap_iface: NetworkInterface


def _to_model(value: object) -> InterworkingModel:
    return InterworkingModel.parse(value)


@attrs.frozen(kw_only=True)
class NetworkInterfacePair:
    """A NetPair: the tap QEMU reads, joined to the sandbox's virtual interface by ``model``."""

    tap_interface: TapInterface
    virt_iface: NetworkInterface
    model: InterworkingModel = attrs.field(converter=_to_model)


@attrs.frozen(kw_only=True)
class InterfaceDescription:
    """What a caller hands in for a new interface (the agent protocol's ``Interface``).

    Parsed from Kata-style JSON by :meth:`from_json`; ``to_json`` gives the same shape back,
    with the PCI path filled in once the device is plugged.
    """

    device: str = attrs.field(default="", validator=checked_if_set(check_ifname))
    name: str = attrs.field(default="", validator=checked_if_set(check_ifname))
    ip_addresses: tuple[IPAddress, ...] = ()
    mtu: int = attrs.field(default=1500, validator=checked_by(check_mtu))
    hw_addr: str = attrs.field(default="", converter=lowered, validator=checked_if_set(check_mac))
    pci_path: str = attrs.field(default="", converter=lowered, validator=checked_by(check_pci_path))
    link_type: str = ""
    raw_flags: int = 0
    #: libvirt's ``<bandwidth>`` terms (not Kata's: a qmpnet addition, absent when not set)
    bandwidth: Bandwidth | None = None

    #: JSON key -> attribute name, in the agent's spelling.
    JSON_KEYS: ClassVar[Mapping[str, str]] = {
        "device": "device",
        "name": "name",
        "IPAddresses": "ip_addresses",
        "mtu": "mtu",
        "hwAddr": "hw_addr",
        "pciPath": "pci_path",
        "linkType": "link_type",
        "raw_flags": "raw_flags",
        "bandwidth": "bandwidth",
    }

    @classmethod
    def from_json(cls, data: object) -> Self:
        """Parse the agent-style JSON object; unknown keys and wrong types are errors."""
        return KATA.structure(data, cls)

    def to_json(self) -> dict[str, Any]:
        data = KATA.unstructure(self)
        if data.get("bandwidth") is None:
            del data["bandwidth"]
        return data


def with_bandwidth(desc: InterfaceDescription, bandwidth: Bandwidth | None) -> InterfaceDescription:
    """``desc`` shaped as a caller's option says; the JSON and an option both saying it is
    an error (neither is the obvious winner)."""
    if bandwidth is None:
        return desc
    if desc.bandwidth is not None:
        raise InvalidInputError(
            "bandwidth", desc.bandwidth.libvirt(), "given in the interface JSON and as an option"
        )
    return attrs.evolve(desc, bandwidth=bandwidth)


def _agent_address(value: object) -> object:
    """An ``IPAddresses`` entry as the agent's protobuf may also spell it: the family as 0/1
    for v4/v6 (4 when absent), the prefix length as a number."""
    if not isinstance(value, Mapping):
        return value
    entry = {"family": 4, **value}
    if type(entry["family"]) is int:
        entry["family"] = {0: 4, 1: 6}.get(entry["family"], entry["family"])
    if type(entry.get("mask")) is int:
        entry["mask"] = str(entry["mask"])
    return entry


#: Kata's JSON interface description, read and written in the agent's spelling.
KATA = Boundary("interface", mapping="a JSON object", none_is_absent=True)
KATA.register(IPAddress, reshape=_agent_address)
KATA.register_value(Bandwidth, Bandwidth.from_libvirt, Bandwidth.libvirt)
KATA.register(InterfaceDescription, {a: k for k, a in InterfaceDescription.JSON_KEYS.items()})


@attrs.frozen
class VmIdentity:
    """Which QEMU process serves a monitor socket: its pid and its start time.

    A pid alone can be reused; with the start time (clock ticks since boot, field 22 of
    ``/proc/<pid>/stat``) it names one process for the life of the host. A QEMU started
    anew on the same socket path has another identity, so what was saved for the old one
    (its plugged NICs) is known to be gone.
    """

    pid: int
    start_time: int

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"
