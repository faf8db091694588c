"""The ``qmpnet`` console script, run as a user runs it: a subprocess against a real QEMU.

What the command did is checked independently: the guest's serial markers, QEMU's *first*
monitor (the one a VM manager holds; qmpnet is given the second), ``ip -j`` on the host.
Every error case asserts the documented exit code, one line on stderr naming field and
value, no traceback, and nothing left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from qmpnet.qmp import connect_clean
from qmpnet.testing.cli import run_qmpnet
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.output import conforms
from qmpnet.testing.probe import links
from qmpnet.testing.scene import RUN, unique
from qmpnet.testing.vm import GuestVM, marker_fields

pytestmark = pytest.mark.asyncio(loop_scope="module")

MARKER_TIMEOUT = 60.0


def mac(last: int) -> str:
    return f"52:54:00:c1:{os.getpid() % 256:02x}:{last:02x}"


qmpnet = run_qmpnet  # the kit's, under the name this module's tests call


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """The documented error shape: a single ``qmpnet: error:`` line, never a traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("qmpnet: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


class Monitor:
    """QEMU's first monitor: the VM manager's view, independent of qmpnet's session."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls, path: Path) -> Monitor:
        client = QMPClient("manager")
        await connect_clean(client, str(path))
        return cls(client)

    async def peripherals(self) -> set[str]:
        reply: Any = await self.client.execute("qom-list", {"path": "/machine/peripheral"})
        return {c["name"] for c in reply}

    async def driver_ok(self, device: str) -> bool:
        reply: Any = await self.client.execute(
            "x-query-virtio-status", {"path": f"/machine/peripheral/{device}/virtio-backend"}
        )
        return any("DRIVER_OK" in s for s in reply["status"].get("statuses", []))


vm = module_vm("cli")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def monitor(vm: GuestVM) -> AsyncIterator[Monitor]:
    mon = await Monitor.connect(vm.qmp_path)
    try:
        yield mon
    finally:
        await mon.client.disconnect()


@pytest.fixture
def iface(tmp_path: Path, host_link_names: Any) -> tuple[Path, str, str]:
    """An interface JSON file for a tap endpoint, its MAC and its (prefixed) tap name."""
    address = mac(0x41)
    path = tmp_path / "eth.json"
    path.write_text(json.dumps({"name": "eth9", "hwAddr": address, "mtu": 1400}))
    return path, address, host_link_names("c")


async def test_add_list_del_round_trip(
    vm: GuestVM, monitor: Monitor, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, address, tap = iface
    cursor = vm.console_cursor()
    added = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "--queues",
        "2",
        "--tap-name",
        tap,
        str(path),
    )
    assert added.returncode == 0, added.stderr
    out = conforms(json.loads(added.stdout), "interface")
    assert out["hwAddr"] == address
    assert out["pciPath"]
    assert out["mtu"] == 1400
    seen = marker_fields(
        await vm.wait_for(rf"QMPNET NIC-ADD .*mac={address}", MARKER_TIMEOUT, since=cursor)
    )
    assert seen["rxq"] == "2"
    assert links()[tap]["mtu"] == 1400

    table = await qmpnet("list-ifaces", "--state", str(state_dir))
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if address in line)
    assert tap in row
    assert "plugged" in row
    assert out["pciPath"] in row
    listed = json.loads((await qmpnet("list-ifaces", "--state", str(state_dir), "--json")).stdout)
    (entry,) = conforms(listed, "interfaceList")["interfaces"]
    assert (entry["mac"], entry["host_link"], entry["status"]) == (address, tap, "plugged")
    assert entry["pci_path"] == out["pciPath"]
    device = entry["endpoint"]["tap_interface"]["id"] + "-dev"
    assert device in await monitor.peripherals()

    cursor = vm.console_cursor()
    removed = await qmpnet(
        "del-iface", "--qmp", str(vm.mgmt_qmp_path), "--state", str(state_dir), "--mac", address
    )
    assert removed.returncode == 0, removed.stderr
    await vm.wait_for(rf"QMPNET NIC-DEL .*mac={address}", MARKER_TIMEOUT, since=cursor)
    assert device not in await monitor.peripherals()
    assert tap not in links()
    assert (
        json.loads((await qmpnet("list-ifaces", "--state", str(state_dir), "--json")).stdout)[
            "interfaces"
        ]
        == []
    )


async def test_wait_guest_returns_after_driver_ok(
    vm: GuestVM, monitor: Monitor, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, address, tap = iface
    added = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "--tap-name",
        tap,
        "--wait-guest",
        str(path),
    )
    assert added.returncode == 0, added.stderr
    listed = json.loads((await qmpnet("list-ifaces", "--state", str(state_dir), "--json")).stdout)
    device = listed["interfaces"][0]["endpoint"]["tap_interface"]["id"] + "-dev"
    # Asked on the manager's monitor right after the command returned.
    assert await monitor.driver_ok(device)
    removed = await qmpnet(
        "del-iface", "--qmp", str(vm.mgmt_qmp_path), "--state", str(state_dir), "--mac", address
    )
    assert removed.returncode == 0, removed.stderr


async def test_stdin_and_json_logs(
    vm: GuestVM, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, tap = iface
    added = await qmpnet(
        "-vv",
        "--log-format",
        "json",
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "--tap-name",
        tap,
        "-",
        stdin=path.read_text(),
    )
    assert added.returncode == 0, added.stderr
    records = [json.loads(line) for line in added.stderr.splitlines() if line.strip()]
    messages = [r["msg"] for r in records]
    assert all({"time", "level", "logger", "msg"} <= set(r) for r in records)
    # -vv shows the QMP traffic as --> / <-- lines.
    assert any(m.startswith("--> netdev_add") for m in messages)
    assert any(m.startswith("<-- device_add") for m in messages)
    # each record of the plug says which VM and NIC, and the QMP lines which step
    _, mac, _ = iface
    netdev = next(r for r in records if r["msg"].startswith("--> netdev_add"))
    assert (netdev["vm"], netdev["mac"], netdev["step"]) == (
        str(vm.mgmt_qmp_path),
        mac,
        "netdev-add",
    )
    device = next(r for r in records if r["msg"].startswith("--> device_add"))
    assert device["step"] == "device-add"
    removed = await qmpnet(
        "del-iface", "--qmp", str(vm.mgmt_qmp_path), "--state", str(state_dir), str(path)
    )  # the file's hwAddr selects it
    assert removed.returncode == 0, removed.stderr


@pytest.mark.parametrize(
    ("document", "needles"),
    [
        ("{not json", ["interface file", "not valid JSON"]),
        ('{"name": "eth0", "hwAddr": "01:00:5e:00:00:01"}', ["hwAddr", "unicast"]),
        ('{"name": "a-very-long-name-x"}', ["name", "IFNAMSIZ"]),
        ('{"name": "eth0", "mtu": 70000}', ["mtu", "70000"]),
        (
            '{"name": "eth0", "IPAddresses": [{"family": 4, "address": "169.254.1.300", '
            '"mask": "24"}]}',
            ["address", "169.254.1.300"],
        ),
        ('{"name": "eth0", "colour": "blue"}', ["colour", "unknown key"]),
    ],
)
async def test_bad_input_exit_3(
    vm: GuestVM, state_dir: Path, document: str, needles: list[str]
) -> None:
    proc = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "-",
        stdin=document,
    )
    assert proc.returncode == 3
    one_line_error(proc, *needles)
    assert "tap0_kata" not in links()  # the name the first tap of this state would take
    assert not (state_dir / "state.json").exists()


async def test_socket_errors_exit_4(
    tmp_path: Path, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, tap = iface
    regular = tmp_path / "not-a-socket"
    regular.write_text("")
    cases = ((regular, "not a unix socket"), (tmp_path / "missing", "no such socket"))
    for target, needle in cases:
        proc = await qmpnet(
            "add-iface",
            "--qmp",
            str(target),
            "--state",
            str(state_dir),
            "--model",
            "none",
            "--tap-name",
            tap,
            str(path),
        )
        assert proc.returncode == 4
        one_line_error(proc, str(target), needle)
        assert tap not in links()


async def test_existing_link_exit_5_and_untouched(
    vm: GuestVM, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, tap = iface
    await asyncio.to_thread(
        subprocess.run, ["ip", "link", "add", tap, "mtu", "1280", "type", "bridge"], check=True
    )
    before = links()[tap]
    proc = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "--tap-name",
        tap,
        str(path),
    )
    assert proc.returncode == 5
    one_line_error(proc, tap, "already exists")
    after = links()[tap]
    assert (after["mtu"], after["address"], after.get("ifalias")) == (
        before["mtu"],
        before["address"],
        before.get("ifalias"),
    )


async def test_unsupported_model_from_config_exit_7(
    vm: GuestVM, state_dir: Path, tmp_path: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, _ = iface
    config = tmp_path / "qmpnet.toml"
    config.write_text('[network]\ninternetworking_model = "enlightened"\n')
    proc = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--config",
        str(config),
        str(path),
    )
    assert proc.returncode == 7
    one_line_error(proc, "enlightened", "no defined plumbing")


async def test_bad_config_file_exit_3(
    vm: GuestVM, state_dir: Path, tmp_path: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, _ = iface
    config = tmp_path / "qmpnet.toml"
    config.write_text("queues = 0.5\n")
    proc = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--config",
        str(config),
        str(path),
    )
    assert proc.returncode == 3
    one_line_error(proc, "queues", "0.5")


async def test_corrupt_state_exit_8(
    vm: GuestVM, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, tap = iface
    await asyncio.to_thread(state_dir.mkdir, mode=0o700)
    await asyncio.to_thread((state_dir / "state.json").write_text, "{ half a file")
    proc = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "--tap-name",
        tap,
        str(path),
    )
    assert proc.returncode == 8
    one_line_error(proc, "state.json", "not valid JSON")
    assert tap not in links()
    assert (state_dir / "state.json").read_text() == "{ half a file"  # never overwritten


async def test_usage_exit_2_and_debug_traceback(vm: GuestVM, state_dir: Path) -> None:
    usage = await qmpnet("add-iface", "--queues", "0", "x.json")
    assert usage.returncode == 2
    plain = await qmpnet(
        "add-iface", "--qmp", str(vm.mgmt_qmp_path), "--state", str(state_dir), "-", stdin="[]"
    )
    debug = await qmpnet(
        "--debug",
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "-",
        stdin="[]",
    )
    assert plain.returncode == debug.returncode == 3
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr
    assert "InvalidInputError" in debug.stderr


async def test_help_imports_no_driver_machinery() -> None:
    """Start-up stays fast: --help and parsing import neither QMP nor netlink code."""
    code = (
        "import sys; from qmpnet import cli; cli.build_parser().parse_args(['list-ifaces', "
        "'--state', '/nonexistent']); print(sorted(m for m in sys.modules if m.startswith("
        "('qemu', 'pyroute2', 'cattrs', 'qmpnet.network'))))"
    )
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]"


@pytest_asyncio.fixture(loop_scope="module")
async def paused(guest_image: GuestImage, tmp_path: Path) -> AsyncIterator[GuestVM]:
    machine = await GuestVM.start(
        guest_image, tmp_path, paused=True, root_ports=2, name=f"{RUN}-clip"
    )
    try:
        yield machine
    finally:
        await machine.stop()


async def test_pending_unplug_exit_6_then_reconcile(
    paused: GuestVM, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, address, tap = iface
    base = ["--qmp", str(paused.mgmt_qmp_path), "--state", str(state_dir)]
    added = await qmpnet("add-iface", *base, "--model", "none", "--tap-name", tap, str(path))
    assert added.returncode == 0, added.stderr
    removed = await qmpnet("del-iface", *base, "--timeout-unplug", "1", "--mac", address)
    assert removed.returncode == 6
    one_line_error(removed, "DEVICE_DELETED", "pending")
    row = next(
        line
        for line in (await qmpnet("list-ifaces", "--state", str(state_dir))).stdout.splitlines()
        if address in line
    )
    assert "unplug-pending" in row

    # The guest never runs: reconcile keeps the entry pending, in JSON for machines.
    report = await qmpnet("reconcile", *base, "--timeout-unplug", "1", "--json")
    assert report.returncode == 0, report.stderr
    outcomes = {a["outcome"] for a in conforms(json.loads(report.stdout), "reconcile")["actions"]}
    assert outcomes == {"pending-kept"}

    # QEMU gone: reconcile drops the entry and the tap QEMU held goes with the process.
    await paused.stop()
    report = await qmpnet("reconcile", *base)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "QEMU gone" in report.stdout
    assert "dropped-qemu-gone" in report.stdout
    assert (
        json.loads((await qmpnet("list-ifaces", "--state", str(state_dir), "--json")).stdout)[
            "interfaces"
        ]
        == []
    )
    assert tap not in links()
    again = await qmpnet(
        "add-iface", *base, "--model", "none", "--tap-name", unique("c"), str(path)
    )
    assert again.returncode == 4  # fails fast, and says why
    one_line_error(again, "no such socket", "QEMU is not running")


def _state_root() -> set[str]:
    """What the default state root holds now (no state dir given: one per socket)."""
    root = "/run/qmpnet"
    return set(os.listdir(root)) if os.path.isdir(root) else set()


async def test_a_mistyped_socket_leaves_no_state_directory(tmp_path: Path) -> None:
    """Without --state the directory is derived from the socket: a typo must fail with
    exit 4 (not 3, not an empty list) and create nothing under the state root."""
    typo = tmp_path / "no-such-vm.sock"
    before = _state_root()
    for args in (
        ("del-iface", "--qmp", str(typo), "--mac", "52:54:00:12:34:56"),
        ("list-ifaces", "--qmp", str(typo)),
        ("reconcile", "--qmp", str(typo)),
    ):
        proc = await qmpnet(*args)
        assert proc.returncode == 4, (args, proc.stderr)
        one_line_error(proc, "no such socket")
    assert _state_root() == before
    watch = await qmpnet(
        "watch", "--qmp", str(typo), "--state", str(tmp_path / "st"), "--netns", "/run/netns/none"
    )
    assert watch.returncode == 4
    one_line_error(watch, "no such socket")


async def test_no_vm_given_is_usage_and_json_errors_are_json(
    tmp_path: Path, state_dir: Path
) -> None:
    proc = await qmpnet("list-ifaces", env={"QMPNET_STATE_DIR": ""})
    assert proc.returncode == 2
    assert "give --state DIR or --qmp SOCKET" in proc.stderr
    bad = await qmpnet(
        "--log-format",
        "json",
        "add-iface",
        "--qmp",
        str(tmp_path / "x.sock"),
        "--state",
        str(state_dir),
        "-",
        stdin='{"name": "eth0", "mtu": 1}',
    )
    assert bad.returncode == 3
    (line,) = bad.stderr.splitlines()
    doc = json.loads(line)
    assert (doc["level"], doc["exit"]) == ("error", 3)
    assert "mtu" in doc["msg"]
    # the final error line has the shape of every other record
    assert {"time", "level", "logger", "msg", "error", "exit"} <= set(doc)
    assert doc["vm"] == str(tmp_path / "x.sock")


async def test_queues_out_of_range_fail_before_anything_is_made(
    vm: GuestVM, state_dir: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, tap = iface
    proc = await qmpnet(
        "add-iface",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--model",
        "none",
        "--tap-name",
        tap,
        "--queues",
        "300",
        str(path),
    )
    assert proc.returncode == 3
    one_line_error(proc, "queues", "300")
    assert "step" not in proc.stderr  # refused before the hot-plug started
    assert tap not in links()


async def test_reconcile_of_a_vm_that_is_gone_removes_its_state_directory(
    guest_image: GuestImage, tmp_path: Path, iface: tuple[Path, str, str]
) -> None:
    path, _, tap = iface
    state = tmp_path / "state"
    gone = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2, name=f"{RUN}-gone")
    try:
        added = await qmpnet(
            "add-iface",
            "--qmp",
            str(gone.mgmt_qmp_path),
            "--state",
            str(state),
            "--model",
            "none",
            "--tap-name",
            tap,
            str(path),
        )
        assert added.returncode == 0, added.stderr
    finally:
        await gone.stop()
    proc = await qmpnet("reconcile", "--qmp", str(gone.mgmt_qmp_path), "--state", str(state))
    assert proc.returncode == 0, proc.stderr
    assert "gone" in proc.stdout
    assert not state.exists()
    assert tap not in links()
