"""Live control of a plugged NIC, seen from the guest: its link (``set-link``, ``--link`` at
plug, reconcile setting it again), in the direct mode and through qmpnetd; its bandwidth,
measured with iperf3 through the NIC (model none and each NetPair model).

The guest reports its NIC's carrier on the console (``CARRIER`` markers); traffic is a ping
from the host end of the tap to the guest's own address; QEMU's first monitor (the VM
manager's) stands for someone else changing the link behind qmpnet's back.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio

from qmpnet.errors import UnsupportedError
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.testing.cli import run_qmpnet
from qmpnet.testing.cni import free_link_local_byte, ping_until
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.iperf import throughput
from qmpnet.testing.output import conforms
from qmpnet.testing.probe import ip_json, links, monitor_command, ns_name
from qmpnet.testing.scene import cni_veth, del_link, unique
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

GUEST = 90.0  # generous: TCG guests on a shared 2-core machine
PING = ("busybox", "ping", "-c", "1", "-W", "1")

vm = module_vm("live")


qmpnet = run_qmpnet  # the kit's, under the name this module's tests call


async def ok(*args: str, env: dict[str, str] | None = None) -> Any:
    done = await qmpnet(*args, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else None


@attrs.frozen
class Nic:
    """A tap NIC in the host namespace whose host end answers at the guest's peer address."""

    mac: str
    tap: str
    state: Path

    @property
    def guest_ip(self) -> str:
        return guest_ip_for_mac(self.mac)


@pytest_asyncio.fixture(loop_scope="module")
async def spec(tmp_path: Path) -> AsyncIterator[Nic]:
    b = free_link_local_byte()
    nic = Nic(
        mac=f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}",
        tap=unique("l"),
        state=tmp_path / "state",
    )
    (tmp_path / "nic.json").write_text(json.dumps({"name": "eth9", "hwAddr": nic.mac}))
    try:
        yield nic
    finally:
        del_link(nic.tap)


def plug_args(vm: GuestVM, nic: Nic, *more: str) -> list[str]:
    return [
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(nic.state),
        "--model",
        "none",
        "--queues",
        "1",
        "--tap-name",
        nic.tap,
        *more,
        str(nic.state.parent / "nic.json"),
    ]


async def address_host_end(nic: Nic) -> None:
    for argv in (
        ["ip", "addr", "add", f"{host_ip_for_mac(nic.mac)}/24", "dev", nic.tap],
        ["ip", "link", "set", nic.tap, "up"],
    ):
        await asyncio.to_thread(subprocess.run, argv, check=True)


async def carrier(vm: GuestVM, nic: Nic, state: str, cursor: int) -> None:
    await vm.wait_for(rf"QMPNET CARRIER name=\S+ mac={nic.mac} state={state}", GUEST, since=cursor)


async def unreachable(nic: Nic) -> None:
    """Pings from the host end get no answer (the guest's NIC has no carrier)."""
    for _ in range(3):
        done = await asyncio.create_subprocess_exec(
            *PING, "-I", nic.tap, nic.guest_ip, stdout=subprocess.DEVNULL
        )
        assert await done.wait() != 0, f"{nic.guest_ip} answered with its link down"


def vm_args(vm: GuestVM, nic: Nic) -> list[str]:
    return ["--qmp", str(vm.mgmt_qmp_path), "--state", str(nic.state)]


