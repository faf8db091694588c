"""A driver process for the robustness tests, and the independent views they check with.

Run as a script, it is one qmpnet client process: it adds or removes one interface and,
with ``--kill-at STEP:PHASE``, SIGKILLs itself when the operation reaches that named step
(through a lifecycle observer, the public hook), so a test can crash it at any point. With
``--go FILE`` it waits for the file before starting, so two processes can be released at
once. It prints one JSON line: ``{"ok": true, "id": ..., "pci_path": ...}`` or the error.

Imported (the integration directory is on ``sys.path``), it gives the tests the views of
QEMU, host and state that do not go through qmpnet's own bookkeeping: QMP queries on the
VM manager's monitor, ``ip -j``, ``/proc/<pid>/fd``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from qmpnet.config import Config, Timeouts
from qmpnet.errors import QmpnetError
from qmpnet.hypervisor import pci_device_ids
from qmpnet.lifecycle import Operation, Phase, Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.testing.steps import StepRecorder

HERE = Path(__file__).resolve().parent

# --- the views ---------------------------------------------------------------------------------


@attrs.frozen
class QemuView:
    """What QEMU holds, asked on a monitor qmpnet does not use."""

    devices: frozenset[str]
    pci_devices: frozenset[str]
    netdevs: frozenset[str]

    def has_any_of(self, endpoint_id: str) -> set[str]:
        names = {f"{endpoint_id}-dev", f"{endpoint_id}-net"}
        return names & (self.devices | self.pci_devices | self.netdevs)


async def qemu_view(qmp_path: str | Path) -> QemuView:
    async with await QmpSession.connect(str(qmp_path), connect_timeout=30) as s:
        devices = {c["name"] for c in await s.qom_list("/machine/peripheral")
                   if c["type"].startswith("child<")}
        pci = pci_device_ids(await s.query_pci())
        netdevs = set(await s.netdevs())
    return QemuView(frozenset(devices), frozenset(pci), frozenset(netdevs))


async def held_fd_names(qmp_path: str | Path, endpoint_id: str, queues: int = 4) -> list[str]:
    """Named fds QEMU still holds for ``endpoint_id`` (closefd answers "not found" if none).

    Destructive on purpose: a name that is found is released, and reported as a leak.
    """
    held = []
    async with await QmpSession.connect(str(qmp_path), connect_timeout=30) as s:
        for kind in ("fd", "vhost"):
            for i in range(queues):
                if await s.close_fd(f"{endpoint_id}-{kind}{i}"):
                    held.append(f"{endpoint_id}-{kind}{i}")
    return held


async def hmp(qmp_path: str | Path, command: str, args: dict[str, Any] | None = None) -> Any:
    """One QMP command on the VM manager's monitor (stop, cont, injections)."""
    async with await QmpSession.connect(str(qmp_path), connect_timeout=30) as s:
        return await s.execute(command, args or {})


def fd_targets(pid: int | str = "self") -> list[str]:
    out = []
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{fd}"))
        except FileNotFoundError:
            continue
    return out


def fd_count(pid: int | str = "self") -> int:
    return len(fd_targets(pid))


def tun_count(pid: int) -> int:
    return sum(1 for t in fd_targets(pid) if t == "/dev/net/tun")


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ns_name(path: str) -> str:
    return Path(path).name if path else ""


def ip_links(netns: str = "") -> dict[str, dict[str, Any]]:
    """``ip -d -j link`` of a netns path (``""``: the host), by name; empty if it is gone."""
    cmd = ["ip", "-d", "-j", *(["-n", ns_name(netns)] if netns else []), "link", "show"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {}
    return {link["ifname"]: link for link in json.loads(out.stdout or "[]")}


def marked_links(netns: str = "") -> dict[str, str]:
    """Links carrying qmpnet's mark: name -> alias."""
    return {name: link["ifalias"] for name, link in ip_links(netns).items()
            if str(link.get("ifalias", "")).startswith("qmpnet:")}


#: flags the kernel changes by itself (carrier, link watch): not something qmpnet did
_CARRIER_FLAGS = {"LOWER_UP", "NO-CARRIER", "M-DOWN", "DORMANT"}


def link_fingerprint(link: dict[str, Any]) -> dict[str, Any]:
    """The parts of a link qmpnet could have changed: MAC, MTU, admin flags, alias, master."""
    out = {k: link.get(k) for k in ("address", "mtu", "ifalias", "master", "link_type")}
    out["flags"] = sorted(set(link.get("flags", [])) - _CARRIER_FLAGS)
    return out


def qdiscs(netns: str, dev: str) -> list[dict[str, Any]]:
    cmd = ["tc", "-j", *(["-n", ns_name(netns)] if netns else []), "qdisc", "show", "dev", dev]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return []
    return list(json.loads(out.stdout or "[]"))


def has_ingress(netns: str, dev: str) -> bool:
    return any(q.get("kind") == "ingress" for q in qdiscs(netns, dev))


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                         check=False)
    return {n["name"] for n in json.loads(out.stdout or "[]")}


