"""Run Debian's CNI plugins exactly as a container runtime does, to make pod-like netns.

A runtime execs a plugin binary with the ``CNI_*`` environment and the network
configuration as JSON on stdin, and reads a result (or an error object) as JSON on stdout;
:func:`invoke` does that and nothing more. :func:`add_pod` / :func:`del_pod` (or the
:func:`pod_network` context manager) build on it what a pod sandbox looks like to qmpnet:
a named netns with one veth made by the ``bridge`` plugin and addressed by ``host-local``.

Traps this module closes for its callers:

- ``"isGateway": true`` (and ``isDefaultGateway``) makes the bridge plugin turn on the host's
  ``net.ipv4.ip_forward``, and ``ipMasq`` adds NAT rules: both are refused here.
- ``host-local`` hands out addresses round-robin and remembers them in its data directory,
  so the address must be read from the result, and each pod gets a private data directory
  that is removed with it.
- The bridge plugin's DEL leaves the bridge in place (other pods may use it): :func:`del_pod`
  removes the pod's own bridge, its netns and its IPAM directory too.

Only link-local subnets (169.254.0.0/16) are accepted, and every name (netns, bridge, CNI
network, container id) starts with the caller's prefix, so a sweep by prefix finds leftovers.
The host end of the veth is named by the plugin (``veth…``); it dies with the pod's veth.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "CNI_BIN",
    "CniError",
    "CniIP",
    "CniInterface",
    "CniResult",
    "Pod",
    "add_pod",
    "bridge_config",
    "del_pod",
    "free_link_local_byte",
    "invoke",
    "ipam_files",
    "ping_until",
    "pod_network",
]

#: Where Debian's ``containernetworking-plugins`` installs the plugin binaries.
CNI_BIN = Path("/usr/lib/cni")
CNI_VERSION = "1.0.0"
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
#: Keys of a bridge config that change the host beyond the pod's own links.
_HOST_CHANGING = ("isGateway", "isDefaultGateway", "ipMasq")
_IFNAMSIZ = 15


class CniError(Exception):
    """A plugin failed, or answered something that is not a CNI result.

    ``code``/``msg``/``details`` are the plugin's CNI error object (``code`` is None when the
    plugin printed no such object; ``msg`` then holds its raw output).
    """

    def __init__(
        self, plugin: str, command: str, code: int | None, msg: str, details: str = ""
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details
        where = f"CNI {plugin} {command}"
        text = f"{where}: error {code}: {msg}" if code is not None else f"{where}: {msg}"
        super().__init__(f"{text} ({details})" if details else text)


@attrs.frozen(kw_only=True)
class CniInterface:
    """One entry of a result's ``interfaces``; ``sandbox`` is set for links in the pod."""

    name: str
    mac: str = ""
    sandbox: str = ""


@attrs.frozen(kw_only=True)
class CniIP:
    """One entry of a result's ``ips``; ``interface`` indexes the result's interfaces."""

    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: str = ""
    interface: int | None = None


@attrs.frozen(kw_only=True)
class CniResult:
    """A parsed CNI 1.0 result (``raw`` keeps the plugin's JSON as it came)."""

    interfaces: tuple[CniInterface, ...]
    ips: tuple[CniIP, ...]
    raw: Mapping[str, Any] = attrs.field(eq=False, repr=False)

    @classmethod
    def parse(cls, data: Any, *, plugin: str = "?", command: str = "ADD") -> CniResult:
        try:
            interfaces = tuple(
                CniInterface(
                    name=str(i["name"]),
                    mac=str(i.get("mac", "")).lower(),
                    sandbox=str(i.get("sandbox", "")),
                )
                for i in data.get("interfaces", [])
            )
            ips = tuple(
                CniIP(
                    address=ipaddress.ip_interface(ip["address"]),
                    gateway=str(ip.get("gateway", "")),
                    interface=ip.get("interface"),
                )
                for ip in data.get("ips", [])
            )
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise CniError(plugin, command, None, f"not a CNI result: {data!r}") from err
        return cls(interfaces=interfaces, ips=ips, raw=data)


def _env(
    command: str,
    *,
    container_id: str,
    netns: str,
    ifname: str,
    args: Mapping[str, str],
    cni_path: Path,
) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": ifname,
        "CNI_PATH": str(cni_path),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    if args:
        env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in args.items())
    return env