async def test_link_down_at_plug_then_up_and_down_live_and_reconcile_sets_it_again(
    vm: GuestVM, spec: Nic
) -> None:
    cursor = vm.console_cursor()
    plugged = await ok(*plug_args(vm, spec, "--link", "down"))
    assert plugged["hwAddr"] == spec.mac
    await address_host_end(spec)
    await carrier(vm, spec, "down", cursor)  # the guest never saw it up
    listed = conforms(await ok("list-ifaces", *vm_args(vm, spec), "--json"), "interfaceList")
    (entry,) = listed["interfaces"]
    assert entry["link"] == "down"
    table = await qmpnet("list-ifaces", *vm_args(vm, spec))
    assert "plugged, link down" in table.stdout, table.stdout
    await unreachable(spec)

    cursor = vm.console_cursor()
    changed = conforms(
        await ok("set-link", *vm_args(vm, spec), "--mac", spec.mac, "up"), "interfaceChanged"
    )
    assert changed["interface"]["link"] == "up"
    await carrier(vm, spec, "up", cursor)
    await ping_until([*PING, "-I", spec.tap, spec.guest_ip], GUEST)

    cursor = vm.console_cursor()
    await ok("set-link", *vm_args(vm, spec), "--mac", spec.mac, "down")
    await carrier(vm, spec, "down", cursor)
    await unreachable(spec)

    # someone else sets it up through their own monitor; reconcile sets the saved state again
    device = entry["endpoint"]["tap_interface"]["id"] + "-dev"
    cursor = vm.console_cursor()
    await monitor_command(vm.qmp_path, "set_link", {"name": device, "up": True})
    await carrier(vm, spec, "up", cursor)
    cursor = vm.console_cursor()
    report = conforms(await ok("reconcile", *vm_args(vm, spec), "--json"), "reconcile")
    assert report["errors"] == [], report
    assert len(report["consistent"]) == 1, report
    await carrier(vm, spec, "down", cursor)

    # bad input: one line naming the field and the value, nothing changed
    unknown = await qmpnet("set-link", *vm_args(vm, spec), "--mac", "52:54:00:00:00:01", "up")
    assert unknown.returncode == 3, unknown.stderr
    assert "52:54:00:00:00:01" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    word = await qmpnet("set-link", *vm_args(vm, spec), "--mac", spec.mac, "sideways")
    assert word.returncode == 2, word.stderr
    (entry,) = (await ok("list-ifaces", *vm_args(vm, spec), "--json"))["interfaces"]
    assert entry["link"] == "down"

    cursor = vm.console_cursor()
    await ok("del-iface", *vm_args(vm, spec), "--mac", spec.mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)


def host_counters(tap: str) -> dict[str, int]:
    """The tap's counters as ``ip -s -j link`` reports them (the independent view)."""
    (link,) = ip_json("-s", "link", "show", tap)
    rx, tx = link["stats64"]["rx"], link["stats64"]["tx"]
    return {"rx_packets": rx["packets"], "tx_packets": tx["packets"], "rx_bytes": rx["bytes"]}


async def test_stats_count_the_host_links_traffic(vm: GuestVM, spec: Nic) -> None:
    cursor = vm.console_cursor()
    await ok(*plug_args(vm, spec))
    await address_host_end(spec)
    await carrier(vm, spec, "up", cursor)
    await ping_until([*PING, "-I", spec.tap, spec.guest_ip], GUEST)
    for _ in range(5):
        await ping_until([*PING, "-I", spec.tap, spec.guest_ip], GUEST)
    before = host_counters(spec.tap)
    doc = conforms(await ok("stats", *vm_args(vm, spec), "--json"), "stats")
    after = host_counters(spec.tap)
    (nic,) = doc["interfaces"]
    assert (nic["mac"], nic["host_link"], nic["queues"], nic["link"]) == (
        spec.mac,
        spec.tap,
        1,
        "up",
    )
    got = nic["counters"]
    # the guest answered every ping: at least 6 frames each way, and what ip saw around it
    assert got["rx_packets"] >= 6
    assert got["tx_packets"] >= 6
    for name, value in before.items():
        assert value <= got[name] <= after[name], (name, before, got, after)
    assert got["rx_errors"] == got["tx_errors"] == 0
    one = conforms(await ok("stats", *vm_args(vm, spec), "--mac", spec.mac, "--json"), "stats")
    assert [n["mac"] for n in one["interfaces"]] == [spec.mac]
    table = await qmpnet("stats", *vm_args(vm, spec))
    assert "RX_PACKETS" in table.stdout
    assert spec.mac in table.stdout
    unknown = await qmpnet("stats", *vm_args(vm, spec), "--mac", "52:54:00:00:00:01")
    assert unknown.returncode == 3, unknown.stderr
    assert "52:54:00:00:00:01" in unknown.stderr
    cursor = vm.console_cursor()
    await ok("del-iface", *vm_args(vm, spec), "--mac", spec.mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)


