"""``qmpnet watch`` against a real guest: veths come and go in a netns, NICs follow.

One q35 guest boots for the module. Each test makes a sandbox netns (where the watcher
looks) and a far netns holding the other end of every veth, with ``169.254.B.1/24``
(B = the veth MAC's last byte), as the guest expects. What happened is checked with tools
independent of qmpnet: the guest's serial markers (NIC-ADD/NIC-DEL/PING), ``ping`` from
the far netns, QEMU's other monitor (``qom-list``, ``info network``) and ``ip -j``.
The watcher runs in process (its API, every model) and as the installed ``qmpnet watch``:
stopped by SIGTERM mid-operation and by SIGINT, and killed by SIGKILL mid-unplug.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from qmpnet.config import Config
from qmpnet.marks import claimed_owner
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import connect_clean
from qmpnet.testing import probe
from qmpnet.testing.guest import build_guest, guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.scene import RUN, run, unique
from qmpnet.testing.vm import GuestVM, marker_fields
from qmpnet.watch import WatchEvent, WatchEventKind, watch

pytestmark = [pytest.mark.qemu, pytest.mark.kernel]

#: Generous: two shared cores, TCG guests booting next door.
SLOW = 120.0
#: Last MAC bytes handed out in this module (distinct, so guest addresses never clash).
_last_byte = itertools.count(0x31)


def new_mac() -> str:
    return f"02:71:{os.getpid() % 256:02x}:00:00:{next(_last_byte):02x}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guest(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GuestVM]:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (netns, taps, QEMU)")
    vm = await GuestVM.start(
        build_guest(),
        tmp_path_factory.mktemp("watch"),
        machine="q35",
        root_ports=8,
        name=f"{RUN}-watch",
        ready_timeout=SLOW,
    )
    try:
        yield vm
    finally:
        await vm.stop()


# --- the sandbox ---------------------------------------------------------------------------------


@attrs.define
class Pod:
    """A sandbox netns watched by qmpnet, a far netns, and the VM's qmpnet state."""

    sandbox: str
    far: str
    state_dir: Path
    vm: GuestVM
    config: Config = attrs.field(factory=Config)
    procs: list[asyncio.subprocess.Process] = attrs.field(factory=list)
    #: veth name here -> its peer's name in the far netns.
    peers: dict[str, str] = attrs.field(factory=dict)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.sandbox}"

    def state(self) -> NetworkState:
        return NetworkState.open(self.state_dir, str(self.vm.mgmt_qmp_path), self.config)

    def add_veth(self, mac: str, *, up: bool = True) -> str:
        """A veth as a CNI plugin leaves it: ``name`` here, its peer with .1 in the far netns."""
        name, peer = unique("v"), unique("w")
        run(
            "ip",
            "-n",
            self.sandbox,
            "link",
            "add",
            name,
            "address",
            mac,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            self.far,
        )
        run("ip", "-n", self.far, "addr", "add", f"{host_ip_for_mac(mac)}/24", "dev", peer)
        run("ip", "-n", self.far, "link", "set", peer, "up")
        if up:
            self.ip("link", "set", name, "up")
        self.peers[name] = peer
        return name

    def ip(self, *args: str) -> None:
        run("ip", "-n", self.sandbox, *args)

    def links(self) -> dict[str, Any]:
        """``ip`` of the sandbox; empty once the netns is verifiably gone."""
        return probe.links(self.sandbox)

    def our_links(self) -> dict[str, str]:
        """name -> owner id of the links carrying qmpnet's mark, as ``ip`` shows them."""
        return {
            n: claimed_owner(x["ifalias"])
            for n, x in self.links().items()
            if x.get("ifalias", "").startswith("qmpnet:")
        }

    async def ping_guest(self, mac: str) -> None:
        """Ping the guest's address for ``mac`` from the far end until it answers."""
        target = guest_ip_for_mac(mac)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOW
        while True:
            proc = await asyncio.create_subprocess_exec(
                "ip",
                "netns",
                "exec",
                self.far,
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                target,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if await proc.wait() == 0:
                return
            if loop.time() > deadline:
                pytest.fail(f"no answer from {target} within {SLOW} s")
            await asyncio.sleep(0.5)


@pytest_asyncio.fixture(loop_scope="module")
async def pod(guest: GuestVM, tmp_path: Path) -> AsyncIterator[Pod]:
    p = Pod(unique("n"), unique("n"), tmp_path / "state", guest)
    made = []
    try:
        for name in (p.sandbox, p.far):
            run("ip", "netns", "add", name)
            made.append(name)
            run("ip", "-n", name, "link", "set", "lo", "up")
        yield p
    finally:
        for proc in p.procs:
            if proc.returncode is None:
                proc.kill()  # only the watcher this test started, by its pid
                await proc.wait()
        state = p.state()
        for entry in await state.list_interfaces():
            with contextlib.suppress(Exception):
                await state.remove_interface(entry.endpoint.hardware_addr)
        for name in made:
            proc = await asyncio.create_subprocess_exec(  # may be gone already
                "ip", "netns", "del", name, stderr=asyncio.subprocess.DEVNULL
            )
            await proc.wait()


# --- independent views ---------------------------------------------------------------------


async def qemu_view(vm: GuestVM) -> tuple[set[str], set[str]]:
    """(NIC device ids, netdev ids) from QEMU's other monitor, as qmpnet ids."""
    client = QMPClient("watch-test")
    await asyncio.wait_for(connect_clean(client, str(vm.qmp_path)), SLOW)
    try:
        devices = await client.execute("qom-list", {"path": "/machine/peripheral"})
        info = await client.execute("human-monitor-command", {"command-line": "info network"})
    finally:
        await client.disconnect()
    assert isinstance(devices, list)
    assert isinstance(info, str)
    devs = {d["name"][:-4] for d in devices if d["name"].endswith("-dev")}
    nets = {m[:-4] for m in re.findall(r"\b(qn[0-9a-f]+-net):", info)}
    return devs, nets


async def assert_consistent(pod: Pod) -> set[str]:
    """State, QEMU and the host agree on the NICs; no operation is left in the journal."""
    entries = await pod.state().list_interfaces()
    saved = {e.endpoint.id for e in entries}
    assert all(e.status.value == "plugged" for e in entries)
    devices, netdevs = await qemu_view(pod.vm)
    taps = {owner for owner in pod.our_links().values()}
    assert devices == saved
    assert netdevs == saved
    assert taps == saved
    assert not (pod.state_dir / "journal.json").exists()
    return saved


async def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` (a change made by another process or the kernel) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SLOW
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"not within {SLOW} s: {what}")
        await asyncio.sleep(0.05)


async def saved_by_mac(pod: Pod) -> dict[str, str]:
    return {e.endpoint.hardware_addr: e.endpoint.id for e in await pod.state().list_interfaces()}


# --- the in-process watcher ----------------------------------------------------------------------


@attrs.define(eq=False)
class Recorder:
    """Collects the watcher's events and lets a test wait for one."""

    events: list[WatchEvent] = attrs.field(factory=list)
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event)

    def __call__(self, event: WatchEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, kind: WatchEventKind, link: str | None = None) -> list[WatchEvent]:
        return [e for e in self.events if e.kind is kind and (link is None or e.link == link)]

    async def wait(
        self,
        kind: WatchEventKind,
        link: str | None = None,
        *,
        after: int = 0,
        detail: str | None = None,
    ) -> WatchEvent:
        async with asyncio.timeout(SLOW):
            while True:
                for e in self.events[after:]:
                    if (
                        e.kind is kind
                        and (link is None or e.link == link)
                        and (detail is None or e.detail == detail)
                    ):
                        return e
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def watching(pod: Pod, **kw: Any) -> AsyncIterator[tuple[Recorder, asyncio.Event]]:
    recorder, stop = Recorder(), asyncio.Event()
    task = asyncio.create_task(watch(pod.state(), pod.path, stop=stop, on_event=recorder, **kw))
    try:
        yield recorder, stop
    finally:
        stop.set()
        async with asyncio.timeout(SLOW):
            await task  # a watcher that fails shows its error here


async def nic_added(vm: GuestVM, mac: str, since: int) -> dict[str, str]:
    match = await vm.wait_for(rf"^QMPNET NIC-ADD .*\bmac={re.escape(mac)}\b", SLOW, since=since)
    return marker_fields(match)


async def nic_gone(vm: GuestVM, mac: str, since: int) -> None:
    await vm.wait_for(rf"^QMPNET NIC-DEL .*\bmac={re.escape(mac)}\b", SLOW, since=since)


@pytest.mark.asyncio(loop_scope="module")
async def test_follows_links_present_new_and_gone(pod: Pod) -> None:
    vm = pod.vm
    cursor = vm.console_cursor()
    # Before the watcher: a link already up, and a NIC saved for a link that went since.
    old_mac, stale_mac = new_mac(), new_mac()
    old = pod.add_veth(old_mac)
    stale = pod.add_veth(stale_mac)
    stale_ep = await pod.state().add_interface(
        InterfaceDescription(name=stale), netns_path=pod.path
    )
    await nic_added(vm, stale_mac, cursor)
    pod.ip("link", "del", stale)
    assert stale_ep.id in pod.our_links().values()  # its tap is still there

    async with watching(pod) as (rec, _stop):
        synced = await rec.wait(WatchEventKind.SYNCED)
        # On start: the present link is plugged, the stale NIC unplugged with its tap.
        await nic_added(vm, old_mac, cursor)
        await nic_gone(vm, stale_mac, cursor)
        assert set(await saved_by_mac(pod)) == {old_mac}
        assert stale_ep.id not in pod.our_links().values()
        assert synced.detail == "1 plugged"
        await assert_consistent(pod)

        # A new link while watching: plugged, and traffic flows both ways.
        mac = new_mac()
        mark = len(rec.events)
        new = pod.add_veth(mac)
        plugged = await rec.wait(WatchEventKind.PLUGGED, new, after=mark)
        fields = await nic_added(vm, mac, cursor)
        assert plugged.mac == mac
        await pod.ping_guest(mac)
        await vm.wait_for(
            rf"^QMPNET PING name={fields['name']} peer="
            rf"{re.escape(host_ip_for_mac(mac))} result=ok",
            SLOW,
            since=cursor,
        )
        saved = await assert_consistent(pod)
        assert plugged.endpoint_id in saved
        tap = next(n for n, owner in pod.our_links().items() if owner == plugged.endpoint_id)

        # The link goes: the NIC goes, with its state entry and its tap.
        mark = len(rec.events)
        gone_at = vm.console_cursor()
        pod.ip("link", "del", new)
        await rec.wait(WatchEventKind.UNPLUGGED, new, after=mark)
        await nic_gone(vm, mac, gone_at)
        assert mac not in await saved_by_mac(pod)
        assert tap not in pod.links()
        await assert_consistent(pod)

    # Stopped: the VM keeps its NICs.
    assert rec.events[-1].kind is WatchEventKind.STOPPED
    assert set(await saved_by_mac(pod)) == {old_mac}
    assert old in pod.links()
    await assert_consistent(pod)


@pytest.mark.asyncio(loop_scope="module")
async def test_flaps_are_not_plugged_and_a_burst_is_one_plug(pod: Pod) -> None:
    vm = pod.vm
    async with watching(pod, debounce=3.0, unplug_on_exit=True) as (rec, _stop):
        await rec.wait(WatchEventKind.SYNCED)
        before = await assert_consistent(pod)

        # Comes and goes within the window: looked at once, gone by then, never plugged.
        mark = len(rec.events)
        flap = pod.add_veth(new_mac())
        pod.ip("link", "del", flap)
        await rec.wait(WatchEventKind.IGNORED, flap, after=mark, detail="absent")
        assert not rec.of(WatchEventKind.PLUGGING, flap)
        assert await assert_consistent(pod) == before

        # A burst of changes to one link: one plug, after it calmed down.
        cursor = vm.console_cursor()
        mac = new_mac()
        burst = pod.add_veth(mac, up=False)
        for args in (("mtu", "1400"), ("up",), ("down",), ("up",)):
            pod.ip("link", "set", burst, *args)
        plugged = await rec.wait(WatchEventKind.PLUGGED, burst)
        await nic_added(vm, mac, cursor)
        await pod.ping_guest(mac)

        # Later events of a plugged link (its own plumbing, an alias) keep it as it is.
        mark = len(rec.events)
        pod.ip("link", "set", burst, "alias", "touched")
        kept = await rec.wait(WatchEventKind.KEPT, burst, after=mark)
        assert kept.endpoint_id == plugged.endpoint_id
        assert len(rec.of(WatchEventKind.PLUGGING, burst)) == 1
        assert len(re.findall(rf"NIC-ADD .*mac={mac}", "\n".join(vm.console_tail(400)))) == 1
        assert not rec.of(WatchEventKind.FAILED)
        await assert_consistent(pod)
        gone_at = vm.console_cursor()

    # --unplug-on-exit: the NICs of this netns go with the watcher.
    await nic_gone(vm, mac, gone_at)
    assert await saved_by_mac(pod) == {}
    await assert_consistent(pod)


@pytest.mark.parametrize("model", ["macvtap", "bridged"])
@pytest.mark.asyncio(loop_scope="module")
async def test_other_models_keep_their_links_plugged(pod: Pod, model: str) -> None:
    """macvtap and bridged change the link (MAC, master): still recognised as plugged."""
    # The watcher plugs macvtap-model NICs with one queue pair (QEMU 7.2 aborts unplugging a
    # multiqueue NIC whose macvtap the kernel deleted with its parent): the state's default
    # (one pair per vCPU, 2 here) must not reach QEMU, or this test kills the VM.
    vm = pod.vm
    cursor = vm.console_cursor()
    mac = new_mac()
    async with watching(pod, model=InterworkingModel(model)) as (rec, _stop):
        await rec.wait(WatchEventKind.SYNCED)
        name = pod.add_veth(mac)
        plugged = await rec.wait(WatchEventKind.PLUGGED, name)
        await nic_added(vm, mac, cursor)
        await pod.ping_guest(mac)
        mark = len(rec.events)
        pod.ip("link", "set", name, "alias", "touched")
        await rec.wait(WatchEventKind.KEPT, name, after=mark)
        assert len(rec.of(WatchEventKind.PLUGGING, name)) == 1
        assert not rec.of(WatchEventKind.FAILED)
        await assert_consistent(pod)

        mark, gone_at = len(rec.events), vm.console_cursor()
        pod.ip("link", "del", name)
        await rec.wait(WatchEventKind.UNPLUGGED, name, after=mark)
        await nic_gone(vm, mac, gone_at)
        assert plugged.endpoint_id not in pod.our_links().values()
        assert await assert_consistent(pod) == set()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_failing_link_is_reported_and_the_others_go_on(
    pod: Pod, caplog: pytest.LogCaptureFixture
) -> None:
    vm = pod.vm
    cursor = vm.console_cursor()
    mac = new_mac()
    async with watching(pod, debounce=0.2) as (rec, _stop):
        await rec.wait(WatchEventKind.SYNCED)
        first = pod.add_veth(mac)
        await rec.wait(WatchEventKind.PLUGGED, first)
        # A second link with the same MAC: the VM cannot have two NICs with one address.
        twin = pod.add_veth(mac)
        failed = await rec.wait(WatchEventKind.FAILED, twin)
        assert mac in failed.detail
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "qmpnet.watch" and r.levelname == "ERROR"
        ]
        assert any(
            line.startswith(f"watch {pod.path}: {twin}: ")
            and "retry in" in line
            and "\n" not in line
            for line in lines
        ), lines

        # The watcher goes on: another link is plugged, nothing of the twin is anywhere.
        other_mac = new_mac()
        other = pod.add_veth(other_mac)
        await rec.wait(WatchEventKind.PLUGGED, other)
        await nic_added(vm, other_mac, cursor)
        assert set(await saved_by_mac(pod)) == {mac, other_mac}
        assert await assert_consistent(pod) == {
            e.endpoint_id for e in rec.of(WatchEventKind.PLUGGED)
        }

        # Once the twin goes, it is simply absent; the retries find nothing to do.
        mark = len(rec.events)
        pod.ip("link", "del", twin)
        await rec.wait(WatchEventKind.IGNORED, twin, after=mark, detail="absent")
        for name in (first, other):
            pod.ip("link", "del", name)
            await rec.wait(WatchEventKind.UNPLUGGED, name)
    assert await assert_consistent(pod) == set()
    assert not rec.of(WatchEventKind.PLUGGED, twin)


# --- the installed command ------------------------------------------------------------------------

QMPNET = str(Path(sys.executable).with_name("qmpnet"))


@attrs.define(eq=False)
class Watcher:
    """``qmpnet -v watch`` as a subprocess, its log lines collected from stderr."""

    proc: asyncio.subprocess.Process
    lines: list[str] = attrs.field(factory=list)
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event)

    @classmethod
    async def start(cls, pod: Pod) -> Watcher:
        proc = await asyncio.create_subprocess_exec(
            QMPNET,
            "-v",
            "watch",
            "--netns",
            pod.path,
            "--qmp",
            str(pod.vm.mgmt_qmp_path),
            "--state",
            str(pod.state_dir),
            "--debounce",
            "0.3",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        pod.procs.append(proc)
        w = cls(proc)
        w._reader = asyncio.create_task(w._read())
        return w

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._changed.set()
        self._changed.set()

    async def wait_log(self, pattern: str) -> str:
        regex = re.compile(pattern)
        async with asyncio.timeout(SLOW):
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                if self.proc.returncode is not None and self._reader and self._reader.done():
                    pytest.fail("qmpnet watch exited; log:\n" + "\n".join(self.lines))
                self._changed.clear()
                await self._changed.wait()

    async def stop(self, sig: signal.Signals | None) -> int:
        """Send ``sig`` (if any) and return the exit status."""
        if sig is not None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(SLOW):
            code = await self.proc.wait()
            assert self._reader is not None
            await self._reader
        return code


@contextlib.contextmanager
def vm_lock(pod: Pod) -> Any:
    """Hold the VM's lock as another qmpnet process would: operations wait for it."""
    pod.state_dir.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(pod.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_command_stops_cleanly_on_sigterm_and_sigint(pod: Pod) -> None:
    vm = pod.vm
    cursor = vm.console_cursor()
    first_mac = new_mac()
    first = pod.add_veth(first_mac)

    w = await Watcher.start(pod)
    await w.wait_log(rf"plugged {first} as qn")
    await nic_added(vm, first_mac, cursor)

    # SIGTERM while an operation is in flight (it waits for the VM's lock, which we hold):
    # the operation is finished, then the process exits 0.
    second_mac = new_mac()
    with vm_lock(pod):
        second = pod.add_veth(second_mac)
        await w.wait_log(rf"plugging {second} ")
        w.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # let the signal land while the lock is still ours
        assert w.proc.returncode is None, "\n".join(w.lines)
    assert await w.stop(None) == 0, "\n".join(w.lines)
    await nic_added(vm, second_mac, cursor)
    assert set(await saved_by_mac(pod)) == {first_mac, second_mac}  # kept: no unplug on exit
    assert not [line for line in w.lines if "ERROR" in line]
    await assert_consistent(pod)

    # While no watcher runs, a link goes; the next watcher notices at start, keeps the other.
    gone_at = vm.console_cursor()
    pod.ip("link", "del", first)
    w = await Watcher.start(pod)
    await w.wait_log(r"in step, 1 NIC\(s\) plugged")
    await nic_gone(vm, first_mac, gone_at)
    assert set(await saved_by_mac(pod)) == {second_mac}
    assert not re.search(rf"NIC-DEL .*mac={second_mac}", "\n".join(vm.console_tail(400)))
    assert await w.stop(signal.SIGINT) == 0, "\n".join(w.lines)
    await assert_consistent(pod)


async def hmp_stop_cont(vm: GuestVM, command: str) -> None:
    """Pause (``stop``) or resume (``cont``) the guest through the VM manager's monitor."""
    client = QMPClient("watch-test")
    await asyncio.wait_for(connect_clean(client, str(vm.qmp_path)), SLOW)
    try:
        await client.execute(command)
    finally:
        await client.disconnect()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_killed_watcher_leaves_what_the_next_one_recovers(pod: Pod) -> None:
    vm = pod.vm
    cursor = vm.console_cursor()
    mac = new_mac()
    name = pod.add_veth(mac)
    w = await Watcher.start(pod)
    await w.wait_log(rf"plugged {name} as qn")
    await nic_added(vm, mac, cursor)
    tap = next(iter(pod.our_links()))

    # A paused guest never acknowledges device_del: the unplug hangs in flight, journaled.
    await hmp_stop_cont(vm, "stop")
    try:
        pod.ip("link", "del", name)
        await w.wait_log(rf"unplugging {name} ")
        journal = pod.state_dir / "journal.json"
        await eventually(
            lambda: journal.exists() and "device-del" in journal.read_text(),
            "the unplug journaled at device-del",
        )
        w.proc.kill()  # SIGKILL: no chance to finish anything
        assert await w.stop(None) == -signal.SIGKILL
    finally:
        await hmp_stop_cont(vm, "cont")
    assert tap in pod.links()  # the interrupted unplug left its tap behind

    # The next watcher finishes the unplug before it looks at anything.
    w = await Watcher.start(pod)
    await w.wait_log(r"in step, 0 NIC\(s\) plugged")
    await nic_gone(vm, mac, cursor)
    assert await saved_by_mac(pod) == {}
    assert tap not in pod.links()
    assert await w.stop(signal.SIGTERM) == 0, "\n".join(w.lines)
    await assert_consistent(pod)


@pytest.mark.asyncio(loop_scope="module")
async def test_stops_when_the_netns_is_deleted_and_does_not_keep_it_alive(pod: Pod) -> None:
    vm = pod.vm
    cursor = vm.console_cursor()
    mac = new_mac()
    name = pod.add_veth(mac)
    peer = pod.peers[name]

    def far_has_peer() -> bool:
        return any(x["ifname"] == peer for x in probe.ip_json("link", "show", netns=pod.far))

    async with watching(pod) as (rec, _stop):
        await rec.wait(WatchEventKind.PLUGGED, name)
        await nic_added(vm, mac, cursor)
        run("ip", "netns", "del", pod.sandbox)
        stopped = await rec.wait(WatchEventKind.STOPPED)
        assert stopped.detail == "netns gone"

    # QEMU still holds the NIC's tap, which keeps the namespace (and the veth) alive...
    assert far_has_peer()
    # ...until the NIC is unplugged: then nothing holds it, and the veth goes with it.
    await pod.state().remove_interface(mac)
    await nic_gone(vm, mac, cursor)
    await eventually(lambda: not far_has_peer(), f"{peer} gone with the deleted netns")
    assert await assert_consistent(pod) == set()
