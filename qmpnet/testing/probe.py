"""The independent views the tests, the demo and the benches compare against.

None of these goes through qmpnet's own bookkeeping: the host is read with ``ip -j`` and
``tc -j``, processes through ``/proc/<pid>/fd``, QEMU through a QMP monitor qmpnet does not
use (the VM manager's, QEMU's first) with qemu.qmp's own client, and the state directory
from its files. A view that cannot be taken raises :class:`ProbeError`: a tool that fails
must never read as "nothing there". Where something is expected to be gone (a netns, a
device), that is checked explicitly, with a view that itself raises when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
from qemu.qmp import ExecuteError, QMPClient

from qmpnet.marks import claimed_owner
from qmpnet.qmp import connect_clean

#: flags the kernel changes by itself (carrier, link watch): not something qmpnet did
CARRIER_FLAGS = frozenset({"LOWER_UP", "NO-CARRIER", "M-DOWN", "DORMANT"})


class ProbeError(RuntimeError):
    """A host tool or file could not give its view (the command and its own message)."""

    def __init__(self, command: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(command)} failed ({returncode}): {stderr.strip()}")
        self.command = command
        self.returncode = returncode
        self.stderr = stderr


def ns_name(netns: str) -> str:
    """``/run/netns/x`` or ``x`` -> ``x`` (what ``ip -n`` wants); ``""`` is the host."""
    return Path(netns).name if netns else ""


def tool_json(*cmd: str) -> Any:
    """Run a host tool that prints JSON; raise :class:`ProbeError` unless it succeeded."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ProbeError(list(cmd), -1, str(err)) from err
    if out.returncode != 0:
        raise ProbeError(list(cmd), out.returncode, out.stderr)
    try:
        return json.loads(out.stdout or "[]")
    except json.JSONDecodeError as err:
        raise ProbeError(list(cmd), 0, f"not JSON: {out.stdout[:200]!r}") from err


def ip_json(*args: str, netns: str = "") -> Any:
    """What ``ip -d -j [-n NETNS] ARGS`` says."""
    ns = ns_name(netns)
    return tool_json("ip", "-d", "-j", *(["-n", ns] if ns else []), *args)


def netns_names() -> set[str]:
    """The named netns (``ip netns list``)."""
    return {str(n["name"]) for n in tool_json("ip", "-j", "netns", "list")}


def links(netns: str = "") -> dict[str, dict[str, Any]]:
    """``ip -d -j link show`` of a netns (name or path; ``""``: the host), by link name.

    Empty when the netns is verifiably gone (not in ``ip netns list``).
    """
    if netns and ns_name(netns) not in netns_names():
        return {}
    return {str(link["ifname"]): link for link in ip_json("link", "show", netns=netns)}


def qdiscs(netns: str, dev: str) -> list[dict[str, Any]]:
    """``tc -j qdisc show dev DEV``; empty when the device (or its netns) is verifiably gone."""
    if dev not in links(netns):
        return []
    ns = ns_name(netns)
    return list(tool_json("tc", "-j", *(["-n", ns] if ns else []), "qdisc", "show", "dev", dev))


def has_ingress(netns: str, dev: str) -> bool:
    return any(q.get("kind") == "ingress" for q in qdiscs(netns, dev))


def marked_links(netns: str = "") -> dict[str, str]:
    """Links carrying qmpnet's mark: name -> alias."""
    return {
        name: str(link["ifalias"])
        for name, link in links(netns).items()
        if str(link.get("ifalias", "")).startswith("qmpnet:")
    }


def link_fingerprint(link: dict[str, Any]) -> dict[str, Any]:
    """The parts of a link qmpnet could have changed: MAC, MTU, admin flags, alias, master."""
    out = {k: link.get(k) for k in ("address", "mtu", "ifalias", "master", "link_type")}
    out["flags"] = sorted(set(link.get("flags", [])) - CARRIER_FLAGS)
    return out


def stable_view(link: dict[str, Any]) -> dict[str, Any]:
    """A link as ``ip -j`` shows it, without the fields that change on their own."""
    return {k: v for k, v in link.items() if k not in ("stats", "stats64", "operstate")}


def neighbour_mac(dev: str, address: str, netns: str = "") -> str:
    """The MAC the kernel learnt for ``address`` on ``dev``: who really answered a ping."""
    for entry in ip_json("neigh", "show", "dev", dev, "to", address, netns=netns):
        if entry.get("dst") == address:
            return str(entry.get("lladdr", ""))
    return ""


# --- processes -------------------------------------------------------------------------------