async def test_set_link_through_qmpnetd(vm: GuestVM, spec: Nic, tmp_path: Path) -> None:
    async with await ServiceProcess.start(tmp_path / "svc") as svc:
        qmp = ["--qmp", str(vm.mgmt_qmp_path)]
        cursor = vm.console_cursor()
        args = plug_args(vm, spec)
        del args[3:5]  # the service keeps the state: no --state
        await ok(*args, env=svc.env)
        await address_host_end(spec)
        await carrier(vm, spec, "up", cursor)
        await ping_until([*PING, "-I", spec.tap, spec.guest_ip], GUEST)

        cursor = vm.console_cursor()
        changed = await ok("set-link", *qmp, "--mac", spec.mac, "down", env=svc.env)
        assert conforms(changed, "interfaceChanged")["interface"]["link"] == "down"
        await carrier(vm, spec, "down", cursor)
        await unreachable(spec)
        (entry,) = (await ok("list-ifaces", *qmp, "--json", env=svc.env))["interfaces"]
        assert entry["link"] == "down"
        before = host_counters(spec.tap)
        stats = conforms(await ok("stats", *qmp, "--json", env=svc.env), "stats")
        after = host_counters(spec.tap)
        ((nic,),) = [stats["interfaces"]]
        assert (nic["link"], nic["host_link"]) == ("down", spec.tap)
        for name, value in before.items():
            assert value <= nic["counters"][name] <= after[name], (name, before, nic, after)

        cursor = vm.console_cursor()
        await ok("set-link", *qmp, "--mac", spec.mac, "up", env=svc.env)
        await carrier(vm, spec, "up", cursor)
        await ping_until([*PING, "-I", spec.tap, spec.guest_ip], GUEST)

        cursor = vm.console_cursor()
        await ok("del-iface", *qmp, "--mac", spec.mac, env=svc.env)
        await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)
    assert svc.returncode == 0, svc.tail()


# --- announce ---------------------------------------------------------------------------------

ETH_P_RARP = 0x8035


