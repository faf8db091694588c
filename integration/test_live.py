"""Live control of a plugged NIC, seen from the guest: its link (``set-link``, ``--link`` at
plug, reconcile setting it again), in the direct mode and through qmpnetd.

The guest reports its NIC's carrier on the console (``CARRIER`` markers); traffic is a ping
from the host end of the tap to the guest's own address; QEMU's first monitor (the VM
manager's) stands for someone else changing the link behind qmpnet's back.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio

from qmpnet.testing.cli import run_qmpnet
from qmpnet.testing.cni import free_link_local_byte, ping_until
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.output import conforms
from qmpnet.testing.probe import ip_json, links, monitor_command
from qmpnet.testing.scene import del_link, unique
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
