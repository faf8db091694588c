"""``qmpnet demo``: the whole job on a real VM, in well under a minute, leaving nothing behind.

It builds (or loads from cache) the bundled tiny guest, boots it in QEMU (q35; TCG unless
``$QMPNET_ACCEL`` says otherwise), hot-plugs two NICs through qmpnet's library, and proves
each from outside qmpnet's own view: the guest's serial markers say what the guest kernel
sees (name, MAC, queues, MSI-X vectors, the address it set, its ping to the host), and
busybox ``ping`` checks the way back from the host. The NICs:

- a ``tap`` endpoint (model ``none``) made in the host namespace; the tap itself gets the
  host address of the link;
- a ``veth`` endpoint (model ``tcfilter``) in a pod-like netns that Debian's CNI ``bridge`` +
  ``host-local`` plugins made, invoked as a runtime does; the CNI bridge, the far side of the
  pod's veth, gets the host address.

The guest derives its address from the MAC (``169.254.B.2/24``, host at ``.1``, ``B`` the
last MAC byte), so the demo picks MACs whose ``B`` no host address or route uses yet, and
asks the bridge plugin for the pod veth's MAC (the guest NIC takes the veth's MAC). The CNI
range starts at ``.10``, so the pod's own address never shadows the guest's or the host's.

Then it lists the interfaces as ``qmpnet list-ifaces`` prints them, unplugs both, tears
everything down, and checks that no link, netns, QEMU process or state file is left. Every
host object carries a per-run prefix; cleanup runs on failure and on Ctrl-C too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from qmpnet.config import Config
from qmpnet.endpoints import Endpoint
from qmpnet.lifecycle import Phase, Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState, host_link
from qmpnet.testing import probe
from qmpnet.testing.steps import StepRecorder

#: Gives the host end of a just-plugged link its address: (device to ping from, description).
HostSide = Callable[[Endpoint], Awaitable[tuple[str, str]]]

MARKER_TIMEOUT = 40.0  # the guest retries its ping for ~30 s before it reports a failure
PING_TRIES = 10


class DemoError(Exception):
    """A step of the demo did not show what it must."""


# --- reporting -------------------------------------------------------------------------------


@attrs.define(eq=False)
class Report:
    """Numbered steps with their duration; details are printed under the step they explain."""

    out: TextIO
    started: float = attrs.field(factory=time.monotonic)
    count: int = 0
    failed: bool = False
    #: qmpnet's warnings during the current step, shown under it (not mid-line on stderr).
    notes: list[str] = attrs.field(factory=list)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[list[str]]:
        """Run one step: ``ok``/``FAILED`` and its duration, then the detail lines."""
        self.count += 1
        at = time.monotonic() - self.started
        print(f"[{at:5.1f} s] {self.count}. {title} ...", end="", file=self.out, flush=True)
        details: list[str] = []
        self.notes = []
        begin = time.monotonic()
        try:
            yield details
        except BaseException as err:
            self.failed = True
            reason = (
                "interrupted"
                if isinstance(err, asyncio.CancelledError | KeyboardInterrupt)
                else f"{type(err).__name__}: {err}"
            )
            self.say(f" FAILED after {_dur(time.monotonic() - begin)}")
            for line in [*details, *self.notes, reason]:
                self.say(f"           {line}")
            raise
        self.say(f" ok ({_dur(time.monotonic() - begin)})")
        for line in [*details, *self.notes]:
            self.say(f"           {line}")


class _NoteHandler(logging.Handler):
    """Turns qmpnet's log warnings into notes under the running step (each text once)."""

    def __init__(self, report: Report) -> None:
        super().__init__(logging.WARNING)
        self.report = report
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text not in self.seen:
            self.seen.add(text)
            self.report.notes.append(f"note: {text}")