class Rarps:
    """RARP frames arriving on the host's links (QEMU's announce-self sends one per round,
    from the NIC's MAC, into its tap), captured with an AF_PACKET socket from the moment it
    is made."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_RARP))
        self._sock.settimeout(0.2)
        self.seen: list[tuple[str, str]] = []  # (link, source MAC)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, where = self._sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((where[0], frame[6:12].hex(":")))

    def count(self, link: str, mac: str) -> int:
        return self.seen.count((link, mac))

    async def close(self, after: float) -> None:
        await asyncio.sleep(after)
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 5)
        self._sock.close()


async def test_announce_after_plug_and_link_up_for_that_nic_alone(
    vm: GuestVM, spec: Nic, tmp_path: Path
) -> None:
    # another NIC with slow rounds of its own (10, 0.3 s apart) while ours is plugged: a new
    # announce-self without its own timer id would cancel them
    other = Nic(
        mac=spec.mac[:-2] + f"{(int(spec.mac[-2:], 16) + 1) % 256:02x}",
        tap=unique("l"),
        state=spec.state,
    )
    (tmp_path / "other.json").write_text(json.dumps({"name": "eth8", "hwAddr": other.mac}))
    slow = tmp_path / "slow.toml"
    slow.write_text("[announce]\nrounds = 10\ninitial = 300\nstep = 0\nmax = 300\n")
    try:
        rarps = Rarps()
        args = plug_args(vm, other, "--config", str(slow))
        args[-1] = str(tmp_path / "other.json")
        args[args.index("--tap-name") + 1] = other.tap
        await ok(*args)
        await ok(*plug_args(vm, spec))
        await rarps.close(after=4.0)
        assert rarps.count(other.tap, other.mac) == 10, rarps.seen
        assert rarps.count(spec.tap, spec.mac) == 5, rarps.seen  # QEMU's default rounds

        await ok("set-link", *vm_args(vm, spec), "--mac", spec.mac, "down")
        rarps = Rarps()
        await ok("set-link", *vm_args(vm, spec), "--mac", spec.mac, "up", "--announce-rounds", "3")
        await rarps.close(after=2.0)
        assert rarps.count(spec.tap, spec.mac) == 3, rarps.seen
        assert rarps.count(other.tap, other.mac) == 0, rarps.seen

        await ok("set-link", *vm_args(vm, spec), "--mac", spec.mac, "down")
        rarps = Rarps()
        await ok("set-link", *vm_args(vm, spec), "--mac", spec.mac, "up", "--no-announce")
        await ok("del-iface", *vm_args(vm, other), "--mac", other.mac)
        args = plug_args(vm, other, "--no-announce")
        args[-1] = str(tmp_path / "other.json")
        args[args.index("--tap-name") + 1] = other.tap
        await ok(*args)
        await rarps.close(after=2.0)
        assert rarps.seen == [], rarps.seen
    finally:
        for nic in (spec, other):
            await qmpnet("del-iface", *vm_args(vm, nic), "--mac", nic.mac)
        del_link(other.tap)


# --- MTU ------------------------------------------------------------------------------------


def tap_mtu(tap: str) -> int:
    return int(links()[tap]["mtu"])


def saved_mtu(entry: dict[str, Any]) -> int:
    return int(entry["endpoint"]["properties"]["iface"]["mtu"])


async def test_set_mtu_lives_within_what_the_nic_offered_its_guest(
    vm: GuestVM, spec: Nic, tmp_path: Path
) -> None:
    """A NIC plugged with MTU 1400 offers it to its guest (host_mtu: the guest's driver takes
    it); its host side can go lower live, never above that (a re-plug is needed). A NIC
    plugged at 1500 offers nothing, and its host side can go up."""
    (tmp_path / "nic.json").write_text(
        json.dumps({"name": "eth9", "hwAddr": spec.mac, "mtu": 1400})
    )
    cursor = vm.console_cursor()
    await ok(*plug_args(vm, spec))
    added = await vm.wait_for(
        rf"QMPNET NIC-ADD name=\S+ mac={spec.mac} .*mtu=1400", GUEST, since=cursor
    )
    assert added
    changed = conforms(
        await ok("set-mtu", *vm_args(vm, spec), "--mac", spec.mac, "1300"), "interfaceChanged"
    )
    assert saved_mtu(changed["interface"]) == 1300
    assert tap_mtu(spec.tap) == 1300
    (entry,) = (await ok("list-ifaces", *vm_args(vm, spec), "--json"))["interfaces"]
    assert saved_mtu(entry) == 1300
    higher = await qmpnet("set-mtu", *vm_args(vm, spec), "--mac", spec.mac, "1500")
    assert higher.returncode == 7, higher.stderr
    assert "host_mtu" in higher.stderr
    assert "re-plug" in higher.stderr
    assert tap_mtu(spec.tap) == 1300  # nothing changed
    for bad, code in (("10", 3), ("70000", 3), ("many", 2)):
        done = await qmpnet("set-mtu", *vm_args(vm, spec), "--mac", spec.mac, bad)
        assert done.returncode == code, done.stderr
        assert "Traceback" not in done.stderr
    cursor = vm.console_cursor()
    await ok("del-iface", *vm_args(vm, spec), "--mac", spec.mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)

    (tmp_path / "nic.json").write_text(json.dumps({"name": "eth9", "hwAddr": spec.mac}))
    cursor = vm.console_cursor()
    await ok(*plug_args(vm, spec))
    await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={spec.mac} .*mtu=1500", GUEST, since=cursor)
    await ok("set-mtu", *vm_args(vm, spec), "--mac", spec.mac, "4000")
    assert tap_mtu(spec.tap) == 4000
    cursor = vm.console_cursor()
    await ok("del-iface", *vm_args(vm, spec), "--mac", spec.mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)


# --- bandwidth -----------------------------------------------------------------------------------

#: libvirt's kB/s for 20 and 100 Mbit/s, well under this TCG guest's 2-3 Gbit/s
SLOW, FAST = 2500, 12500
TOLERANCE = 0.15


def mbit(kbytes_per_s: int) -> float:
    return kbytes_per_s * 8 / 1000


def near(got: float, kbytes_per_s: int, what: str) -> None:
    want = mbit(kbytes_per_s)
    print(f"bandwidth {what}: {got:.1f} Mbit/s, set {want:g}")  # shown with -rP
    assert abs(got - want) <= TOLERANCE * want, f"{what}: {got:.1f} Mbit/s, set {want:g}"


async def both_ways(guest_ip: str, **where: str) -> tuple[float, float]:
    """Mbit/s the guest received and sent, iperf3 against its own server."""
    received = await throughput(guest_ip, **where)
    sent = await throughput(guest_ip, reverse=True, **where)
    return received, sent


def tc_show(what: str, dev: str, netns: str = "") -> str:
    """What ``tc [-n NETNS] WHAT show dev DEV`` prints (qdisc, class)."""
    ns = ["-n", ns_name(netns)] if netns else []
    done = subprocess.run(
        ["tc", *ns, what, "show", "dev", dev], check=True, capture_output=True, text=True
    )
    return done.stdout


def qdiscs(dev: str, netns: str = "") -> str:
    return tc_show("qdisc", dev, netns)


def ifbs_of(nic_id: str, netns: str = "") -> list[str]:
    return [n for n in links(netns) if n == "qi" + nic_id[2:]]


def nic_id(entry: dict[str, Any]) -> str:
    """The NIC's id from a list-ifaces entry's saved record (a tap's, or a NetPair's tap's)."""
    ep = entry["endpoint"]
    return str((ep.get("tap_interface") or ep["net_pair"]["tap_interface"])["id"])


async def test_bandwidth_each_way_at_two_rates_then_unlimited(vm: GuestVM, spec: Nic) -> None:
    """Model none: what the guest receives is shaped on the tap's egress, what it sends on the
    NIC's ifb; iperf3 through the NIC measures each within 15 % of what was set, at plug and
    after a live change (directions swapped, so a mix-up shows), and far more once cleared."""
    cursor = vm.console_cursor()
    await ok(*plug_args(vm, spec, "--inbound", str(SLOW), "--outbound", str(FAST)))
    await address_host_end(spec)
    await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={spec.mac}", GUEST, since=cursor)
    await ping_until([*PING, "-I", spec.tap, spec.guest_ip], GUEST)
    (entry,) = (await ok("list-ifaces", *vm_args(vm, spec), "--json"))["interfaces"]
    ident = nic_id(entry)
    assert entry["bandwidth"] == {"inbound": {"average": SLOW}, "outbound": {"average": FAST}}
    assert "qdisc htb 7171: root" in qdiscs(spec.tap)
    assert "qdisc ingress ffff:" in qdiscs(spec.tap)
    assert ifbs_of(ident) == ["qi" + ident[2:]]

    received, sent = await both_ways(spec.guest_ip, bind_dev=spec.tap)
    near(received, SLOW, "guest inbound at plug")
    near(sent, FAST, "guest outbound at plug")

    changed = conforms(
        await ok(
            "set-bandwidth",
            *vm_args(vm, spec),
            "--mac",
            spec.mac,
            "--bandwidth",
            json.dumps({"inbound": {"average": FAST}, "outbound": {"average": SLOW, "burst": 32}}),
        ),
        "interfaceChanged",
    )
    assert changed["interface"]["bandwidth"]["outbound"] == {"average": SLOW, "burst": 32}
    received, sent = await both_ways(spec.guest_ip, bind_dev=spec.tap)
    near(received, FAST, "guest inbound after set-bandwidth")
    near(sent, SLOW, "guest outbound after set-bandwidth")
    doc = conforms(await ok("stats", *vm_args(vm, spec), "--json"), "stats")
    assert doc["interfaces"][0]["bandwidth"]["inbound"] == {"average": FAST}

    await ok("set-bandwidth", *vm_args(vm, spec), "--mac", spec.mac, "--clear")
    assert "htb" not in qdiscs(spec.tap)
    assert "ingress" not in qdiscs(spec.tap)
    assert ifbs_of(ident) == []
    received, sent = await both_ways(spec.guest_ip, bind_dev=spec.tap)
    # unlimited: the TCG guest's own ceiling, far above either rate set before
    print(f"bandwidth cleared: guest inbound {received:.0f}, outbound {sent:.0f} Mbit/s")
    assert received > 1.5 * mbit(FAST), received
    assert sent > 1.5 * mbit(FAST), sent
    (entry,) = (await ok("list-ifaces", *vm_args(vm, spec), "--json"))["interfaces"]
    assert entry["bandwidth"] is None

    await ok("set-bandwidth", *vm_args(vm, spec), "--mac", spec.mac, "--outbound", str(SLOW))
    assert ifbs_of(ident)
    cursor = vm.console_cursor()
    await ok("del-iface", *vm_args(vm, spec), "--mac", spec.mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)
    assert ifbs_of(ident) == [], "the NIC's ifb outlived it"


async def test_bad_bandwidth_is_refused_and_changes_nothing(vm: GuestVM, spec: Nic) -> None:
    bad_plugs = (
        (["--inbound", "0"], 3, "--inbound average"),
        (["--outbound", "-5"], 3, "--outbound"),
        (["--inbound", "99999999999"], 3, "12500000 kB/s"),
        (["--inbound", "100,50"], 3, "--inbound peak"),
        (["--bandwidth", '{"inbound": {"average": 100}}', "--inbound", "5"], 3, "not both"),
        (["--bandwidth", '{"inbound": {"floor": 100}}'], 3, "bandwidth.inbound"),
    )
    for args, code, text in bad_plugs:
        done = await qmpnet(*plug_args(vm, spec, *args))
        assert done.returncode == code, (args, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert spec.tap not in links(), "a refused plug made its tap"
    await ok(*plug_args(vm, spec, "--inbound", str(SLOW)))
    for args, code, text in (
        (["--mac", spec.mac, "--inbound", "0"], 3, "--inbound average"),
        (["--mac", spec.mac], 3, "--clear"),
        (["--mac", spec.mac, "--clear", "--inbound", "5"], 3, "--clear"),
        (["--mac", "52:54:00:00:00:01", "--inbound", "5"], 3, "52:54:00:00:00:01"),
    ):
        done = await qmpnet("set-bandwidth", *vm_args(vm, spec), *args)
        assert done.returncode == code, (args, done.stderr)
        assert text in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert "rate 20Mbit" in tc_show("class", spec.tap)
    (entry,) = (await ok("list-ifaces", *vm_args(vm, spec), "--json"))["interfaces"]
    assert entry["bandwidth"] == {"inbound": {"average": SLOW}}
    cursor = vm.console_cursor()
    await ok("del-iface", *vm_args(vm, spec), "--mac", spec.mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)


@pytest.mark.parametrize("model", ["tcfilter", "bridged", "macvtap"])
async def test_bandwidth_of_a_netpair_from_the_pods_far_end(
    vm: GuestVM, make_netns: Any, tmp_path: Path, model: str
) -> None:
    """Each NetPair model shapes where its frames really pass (tcfilter: the sandbox link's
    egress; bridged: the tap's ingress through the ifb; macvtap: the macvtap's egress, and its
    ingress through the ifb); measured from the far end of the pod's veth, and nothing of it
    is left on the pod's link after the unplug."""
    sandbox, far = make_netns(), make_netns()
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:"
    mac += f"{free_link_local_byte():02x}"
    pair = cni_veth(sandbox, far, mac)
    state = ["--qmp", str(vm.mgmt_qmp_path), "--state", str(tmp_path / "state")]
    (tmp_path / "nic.json").write_text(json.dumps({"name": pair.inner, "hwAddr": mac}))
    cursor = vm.console_cursor()
    await ok(
        "add-iface",
        *state,
        "--model",
        model,
        "--netns",
        sandbox,
        "--queues",
        "1",
        "--inbound",
        str(FAST),
        "--outbound",
        str(SLOW),
        str(tmp_path / "nic.json"),
    )
    await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}", GUEST, since=cursor)
    await ping_until(["ip", "netns", "exec", ns_name(far), *PING, guest_ip_for_mac(mac)], GUEST)
    received, sent = await both_ways(guest_ip_for_mac(mac), netns=far)
    near(received, FAST, f"{model}: guest inbound")
    near(sent, SLOW, f"{model}: guest outbound")
    (entry,) = (await ok("list-ifaces", *state, "--json"))["interfaces"]
    cursor = vm.console_cursor()
    await ok("del-iface", *state, "--mac", mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={mac}", GUEST, since=cursor)
    left = qdiscs(pair.inner, sandbox)
    assert "htb" not in left, left
    assert "ingress" not in left, left
    assert ifbs_of(nic_id(entry), sandbox) == []


async def test_set_bandwidth_through_qmpnetd(vm: GuestVM, spec: Nic, tmp_path: Path) -> None:
    """The service reads the same options as the direct mode (its clients send them as
    given), shapes the same way, and refuses the same bad input."""
    async with await ServiceProcess.start(tmp_path / "svc") as svc:
        qmp = ["--qmp", str(vm.mgmt_qmp_path)]
        cursor = vm.console_cursor()
        args = plug_args(vm, spec, "--inbound", str(SLOW))
        del args[3:5]  # the service keeps the state: no --state
        await ok(*args, env=svc.env)
        await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={spec.mac}", GUEST, since=cursor)
        assert "rate 20Mbit" in tc_show("class", spec.tap)
        (entry,) = (await ok("list-ifaces", *qmp, "--json", env=svc.env))["interfaces"]
        ident = nic_id(entry)
        assert ifbs_of(ident) == []

        changed = await ok(
            "set-bandwidth",
            *qmp,
            "--mac",
            spec.mac,
            "--outbound",
            f"{FAST},{2 * FAST},128",
            env=svc.env,
        )
        view = conforms(changed, "interfaceChanged")["interface"]["bandwidth"]
        assert view == {"outbound": {"average": FAST, "peak": 2 * FAST, "burst": 128}}
        assert "htb" not in qdiscs(spec.tap)
        shown = tc_show("class", "qi" + ident[2:])
        assert "rate 100Mbit ceil 200Mbit burst " in shown
        # tc prints the burst back from htb's ticks: 128 kB within a tick's rounding
        burst = re.search(r" burst (\d+)b ", shown)
        assert burst, shown
        assert abs(int(burst.group(1)) - 128 * 1024) < 128, shown
        stats = conforms(await ok("stats", *qmp, "--json", env=svc.env), "stats")
        assert stats["interfaces"][0]["bandwidth"] == view

        bad = await qmpnet("set-bandwidth", *qmp, "--mac", spec.mac, "--inbound", "0", env=svc.env)
        assert bad.returncode == 3, bad.stderr
        assert "--inbound average" in bad.stderr
        assert ifbs_of(ident)  # unchanged

        await ok("set-bandwidth", *qmp, "--mac", spec.mac, "--clear", env=svc.env)
        assert ifbs_of(ident) == []
        cursor = vm.console_cursor()
        await ok("del-iface", *qmp, "--mac", spec.mac, env=svc.env)
        await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={spec.mac}", GUEST, since=cursor)
    assert svc.returncode == 0, svc.tail()


# --- rx-filter trust (macvtap) -------------------------------------------------------------------


def macvtap_view(netns: str, name: str) -> tuple[str, set[str]]:
    """The macvtap's MAC and its link-layer multicast groups, as ``ip`` shows them."""
    (link,) = ip_json("link", "show", "dev", name, netns=netns)
    done = subprocess.run(
        ["ip", "-n", ns_name(netns), "maddr", "show", "dev", name],
        check=True,
        capture_output=True,
        text=True,
    )
    groups = set(re.findall(r"link\s+([0-9a-f:]{17})", done.stdout))
    return str(link["address"]), groups


async def answers(far: str, *ping: str, tries: int = 3) -> bool:
    """Whether a ping from the pod's far end gets an answer (a few tries, no waiting long)."""
    for _ in range(tries):
        done = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns_name(far), *ping, stdout=subprocess.DEVNULL
        )
        if await done.wait() == 0:
            return True
    return False


async def test_a_trusted_guest_changes_its_mac_and_joins_a_group_and_the_macvtap_follows(
    vm: GuestVM, make_netns: Any, tmp_path: Path
) -> None:
    """macvtap passes only frames for its MAC and its multicast list: a guest that takes a new
    MAC, or an IPv6 address (whose solicited-node group its NDP needs), is unreachable behind
    it, unless qmpnetd mirrors the guest's receive filter (``--trust-guest-rx-filters``), which
    it does on QEMU's NIC_RX_FILTER_CHANGED. The same steps run untrusted first, as the
    control. The direct mode refuses trust (exit 7: nothing there would hear QEMU)."""
    sandbox, far = make_netns(), make_netns()
    b = free_link_local_byte()
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    new_mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    pair = cni_veth(sandbox, far, mac)
    guest_ip = guest_ip_for_mac(mac)
    ula = f"fd00::{b:x}:2"
    await asyncio.to_thread(
        subprocess.run,
        ["ip", "-n", ns_name(far), "addr", "add", f"fd00::{b:x}:1/64", "dev", pair.outer, "nodad"],
        check=True,
    )
    (tmp_path / "nic.json").write_text(json.dumps({"name": pair.inner, "hwAddr": mac}))
    plug = [
        "add-iface", "--qmp", str(vm.mgmt_qmp_path), "--model", "macvtap", "--netns", sandbox,
        "--queues", "1",
    ]  # fmt: skip
    nic = str(tmp_path / "nic.json")

    direct = await qmpnet(
        *plug, "--state", str(tmp_path / "direct"), "--trust-guest-rx-filters", nic
    )
    assert direct.returncode == 7, direct.stderr
    assert "qmpnetd" in direct.stderr
    assert set(links(sandbox)) == {"lo", pair.inner}, "a refused plug left something"

    async with await ServiceProcess.start(tmp_path / "svc") as svc:
        for trusted in (False, True):
            cursor = vm.console_cursor()
            extra = ["--trust-guest-rx-filters"] if trusted else []
            await ok(*plug, *extra, nic, env=svc.env)
            await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}", GUEST, since=cursor)
            await ping_until(["ip", "netns", "exec", ns_name(far), *PING, guest_ip], GUEST)
            (entry,) = (await ok("list-ifaces", "--qmp", str(vm.mgmt_qmp_path), "--json",
                                 env=svc.env))["interfaces"]  # fmt: skip
            assert entry.get("trust_rx_filters", False) is trusted
            macvtap = entry["host_link"]

            # the guest takes another MAC: QEMU's filter follows, and the macvtap if trusted
            assert await vm.guest_ip(mac, "link", "set", "dev", "{dev}", "address", new_mac) == 0
            if trusted:
                await until_macvtap(sandbox, macvtap, new_mac, None)
            else:
                assert macvtap_view(sandbox, macvtap)[0] == mac
            await asyncio.to_thread(
                subprocess.run,
                ["ip", "-n", ns_name(far), "neigh", "flush", "dev", pair.outer],
                check=True,
            )
            reached = await answers(far, *PING, guest_ip)
            assert reached is trusted, f"trusted={trusted}: ping to the new MAC answered={reached}"

            # the guest takes an IPv6 address: its solicited-node group joins its filter
            assert await vm.guest_ip(mac, "-6", "addr", "add", f"{ula}/64", "dev", "{dev}") == 0
            solicited = f"33:33:ff:{b:02x}:00:02"  # ff02::1:ff<low 24 bits of {ula}>
            if trusted:
                await until_macvtap(sandbox, macvtap, None, solicited)
                # the group, not promiscuity, lets the NDP through
                (shown,) = ip_json("link", "show", "dev", macvtap, netns=sandbox)
                assert "PROMISC" not in shown["flags"], shown["flags"]
            reached = await answers(far, "busybox", "ping6", "-c", "1", "-W", "1", ula, tries=4)
            assert reached is trusted, (
                f"trusted={trusted}: ping6 via {solicited} answered={reached}"
            )

            cursor = vm.console_cursor()
            await ok("del-iface", "--qmp", str(vm.mgmt_qmp_path), "--mac", mac, env=svc.env)
            await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={mac}", GUEST, since=cursor)
            assert set(links(sandbox)) == {"lo", pair.inner}
    assert svc.returncode == 0, svc.tail()