async def invoke(
    plugin: str,
    command: str,
    config: Mapping[str, Any],
    *,
    container_id: str,
    netns: str,
    ifname: str,
    args: Mapping[str, str] | None = None,
    cni_path: Path = CNI_BIN,
    timeout: float = 30.0,
) -> CniResult | None:
    """Exec ``plugin`` for ``command`` (ADD, DEL, CHECK) as a runtime does.

    Returns the parsed result of an ADD (None for the other commands). Raises
    :class:`CniError` with the plugin's error object when it fails, and ValueError for a
    configuration that would change the host (see the module docstring).
    """
    changing = [k for k in _HOST_CHANGING if config.get(k)]
    if changing:
        raise ValueError(
            f"refusing CNI config with {changing}: it changes the host "
            "(ip_forward / NAT) beyond the pod's links"
        )
    binary = cni_path / plugin
    if not os.access(binary, os.X_OK):
        raise CniError(
            plugin,
            command,
            None,
            f"{binary} is missing: apt-get install containernetworking-plugins",
        )
    proc = await asyncio.create_subprocess_exec(
        str(binary),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(
            command,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            args=args or {},
            cni_path=cni_path,
        ),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(config).encode()), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise _error(plugin, command, text, err.decode(errors="replace").strip(), proc.returncode)
    if command != "ADD":
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CniError(plugin, command, None, f"output is not JSON: {text!r}") from exc
    return CniResult.parse(data, plugin=plugin, command=command)


def _error(plugin: str, command: str, out: str, err: str, status: int | None) -> CniError:
    try:
        data = json.loads(out)
        return CniError(
            plugin,
            command,
            int(data["code"]),
            str(data.get("msg", "")),
            str(data.get("details", "")),
        )
    except (ValueError, KeyError, TypeError):
        return CniError(plugin, command, None, f"exit status {status}: {out or err or 'no output'}")


def bridge_config(
    name: str,
    bridge: str,
    subnet: str,
    data_dir: Path,
    *,
    range_start: str = "",
    range_end: str = "",
    mac: str = "",
    mtu: int = 0,
) -> dict[str, Any]:
    """A ``bridge`` + ``host-local`` network config that touches only its own links.

    ``mac`` asks the bridge plugin for the pod veth's MAC (its ``runtimeConfig.mac``).
    """
    net = ipaddress.ip_network(subnet)
    if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(LINK_LOCAL):
        raise ValueError(
            f"subnet {subnet} is not inside {LINK_LOCAL}: tests keep to link-local addresses"
        )
    rng: dict[str, str] = {"subnet": str(net)}
    if range_start:
        rng["rangeStart"] = range_start
    if range_end:
        rng["rangeEnd"] = range_end
    config: dict[str, Any] = {
        "cniVersion": CNI_VERSION,
        "name": name,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": False,
        "ipMasq": False,
        "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[rng]]},
    }
    if mac:
        config["runtimeConfig"] = {"mac": mac}
    if mtu:
        config["mtu"] = mtu
    return config


@attrs.frozen(kw_only=True)
class Pod:
    """A pod-like netns with one CNI-made veth; ``result`` is what the plugin answered."""

    #: CNI container id; also the prefix of every name below.
    container_id: str
    netns: str
    ifname: str
    bridge: str
    config: Mapping[str, Any] = attrs.field(repr=False)
    data_dir: Path
    result: CniResult

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def interface(self) -> CniInterface:
        """The pod's own veth end, as the result names it."""
        for iface in self.result.interfaces:
            if iface.sandbox and iface.name == self.ifname:
                return iface
        raise CniError("bridge", "ADD", None, f"result names no {self.ifname} in the sandbox")

    @property
    def mac(self) -> str:
        return self.interface.mac

    @property
    def ips(self) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
        index = self.result.interfaces.index(self.interface)
        return tuple(ip.address for ip in self.result.ips if ip.interface in (None, index))

    @property
    def host_veth(self) -> str:
        """The host end of the veth (named by the plugin, not by us)."""
        for iface in self.result.interfaces:
            if not iface.sandbox and iface.name != self.bridge:
                return iface.name
        return ""


def free_link_local_byte(taken: Collection[int] = ()) -> int:
    """A B for 169.254.B.0/24 that no address or route on the host uses now (nor ``taken``)."""
    from qmpnet.testing.probe import ip_json

    used = set(taken) | {
        int(a["local"].split(".")[2])
        for link in ip_json("-4", "addr", "show")
        for a in link.get("addr_info", [])
        if a.get("local", "").startswith("169.254.")
    }
    for route in ip_json("-4", "route", "show"):
        match = re.match(r"169\.254\.(\d+)\.", route.get("dst", ""))
        if match:
            used.add(int(match.group(1)))
    return random.choice([b for b in range(16, 250) if b not in used])