@contextlib.contextmanager
def _notes_under_steps(report: Report) -> Iterator[None]:
    """Route qmpnet's warnings to the report, unless the caller asked for logs (-v)."""
    logger = logging.getLogger("qmpnet")
    if logging.getLogger().level < logging.WARNING:
        yield
        return
    handler, propagate = _NoteHandler(report), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _dur(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


# --- host-side helpers -----------------------------------------------------------------------


def prerequisites() -> str:
    """Fail with what is missing (``make setup`` installs it), before anything is made."""
    from qmpnet.testing.cni import CNI_BIN

    missing = [] if os.geteuid() == 0 else ["root (taps, netns and QEMU's fds need it)"]
    missing += [
        f"{tool} (make setup)"
        for tool in ("qemu-system-x86_64", "busybox", "ip")
        if shutil.which(tool) is None
    ]
    missing += [
        f"{CNI_BIN / p} (package containernetworking-plugins)"
        for p in ("bridge", "host-local")
        if not (CNI_BIN / p).exists()
    ]
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if missing:
        raise DemoError("missing: " + "; ".join(missing))
    return "root, /dev/net/tun, qemu-system-x86_64, busybox, ip, CNI bridge + host-local"


async def _run(*cmd: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def free_octets(count: int) -> list[int]:
    """``count`` distinct values of B for which no host address or route is in 169.254.B/24."""
    link_local = ipaddress.IPv4Network("169.254.0.0/16")
    nets = [
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
        for link in probe.ip_json("addr")
        for a in link.get("addr_info", [])
    ]
    nets += [
        ipaddress.ip_network(r["dst"])
        for r in probe.ip_json("route")
        if r.get("dst", "default") != "default"
    ]
    used = {
        int(net.network_address.packed[2])
        for net in nets
        if isinstance(net, ipaddress.IPv4Network)
        and net.subnet_of(link_local)
        and net.prefixlen >= 24
    }
    free = [b for b in range(16, 250) if b not in used]
    if len(free) < count:
        raise DemoError("no free 169.254.B.0/24 subnet on this host")
    return secrets.SystemRandom().sample(free, count)


def mac_for(octet: int) -> str:
    """A MAC in QEMU's range whose last byte is ``octet`` (so the guest picks that subnet)."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(2)) + f":{octet:02x}"


async def host_ping(address: str, dev: str, tries: int = PING_TRIES) -> float:
    """Ping ``address`` out of ``dev`` with busybox; the round-trip time in ms."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise DemoError("busybox is missing: run `make setup` (package busybox-static)")
    out = ""
    for _ in range(tries):
        status, out = await _run(busybox, "ping", "-c", "1", "-W", "1", "-I", dev, address)
        if status == 0 and (match := re.search(r"time=([\d.]+) ms", out)):
            return float(match[1])
    raise DemoError(f"no echo reply from {address} via {dev}: {out.strip()}")


# --- guest-side helpers ----------------------------------------------------------------------


@attrs.frozen
class Seen:
    """A console marker line the guest printed, and when this process saw it."""

    fields: dict[str, str]
    at: float


async def _watch(vm: Any, pattern: str, since: int) -> Seen:
    from qmpnet.testing.vm import marker_fields

    match = await vm.wait_for(pattern, MARKER_TIMEOUT, since=since)
    return Seen(marker_fields(match), time.monotonic())


# --- the demo --------------------------------------------------------------------------------


@attrs.define(eq=False)
class Demo:
    report: Report
    prefix: str
    work: Path
    state_dir: Path
    clock: StepRecorder = attrs.field(factory=StepRecorder)
    vm: Any = None
    state: NetworkState | None = None
    #: the VM manager's monitor (QEMU's first): an independent view of QEMU's devices.
    manager: Any = None
    #: MAC -> (label, endpoint) of what is plugged now.
    plugged: dict[str, tuple[str, Endpoint]] = attrs.field(factory=dict)
    timings: list[tuple[str, float, float]] = attrs.field(factory=list)

    async def boot(self) -> None:
        from qmpnet.testing.guest import build_guest
        from qmpnet.testing.vm import GuestVM

        with self.report.step("build (or load) the tiny guest from Debian packages") as info:
            image = await asyncio.to_thread(build_guest)
            info.append(f"kernel {image.kernel_version}, initrd {image.initrd}")
        with self.report.step("boot it in QEMU (q35, 2 vCPUs, 4 pcie-root-ports)") as info:
            self.vm = await GuestVM.start(
                image, self.work, machine="q35", root_ports=4, vcpus=2, name=f"{self.prefix}-vm"
            )
            info.append(
                f"qemu-system-x86_64 pid {self.vm.pid}, accel {self.vm.accel}; guest "
                f"printed READY; qmpnet uses the second monitor {self.vm.mgmt_qmp_path}"
            )
        from qemu.qmp import QMPClient

        self.manager = QMPClient(f"{self.prefix}-manager")
        await asyncio.wait_for(self.manager.connect(str(self.vm.qmp_path)), 10)
        self.state = NetworkState.open(self.state_dir, str(self.vm.mgmt_qmp_path), Config())
        self.state.observers.append(self.clock)

    async def qemu_has(self, endpoint: Endpoint) -> list[str]:
        """What QEMU still has of ``endpoint``, asked on the manager's monitor."""
        monitor = probe.Monitor(self.manager)
        found = [f"netdev {n}" for n in await monitor.netdevs() if n == f"{endpoint.id}-net"]
        found += [f"device {d}" for d in await monitor.peripherals() if d == f"{endpoint.id}-dev"]
        return found

    async def plug(
        self,
        title: str,
        label: str,
        desc: InterfaceDescription,
        model: InterworkingModel,
        host_side: HostSide,
        **kwargs: Any,
    ) -> None:
        """Hot-plug, give the host side its address, and show what guest and host see."""
        assert self.state is not None
        mac = desc.hw_addr
        with self.report.step(title) as info:
            since = self.vm.console_cursor()
            added = asyncio.create_task(_watch(self.vm, rf"^QMPNET NIC-ADD .*\bmac={mac}\b", since))
            try:
                endpoint = await self.state.add_interface(desc, model=model, **kwargs)
            except BaseException:
                added.cancel()
                raise
            self.plugged[mac] = (label, endpoint)
            dev, peer = await host_side(endpoint)
            seen = await added
            name = seen.fields["name"]
            addr = await _watch(self.vm, rf"^QMPNET NIC-ADDR name={name}\b", since)
            ping = await _watch(self.vm, rf"^QMPNET PING name={name}\b", since)
            guest_sees = seen.at - self.clock.last(Step.DEVICE_ADD, Phase.DONE, mac=mac)
            self.timings.append((label, guest_sees, 0.0))
            info.append(
                f"qmpnet: {endpoint.type.value} endpoint {endpoint.id}, guest PCI path "
                f"{endpoint.pci_path}; {peer}"
            )
            info.append(
                f"guest sees {name}: mac {seen.fields['mac']}, rx/tx queues "
                f"{seen.fields['rxq']}/{seen.fields['txq']}, {seen.fields['msix']} "
                f"MSI-X vectors, {_dur(guest_sees)} after device_add"
            )
            info.append(f"guest set {addr.fields['addr']}/24 on {name}")
            if ping.fields["result"] != "ok":
                raise DemoError(f"the guest could not ping {ping.fields['peer']}")
            info.append(f"ping guest -> host {ping.fields['peer']}: ok (guest's PING marker)")
            guest_ip = addr.fields["addr"]
            rtt = await host_ping(guest_ip, dev)
            answered = probe.neighbour_mac(dev, guest_ip)
            if answered != mac:
                raise DemoError(f"{guest_ip} answered from {answered or 'nowhere'}, not {mac}")
            info.append(
                f"ping host -> guest {guest_ip}: ok, {rtt:.2f} ms, answered by the guest's MAC"
            )

    async def unplug(self, mac: str) -> None:
        assert self.state is not None
        with self.report.step(f"unplug {mac}") as info:
            since = self.vm.console_cursor()
            gone = asyncio.create_task(_watch(self.vm, rf"^QMPNET NIC-DEL .*\bmac={mac}\b", since))
            try:
                await self.state.remove_interface(mac)
            except BaseException:
                gone.cancel()
                raise
            label, endpoint = self.plugged.pop(mac)
            seen = await gone
            deleted = self.clock.last(Step.DEVICE_DEL, Phase.DONE, mac=mac) - self.clock.last(
                Step.DEVICE_DEL, Phase.BEGIN, mac=mac
            )
            self.timings.append((label, 0.0, deleted))
            info.append(
                f"device_del -> DEVICE_DELETED {_dur(deleted)}; guest reports "
                f"{seen.fields['name']} (mac {mac}) gone"
            )
            left = await self.qemu_has(endpoint)
            link, netns = host_link(endpoint), Path(endpoint.netns_path).name
            if link in probe.links(netns):
                left.append(f"link {link}")
            if left:
                raise DemoError(f"still there after the unplug: {', '.join(left)}")
            info.append(
                f"QEMU ('info network', qom-list) has no {endpoint.id}-net/-dev; "
                f"{link} is gone from {'netns ' + netns if netns else 'the host'}"
            )

    async def list_ifaces(self) -> None:
        with self.report.step("qmpnet list-ifaces (from the saved state)") as info:
            status, out = await _run(
                sys.executable, "-m", "qmpnet.cli", "list-ifaces", "--state", str(self.state_dir)
            )
            if status != 0:
                raise DemoError(f"list-ifaces exited with {status}: {out.strip()}")
            info.extend(out.rstrip().splitlines())

    async def unplug_leftovers(self) -> None:
        """On failure: unplug what is still plugged, best effort (QEMU is killed after)."""
        if self.state is None:
            return
        for mac in list(self.plugged):
            self.plugged.pop(mac)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.state.remove_interface(mac), 15)

    async def stop_vm(self) -> None:
        if self.manager is not None:
            with contextlib.suppress(Exception):
                await self.manager.disconnect()
        if self.vm is not None:
            await self.vm.stop()


def leftovers(prefix: str, pid: int | None, paths: list[Path], veths: list[str]) -> list[str]:
    """Whatever of the demo's is still on the host (links, netns, QEMU, files).

    Raises :class:`~qmpnet.testing.probe.ProbeError` when ``ip`` cannot tell.
    """
    found = [f"link {name}" for name in probe.links() if name.startswith(prefix) or name in veths]
    found += [f"netns {name}" for name in sorted(probe.netns_names()) if name.startswith(prefix)]
    found += [f"QEMU process {p}" for p in probe.qemu_pids(prefix)]
    if pid is not None and Path(f"/proc/{pid}").exists():
        found.append(f"QEMU process {pid}")
    found += [f"file {p}" for p in paths if p.exists()]
    return found


async def _tap_side(endpoint: Endpoint) -> tuple[str, str]:
    from qmpnet.testing.guest import host_ip_for_mac

    tap, addr = host_link(endpoint), host_ip_for_mac(endpoint.hardware_addr)
    status, out = await _run("ip", "addr", "add", f"{addr}/24", "dev", tap)
    if status != 0:
        raise DemoError(f"ip addr add {addr}/24 dev {tap}: {out.strip()}")
    return tap, f"{tap} (host netns) has {addr}/24"


async def _steps(demo: Demo, stack: contextlib.AsyncExitStack, veths: list[str]) -> None:
    """The demo proper; every resource it makes is registered on ``stack`` at once."""
    from qmpnet.testing import cni

    report, prefix = demo.report, demo.prefix
    with report.step("check what the demo needs") as info:
        info.append(prerequisites())
    stack.push_async_callback(demo.stop_vm)
    stack.push_async_callback(demo.unplug_leftovers)
    await demo.boot()
    b_tap, b_pod = free_octets(2)

    tap_mac = mac_for(b_tap)
    await demo.plug(
        f"hot-plug a tap endpoint {prefix}tap (model none, host netns, 2 queues)",
        "tap (none)",
        InterfaceDescription(name="eth0", hw_addr=tap_mac),
        InterworkingModel.NONE,
        _tap_side,
        tap_name=f"{prefix}tap",
        queues=2,
    )

    pod_mac, subnet = mac_for(b_pod), f"169.254.{b_pod}"
    with report.step("make a pod netns with Debian's CNI bridge + host-local") as info:
        pod = await stack.enter_async_context(
            cni.pod_network(
                f"{prefix}p",
                f"{subnet}.0/24",
                mac=pod_mac,
                range_start=f"{subnet}.10",
                range_end=f"{subnet}.250",
                bridge_address=f"{subnet}.1/24",
            )
        )
        veths.append(pod.host_veth)
        stack.push_async_callback(demo.unplug_leftovers)  # runs before the pod goes
        info.append(
            f"netns {pod.netns}: {pod.ifname} mac {pod.mac}, CNI address "
            f"{', '.join(map(str, pod.ips))}; host side {pod.host_veth} on "
            f"bridge {pod.bridge} (given {subnet}.1/24)"
        )

    async def pod_side(_: Endpoint) -> tuple[str, str]:
        return pod.bridge, f"{pod.bridge} (far side of the CNI veth) has {subnet}.1/24"

    await demo.plug(
        f"hot-plug the pod's veth {pod.ifname} (model tcfilter)",
        "veth (tcfilter)",
        InterfaceDescription(name=pod.ifname, hw_addr=pod_mac),
        InterworkingModel.TCFILTER,
        pod_side,
        netns_path=pod.netns_path,
    )
    await demo.list_ifaces()
    await demo.unplug(tap_mac)
    await demo.unplug(pod_mac)
    with report.step("tear down: stop QEMU, CNI DEL, remove the pod netns"):
        await stack.aclose()


async def run_demo(out: TextIO = sys.stdout) -> int:
    """Run the demo, printing as it goes; 0 when every step showed what it must.

    Cleanup always runs (failure, Ctrl-C); a cancellation is re-raised after it.
    """
    report = Report(out)
    prefix = "qd" + secrets.token_hex(2)[:3]
    work = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    demo = Demo(report, prefix, work, work / "state")
    veths: list[str] = []
    interrupted: asyncio.CancelledError | None = None
    report.say(
        f"qmpnet demo: hot-plug two NICs into a running VM and prove traffic (run prefix {prefix})"
    )
    with _notes_under_steps(report):
        try:
            async with contextlib.AsyncExitStack() as stack:
                await _steps(demo, stack, veths)
        except (Exception, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError):
                interrupted = err
            elif not report.failed:  # a failing step has shown its error already
                report.say(f"error: {type(err).__name__}: {err}")
            report.failed = True
        finally:
            shutil.rmtree(work, ignore_errors=True)
    with (
        contextlib.suppress(DemoError, probe.ProbeError),
        report.step("check that nothing is left on the host") as info,
    ):
        left = leftovers(prefix, demo.vm.pid if demo.vm else None, [demo.state_dir, work], veths)
        if left:
            raise DemoError("left behind: " + ", ".join(left))
        info.append(
            f"no link or netns named {prefix}*, no {' '.join(veths) or 'pod veth'}, "
            f"no QEMU process named {prefix}*, state dir {demo.state_dir} gone"
        )
    _print_timings(report, demo.timings)
    if interrupted is not None:
        report.say("interrupted; everything was cleaned up")
        raise interrupted
    report.say(
        "demo FAILED"
        if report.failed
        else f"demo passed in {time.monotonic() - report.started:.1f} s"
    )
    return 1 if report.failed else 0


def _print_timings(report: Report, timings: list[tuple[str, float, float]]) -> None:
    if not timings:
        return
    report.say("guest-visible timings:")
    for what, seen, deleted in timings:
        if seen:
            report.say(f"  {what:16} device_add -> guest NIC-ADD marker  {seen * 1000:6.1f} ms")
        if deleted:
            report.say(f"  {what:16} device_del -> DEVICE_DELETED        {deleted * 1000:6.1f} ms")


def main() -> int:
    try:
        return asyncio.run(run_demo())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