async def until_macvtap(
    netns: str, name: str, mac: str | None, group: str | None, timeout: float = 20.0
) -> None:
    """Until ``ip`` shows the macvtap with ``mac`` and in ``group`` (each if given)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        have, groups = macvtap_view(netns, name)
        if (mac is None or have == mac) and (group is None or group in groups):
            return
        assert asyncio.get_running_loop().time() < deadline, (mac, group, have, groups)
        await asyncio.sleep(0.1)


async def test_a_kept_library_session_mirrors_a_trusted_guests_filter_while_open(
    vm: GuestVM, make_netns: Any, tmp_path: Path
) -> None:
    """The library's own resident listener: ``NetworkState.connect()`` hears the guest's
    filter changes while the session is open, and nothing after ``close()``; without a kept
    session trust is refused before anything is made."""
    sandbox, far = make_netns(), make_netns()
    b = free_link_local_byte()
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    pair = cni_veth(sandbox, far, mac)
    state = NetworkState.open(tmp_path / "lib", str(vm.mgmt_qmp_path))
    desc = InterfaceDescription(name=pair.inner, hw_addr=mac)
    plug = {"model": InterworkingModel.MACVTAP, "netns_path": sandbox, "queues": 1}
    with pytest.raises(UnsupportedError, match="resident listener"):
        await state.add_interface(desc, trust_rx_filters=True, **plug)
    assert set(links(sandbox)) == {"lo", pair.inner}
    await state.connect()
    try:
        cursor = vm.console_cursor()
        ep = await state.add_interface(desc, trust_rx_filters=True, **plug)
        await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}", GUEST, since=cursor)
        first = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
        assert await vm.guest_ip(mac, "link", "set", "dev", "{dev}", "address", first) == 0
        await until_macvtap(sandbox, ep.host_link, first, None)
    finally:
        await state.close()
    later = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    assert await vm.guest_ip(mac, "link", "set", "dev", "{dev}", "address", later) == 0
    await asyncio.sleep(1.0)  # nothing listens now: the macvtap keeps what it had
    assert macvtap_view(sandbox, ep.host_link)[0] == first
    cursor = vm.console_cursor()
    await state.remove_interface(mac)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={mac}", GUEST, since=cursor)
    assert set(links(sandbox)) == {"lo", pair.inner}
