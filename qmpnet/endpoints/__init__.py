"""Endpoint types: one module each, all registered in :data:`REGISTRY` on import."""

from qmpnet.endpoints.base import (
    REGISTRY,
    Endpoint,
    EndpointSpec,
    PlugContext,
    create_endpoint,
    net_info_from_interface,
)
from qmpnet.endpoints.netpair import (
    MacvlanEndpoint,
    NetPairEndpoint,
    TuntapEndpoint,
    VethEndpoint,
)
from qmpnet.endpoints.tap import TapEndpoint, create_tap_endpoint
from qmpnet.endpoints.unpluggable import (
    IpvlanEndpoint,
    MacvtapEndpoint,
    PhysicalEndpoint,
    VhostUserEndpoint,
)

__all__ = [
    "REGISTRY",
    "Endpoint",
    "EndpointSpec",
    "IpvlanEndpoint",
    "MacvlanEndpoint",
    "MacvtapEndpoint",
    "NetPairEndpoint",
    "PhysicalEndpoint",
    "PlugContext",
    "TapEndpoint",
    "TuntapEndpoint",
    "VethEndpoint",
    "VhostUserEndpoint",
    "create_endpoint",
    "create_tap_endpoint",
    "net_info_from_interface",
]
