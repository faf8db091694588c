"""qmpnet: hot-plug network interfaces into running QEMU VMs over QMP.

The public names below are loaded on first use, so ``import qmpnet`` (and the CLI's start-up)
does not pay for QMP, netlink and JSON machinery it may not need.
"""

from __future__ import annotations

from qmpnet.lazy import exports

#: public name -> the module that defines it
_EXPORTS = {
    "NetworkState": "qmpnet.network",
    "interface_of": "qmpnet.network",
    "Config": "qmpnet.config",
    "Timeouts": "qmpnet.config",
    "InterfaceDescription": "qmpnet.model",
    "InterworkingModel": "qmpnet.model",
    "EndpointType": "qmpnet.model",
    "IPAddress": "qmpnet.model",
    "QemuHypervisor": "qmpnet.hypervisor",
    "QmpSession": "qmpnet.qmp",
    "QmpnetError": "qmpnet.errors",
    "InvalidInputError": "qmpnet.errors",
    "UnsupportedError": "qmpnet.errors",
    "HostError": "qmpnet.errors",
    "QmpError": "qmpnet.errors",
    "PlugError": "qmpnet.errors",
    "StateError": "qmpnet.errors",
    "UnplugRefusedError": "qmpnet.errors",
    "UnplugTimeoutError": "qmpnet.errors",
    "create_endpoint": "qmpnet.endpoints",
    "create_tap_endpoint": "qmpnet.endpoints",
}

__all__ = [
    "Config",
    "EndpointType",
    "HostError",
    "IPAddress",
    "InterfaceDescription",
    "InterworkingModel",
    "InvalidInputError",
    "NetworkState",
    "PlugError",
    "QemuHypervisor",
    "QmpError",
    "QmpSession",
    "QmpnetError",
    "StateError",
    "Timeouts",
    "UnplugRefusedError",
    "UnplugTimeoutError",
    "UnsupportedError",
    "create_endpoint",
    "create_tap_endpoint",
    "interface_of",
]


__getattr__, __dir__ = exports(__name__, _EXPORTS, __all__)