def fd_targets(pid: int | str = "self") -> list[str]:
    """What each open fd of process ``pid`` points at (``/proc/PID/fd``)."""
    base = f"/proc/{pid}/fd"
    out = []
    for fd in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            out.append(os.readlink(f"{base}/{fd}"))
    return out


def fd_count(pid: int | str = "self") -> int:
    return len(fd_targets(pid))


@attrs.frozen
class OpenFd:
    """One open fd of a process: its number and the open file it refers to.

    Equal only when number, device and inode are: an fd that was closed and whose number was
    taken again by another file is a different one. Sockets, pipes and anonymous inodes have an
    inode each; device nodes (``/dev/net/tun``) share theirs, so there the number tells them
    apart.
    """

    number: int
    dev: int
    ino: int
    #: what ``readlink`` said (``socket:[123]``, ``/dev/net/tun``): for messages only, since a
    #: file can be renamed or deleted while it is open
    target: str = attrs.field(eq=False)


def open_fds(pid: int | str = "self") -> frozenset[OpenFd]:
    """The open fds of process ``pid`` (``/proc/PID/fd``).

    To find what an operation left open, compare two of these as sets: what is new after it
    is what it left. Their sizes say nothing: in a test process, the garbage of earlier tests
    (transports, sockets) is closed whenever the collector gets to it.
    """
    base = f"/proc/{pid}/fd"
    found = set()
    for name in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):  # closed while we looked
            st = os.stat(f"{base}/{name}")
            found.add(OpenFd(int(name), st.st_dev, st.st_ino, os.readlink(f"{base}/{name}")))
    return frozenset(found)


def tun_fds(pid: int | str) -> list[str]:
    """The fd numbers of process ``pid`` open on /dev/net/tun (tap queues)."""
    base = f"/proc/{pid}/fd"
    found = []
    for fd in os.listdir(base):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"{base}/{fd}") == "/dev/net/tun":
                found.append(fd)
    return found


def tun_count(pid: int | str) -> int:
    return sum(1 for t in fd_targets(pid) if t == "/dev/net/tun")


def tap_fd_count(pid: int | str) -> int:
    """How many fds ``pid`` holds on /dev/net/tun or a macvtap's /dev/tapN."""
    return sum(1 for t in fd_targets(pid) if t == "/dev/net/tun" or re.fullmatch(r"/dev/tap\d+", t))


def rss_kib(pid: int | str = "self") -> int:
    """The resident set size of ``pid`` in KiB (``VmRSS`` in ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ProbeError(["read", f"/proc/{pid}/status"], 0, "no VmRSS line")


def qemu_pids(prefix: str) -> list[int]:
    """Running (not zombie) QEMU processes whose ``-name`` starts with ``prefix``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone while we looked
        if status == "Z" or not argv[0].endswith(b"qemu-system-x86_64"):
            continue
        if b"-name" in argv and argv[argv.index(b"-name") + 1].startswith(prefix.encode()):
            pids.append(int(entry))
    return pids


# --- QEMU, on a monitor qmpnet does not use ------------------------------------------------


@attrs.define(eq=False)
class Monitor:
    """Read QEMU through a qemu.qmp client of its own (not qmpnet's session)."""

    client: QMPClient

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        qmp_path: str | Path,
        timeout: float = 30.0,
    ) -> AsyncIterator[Monitor]:
        """A monitor connection for the block's duration (QEMU serves one client per socket)."""
        client = QMPClient("qmpnet-probe")
        # an event before the greeting breaks a plain connect (QEMU 7.2): retry as qmpnet does
        await asyncio.wait_for(connect_clean(client, str(qmp_path)), timeout)
        try:
            yield cls(client)
        finally:
            await client.disconnect()

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(command, args or {})

    async def hmp(self, command_line: str) -> str:
        return str(await self.execute("human-monitor-command", {"command-line": command_line}))

    async def peripherals(self) -> dict[str, str]:
        """QOM ``/machine/peripheral``: device id -> type (``child<virtio-net-pci>``)."""
        return {
            str(c["name"]): str(c["type"])
            for c in await self.execute("qom-list", {"path": "/machine/peripheral"})
            if str(c["type"]).startswith("child<")
        }

    async def netdev_lines(self) -> list[str]:
        """``info network`` lines of tap netdevs, e.g. ``x-net: index=0,type=tap,fd=12``."""
        # A NIC's netdev is shown indented under it: " \\ <id>-net: index=0,type=tap,fd=12".
        return [
            line.strip().lstrip("\\_ ")
            for line in (await self.hmp("info network")).splitlines()
            if "type=tap" in line
        ]

    async def netdevs(self) -> set[str]:
        """The ids of QEMU's tap netdevs."""
        return {line.split(":", 1)[0] for line in await self.netdev_lines()}

    async def pci_ids(self) -> set[str]:
        """Every ``qdev_id`` in ``query-pci``, behind bridges too."""
        found: set[str] = set()

        def walk(devices: list[dict[str, Any]]) -> None:
            for dev in devices:
                if dev.get("qdev_id"):
                    found.add(str(dev["qdev_id"]))
                walk(dev.get("pci_bridge", {}).get("devices", []))

        for bus in await self.execute("query-pci"):
            walk(bus.get("devices", []))
        return found

    async def holds_fd(self, name: str) -> bool:
        """Whether QEMU holds a named fd; destructive on purpose: one that is held is closed."""
        try:
            await self.execute("closefd", {"fdname": name})
        except ExecuteError as err:
            if "not found" in str(err):
                return False
            raise
        return True