def ipam_files(data_dir: Path, network: str) -> set[str]:
    """The addresses host-local has reserved for ``network`` (one file per address)."""
    where = data_dir / network
    return {p.name for p in where.iterdir() if p.name[0].isdigit()} if where.exists() else set()


async def ping_until(cmd: Sequence[str], timeout: float) -> None:
    """Run ``cmd`` (a ``ping -c 1``) until it succeeds, within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            if await proc.wait() == 0:
                return
            await asyncio.sleep(0.5)


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def _ip_ok(*args: str) -> None:
    status, out = await _ip(*args)
    if status != 0:
        raise CniError("ip", " ".join(args), None, out or f"exit status {status}")


async def add_pod(
    prefix: str,
    subnet: str,
    *,
    mac: str = "",
    ifname: str = "eth0",
    range_start: str = "",
    range_end: str = "",
    bridge_address: str = "",
    mtu: int = 0,
) -> Pod:
    """Make netns ``{prefix}n`` and run ``bridge`` ADD into it (bridge ``{prefix}b``).

    ``bridge_address`` (CIDR) is then put on the bridge: the far side of the pod's veth
    gets an address without ``isGateway``. On any failure everything made is removed.
    """
    netns, bridge = f"{prefix}n", f"{prefix}b"
    if len(bridge) > _IFNAMSIZ or len(netns) > _IFNAMSIZ:
        raise ValueError(f"prefix {prefix!r} too long: names must fit in {_IFNAMSIZ} bytes")
    data_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-cni-"))
    config = bridge_config(
        f"{prefix}net",
        bridge,
        subnet,
        data_dir,
        range_start=range_start,
        range_end=range_end,
        mac=mac,
        mtu=mtu,
    )
    made = False
    try:
        await _ip_ok("netns", "add", netns)
        made = True
        await _ip_ok("-n", netns, "link", "set", "lo", "up")
        result = await invoke(
            "bridge", "ADD", config, container_id=prefix, netns=f"/run/netns/{netns}", ifname=ifname
        )
        assert result is not None
        pod = Pod(
            container_id=prefix,
            netns=netns,
            ifname=ifname,
            bridge=bridge,
            config=config,
            data_dir=data_dir,
            result=result,
        )
        if bridge_address:
            await _ip_ok("addr", "add", bridge_address, "dev", bridge)
    except BaseException:
        await _teardown(
            prefix,
            netns=netns if made else "",
            bridge=bridge,
            ifname=ifname,
            config=config,
            data_dir=data_dir,
        )
        raise
    return pod


async def del_pod(pod: Pod) -> None:
    """CNI DEL, then remove the pod's bridge, netns and IPAM directory. Raises the first
    failure only after every cleanup step has run."""
    await _teardown(
        pod.container_id,
        netns=pod.netns,
        bridge=pod.bridge,
        ifname=pod.ifname,
        config=pod.config,
        data_dir=pod.data_dir,
        strict=True,
    )


async def _teardown(
    container_id: str,
    *,
    netns: str,
    bridge: str,
    ifname: str,
    config: Mapping[str, Any],
    data_dir: Path,
    strict: bool = False,
) -> None:
    errors: list[Exception] = []
    # a pod whose netns went first (a test of the wrong teardown order) gets the DEL a
    # runtime sends then: with no CNI_NETNS, as the spec allows
    gone = bool(netns) and not await asyncio.to_thread(os.path.exists, f"/run/netns/{netns}")
    if netns:
        try:
            await invoke(
                "bridge",
                "DEL",
                config,
                container_id=container_id,
                netns="" if gone else f"/run/netns/{netns}",
                ifname=ifname,
            )
        except (CniError, OSError) as err:
            errors.append(err)
    status, out = await _ip("link", "del", bridge)
    if status != 0 and "Cannot find device" not in out:
        errors.append(CniError("ip", "link del", None, out))
    if netns and not gone:
        status, out = await _ip("netns", "del", netns)
        if status != 0:
            errors.append(CniError("ip", "netns del", None, out))
    shutil.rmtree(data_dir, ignore_errors=True)
    if strict and errors:
        raise errors[0]


@contextlib.asynccontextmanager
async def pod_network(prefix: str, subnet: str, **kwargs: Any) -> AsyncIterator[Pod]:
    """``add_pod`` on entry and ``del_pod`` on exit (also on failure and cancellation)."""
    pod = await add_pod(prefix, subnet, **kwargs)
    try:
        yield pod
    finally:
        await del_pod(pod)