def state_file(state_dir: Path) -> Any:
    path = state_dir / "state.json"
    return json.loads(path.read_text()) if path.is_file() else None


def journal_file(state_dir: Path) -> Any:
    path = state_dir / "journal.json"
    return json.loads(path.read_text()) if path.is_file() else None


def saved_ids(state_dir: Path) -> dict[str, str]:
    """Endpoint id -> status, read from the file itself."""
    data = state_file(state_dir) or {"endpoints": []}
    out = {}
    for item in data["endpoints"]:
        ep = item["endpoint"]
        tap = ep.get("tap_interface") or ep.get("net_pair", {}).get("tap_interface")
        out[tap["id"]] = item["status"]
    return out


def make_sandbox(netns: str, name: str, mac: str) -> None:
    """The link a CNI plugin leaves in the sandbox: a veth (its peer stays in the netns)."""
    ns = ns_name(netns)
    run = ["ip", "-n", ns, "link"]
    subprocess.run([*run, "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    subprocess.run([*run, "set", name, "address", mac], check=True)
    subprocess.run([*run, "set", name + "p", "up"], check=True)
    subprocess.run([*run, "set", name, "up"], check=True)  # CNI plugins leave it up
    deadline = time.monotonic() + 30
    while not all("LOWER_UP" in ip_links(netns).get(n, {}).get("flags", [])
                  for n in (name, name + "p")):
        assert time.monotonic() < deadline, f"{name} got no carrier"
        time.sleep(0.01)


# --- the driver process ------------------------------------------------------------------------


def _killer(step: str, phase: str) -> Any:
    def observe(op: Operation, at: Step, ph: Phase) -> None:
        if at.value == step and ph.value == phase:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return observe


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    config = Config(tap_name=args.tap_template, queues=args.queues,
                    timeouts=Timeouts(unplug=args.unplug_timeout, connect=30.0))
    state = NetworkState.open(args.state, args.qmp, config)
    if args.kill_at:
        state.observers.append(_killer(*args.kill_at.split(":")))
    # CLOCK_MONOTONIC is one clock for all processes: spans of two drivers compare.
    steps = StepRecorder()
    state.observers.append(steps)
    started = time.monotonic()
    if args.op == "add":
        desc = InterfaceDescription(name=args.name, hw_addr=args.mac)
        ep = await state.add_interface(desc, model=InterworkingModel.parse(args.model),
                                       netns_path=args.netns, tap_name=args.tap_name or None,
                                       wait_guest=args.wait_guest)
        return {"ok": True, "id": ep.id, "pci_path": ep.pci_path,
                "seconds": time.monotonic() - started, "span": list(steps.span())}
    ep = await state.remove_interface(args.mac)
    return {"ok": True, "id": ep.id, "span": list(steps.span())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("op", choices=["add", "remove"])
    p.add_argument("--qmp", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--name", default="eth1")
    p.add_argument("--netns", default="")
    p.add_argument("--model", default="tcfilter")
    p.add_argument("--tap-name", default="")
    p.add_argument("--tap-template", default="tap{idx}_kata")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--unplug-timeout", type=float, default=10.0)
    p.add_argument("--wait-guest", action="store_true")
    p.add_argument("--kill-at", default="", help="STEP:PHASE, e.g. device-add:done")
    p.add_argument("--go", default="", help="wait for this file before starting")
    args = p.parse_args()
    while args.go and not os.path.exists(args.go):
        time.sleep(0.002)
    try:
        result = asyncio.run(_main(args))
    except QmpnetError as err:
        result = {"ok": False, "error": str(err), "type": type(err).__name__}
    print(json.dumps(result), flush=True)


def command(*args: str) -> list[str]:
    """The argv that runs this driver with the test's interpreter."""
    return [sys.executable, str(HERE / "crash_driver.py"), *args]


if __name__ == "__main__":
    main()
