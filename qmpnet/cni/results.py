"""The results ADD prints, and what CHECK reads back from prevResult."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping
from typing import Any

from qmpnet.cni.request import Env, NetConf
from qmpnet.cni.spec import CniError, Code, version_key
from qmpnet.endpoints import Endpoint
from qmpnet.endpoints.netpair import pair_model, parked_mac
from qmpnet.errors import shown
from qmpnet.model import (
    IPAddress,
)


def ips_of(result: Mapping[str, Any], interface: int | None) -> tuple[IPAddress, ...]:
    """The result's addresses (of interface index ``interface``; None: all) as IPAddress."""
    out = []
    ips = result.get("ips") or []
    if not isinstance(ips, list):
        raise CniError(Code.DECODE, "result ips must be a list")
    for ip in ips:
        if not isinstance(ip, dict):
            raise CniError(Code.DECODE, f"result ips entry {shown(ip)} is not an object")
        if interface is not None and ip.get("interface") != interface:
            continue
        try:
            iface = ipaddress.ip_interface(str(ip.get("address")))
        except ValueError as err:
            raise CniError(
                Code.DECODE,
                f"result address {shown(ip.get('address'))} is not an address with a prefix",
            ) from err
        out.append(
            IPAddress(
                family=iface.version, address=str(iface.ip), mask=str(iface.network.prefixlen)
            )
        )
    return tuple(out)


def interface_entry(version: str, name: str, mac: str, sandbox: str, mtu: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "mac": mac, "sandbox": sandbox}
    if version_key(version) >= (1, 1, 0):
        entry["mtu"] = mtu  # a 1.1 field
    return entry


def sandbox_mac(endpoint: Endpoint) -> str:
    """The MAC ``CNI_IFNAME`` wears while plugged: macvtap and bridged park the pod's link on
    another one (the VM's NIC has the pod's), tcfilter leaves it as it was."""
    pair = endpoint.network_pair
    if pair is not None and pair_model(pair.model).parks_mac:
        return parked_mac(endpoint.id)
    return endpoint.hardware_addr


def chained_result(conf: NetConf, env: Env, mac: str, mtu: int) -> dict[str, Any]:
    """prevResult passed on, in the configuration's version, with our interface as it now is
    (``mac``: what the link in the netns wears, so a later plugin's CHECK agrees)."""
    result = copy.deepcopy(dict(conf.prev_result or {}))
    result["cniVersion"] = conf.cni_version
    interfaces = result.setdefault("interfaces", [])
    if not isinstance(interfaces, list):
        raise CniError(Code.DECODE, "prevResult interfaces must be a list")
    ours = [
        i
        for i in interfaces
        if isinstance(i, dict) and i.get("name") == env.ifname and i.get("sandbox") == env.netns
    ]
    for entry in ours:
        entry["mac"] = mac
    if not ours:
        interfaces.append(interface_entry(conf.cni_version, env.ifname, mac, env.netns, mtu))
    return result


def prev_interface(conf: NetConf, env: Env) -> tuple[int | None, Mapping[str, Any] | None]:
    """Index and entry of CNI_IFNAME in prevResult's interfaces, if listed."""
    interfaces = (conf.prev_result or {}).get("interfaces") or []
    if not isinstance(interfaces, list):
        raise CniError(Code.DECODE, "prevResult interfaces must be a list")
    for index, iface in enumerate(interfaces):
        if (
            isinstance(iface, dict)
            and iface.get("name") == env.ifname
            and iface.get("sandbox", env.netns) == env.netns
        ):
            return index, iface
    return None, None


def main_result(
    conf: NetConf,
    env: Env,
    mac: str,
    ipam_result: Mapping[str, Any] | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "cniVersion": conf.cni_version,
        "interfaces": [interface_entry(conf.cni_version, env.ifname, mac, env.netns, conf.mtu)],
    }
    got = ipam_result or {}
    ips = [{**ip, "interface": 0} for ip in got.get("ips") or [] if isinstance(ip, dict)]
    if version_key(conf.cni_version) < (1, 0, 0):
        # before 1.0 each address says its family; the IPAM plugin may have answered in 1.0
        for ip in ips:
            ip.setdefault("version", str(ipaddress.ip_interface(str(ip.get("address"))).version))
    else:
        for ip in ips:
            ip.pop("version", None)
    if ips:
        result["ips"] = ips
    if got.get("routes"):
        result["routes"] = got["routes"]
    dns = got.get("dns") or conf.dns
    if dns:
        result["dns"] = dns
    return result
