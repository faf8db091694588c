"""The public names: each ``__all__`` resolves and is exactly the list below, so adding or
removing a public name is a deliberate change (edit this list with it)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

EXPECTED = {
    "qmpnet": [
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
    ],
    "qmpnet.endpoints": [
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
    ],
    "qmpnet.testing": [
        "GuestBuildError",
        "GuestImage",
        "GuestVM",
        "GuestVMError",
        "build_guest",
        "guest_ip_for_mac",
        "host_ip_for_mac",
        "marker_fields",
    ],
}

#: what other code depends on: (module, name, attributes it must keep)
DEPENDED_ON = [
    (
        "qmpnet",
        "NetworkState",
        ["open", "connect", "close", "add_interface", "remove_interface", "list_interfaces"],
    ),
    ("qmpnet", "InterfaceDescription", ["from_json"]),
    ("qmpnet", "Config", []),
    ("qmpnet.testing", "build_guest", []),
    ("qmpnet.testing", "GuestVM", ["start", "stop", "wait_for", "wait_exit"]),
]

#: the kit's modules that must import without pytest (``fixtures`` is the pytest plugin)
KIT_MODULES = [
    "cli",
    "cni",
    "cri",
    "fakeqemu",
    "gobuild",
    "guest",
    "iperf",
    "output",
    "probe",
    "scene",
    "service",
    "standin",
    "steps",
    "vm",
]


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_the_expected_list_and_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(EXPECTED[module])
    assert len(set(mod.__all__)) == len(mod.__all__), "a name is listed twice"
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"{module}.{name}"


@pytest.mark.parametrize(
    ("module", "name", "attributes"), DEPENDED_ON, ids=[f"{m}.{n}" for m, n, _ in DEPENDED_ON]
)
def test_depended_on_names_stay(module: str, name: str, attributes: list[str]) -> None:
    value = getattr(importlib.import_module(module), name)
    for attribute in attributes:
        assert callable(getattr(value, attribute)), f"{module}.{name}.{attribute}"


def test_guest_vm_has_both_monitor_paths() -> None:
    """A VM manager uses the first monitor, qmpnet the second: both stay public."""
    from qmpnet.testing import GuestVM

    fields = {f.name for f in GuestVM.__attrs_attrs__}  # type: ignore[attr-defined]
    names = fields | set(dir(GuestVM))
    assert {"qmp_path", "mgmt_qmp_path"} <= names


def test_the_kit_imports_without_pytest() -> None:
    """``qmpnet.testing`` ships in the package: only its pytest plugin may need pytest."""
    imports = ", ".join(["qmpnet.testing", *(f"qmpnet.testing.{m}" for m in KIT_MODULES)])
    code = (
        f"import {imports}; import sys; "
        "assert 'pytest' not in sys.modules, 'pytest was imported'; "
        "assert '_pytest' not in sys.modules, '_pytest was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_kit_module_is_checked() -> None:
    """A new module of the kit joins the list above (or is the pytest plugin)."""
    import pkgutil

    import qmpnet.testing

    found = {m.name for m in pkgutil.iter_modules(qmpnet.testing.__path__)}
    assert found == {*KIT_MODULES, "fixtures"}