def owned_links(netns: str = "") -> dict[str, str]:
    """Links carrying qmpnet's mark: name -> the owner id the mark claims."""
    return {name: claimed_owner(alias) or "" for name, alias in marked_links(netns).items()}


async def manager_device_del(qmp_path: str | Path, device: str, timeout: float) -> None:
    """Unplug a device behind qmpnet's back, as a VM manager could, and wait for it to go."""
    client = QMPClient("manager")
    await connect_clean(client, str(qmp_path))
    try:
        await client.execute("device_del", {"id": device})
        async with asyncio.timeout(timeout):
            async for event in client.events:
                data: Any = event.get("data") or {}
                if event["event"] == "DEVICE_DELETED" and data.get("device") == device:
                    break
    finally:
        await client.disconnect()


@attrs.frozen
class QemuView:
    """What QEMU holds: QOM peripherals, PCI devices and tap netdevs, by id."""

    devices: frozenset[str]
    pci_devices: frozenset[str]
    netdevs: frozenset[str]

    def has_any_of(self, endpoint_id: str) -> set[str]:
        names = {f"{endpoint_id}-dev", f"{endpoint_id}-net"}
        return names & (self.devices | self.pci_devices | self.netdevs)


async def qemu_view(qmp_path: str | Path) -> QemuView:
    async with Monitor.connect(qmp_path) as mon:
        return QemuView(
            frozenset(await mon.peripherals()),
            frozenset(await mon.pci_ids()),
            frozenset(await mon.netdevs()),
        )


async def held_fd_names(qmp_path: str | Path, endpoint_id: str, queues: int = 4) -> list[str]:
    """Named fds QEMU still holds for ``endpoint_id`` (each one found is released: a leak)."""
    async with Monitor.connect(qmp_path) as mon:
        return [
            f"{endpoint_id}-{kind}{i}"
            for kind in ("fd", "vhost")
            for i in range(queues)
            if await mon.holds_fd(f"{endpoint_id}-{kind}{i}")
        ]


async def monitor_command(
    qmp_path: str | Path, command: str, args: dict[str, Any] | None = None
) -> Any:
    """One QMP command on the VM manager's monitor (stop, cont, injections)."""
    async with Monitor.connect(qmp_path) as mon:
        return await mon.execute(command, args)


# --- the state directory, from its files ---------------------------------------------------


def state_file(state_dir: Path) -> Any:
    path = state_dir / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def journal_file(state_dir: Path) -> Any:
    path = state_dir / "journal.json"
    return json.loads(path.read_text()) if path.is_file() else None


def saved_ids(state_dir: Path) -> dict[str, str]:
    """Endpoint id -> status, read from the state file itself."""
    data = state_file(state_dir) or {"endpoints": []}
    out = {}
    for item in data["endpoints"]:
        ep = item["endpoint"]
        tap = ep.get("tap_interface") or ep.get("net_pair", {}).get("tap_interface")
        out[tap["id"]] = item["status"]
    return out


def state_leftovers(state_dir: Path) -> list[str]:
    """What a state directory still says is in use: listed interfaces, operations in flight."""
    problems = []
    state = state_file(state_dir)
    if state is not None:
        if not isinstance(state, dict) or "endpoints" not in state:
            problems.append(f"{state_dir}/state.json has no 'endpoints' list: {state!r:.200}")
        elif state["endpoints"]:
            problems.append(
                f"{state_dir}/state.json still lists {len(state['endpoints'])} interface(s)"
            )
    if journal_file(state_dir):
        problems.append(f"{state_dir}/journal.json has operations in flight")
    return problems
