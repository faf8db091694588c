"""Crash safety: kill -9 the driver at every step, reconcile, and the three views agree.

A driver process (``crash_driver.py``) adds or removes a NIC of a running guest and SIGKILLs
itself when the operation reaches a named step (at its begin or once it is done). A reconcile
then runs here and must leave QEMU (QOM, query-pci, ``info network``, named fds, its tun fds),
the host (``ip -j link``, ``tc -j qdisc``) and the saved state telling the same story: an
interrupted hot-plug rolled back (unless it was persisted), an interrupted unplug completed.

The second part kills QEMU itself: every operation then fails at once with a clear
QmpConnectError, and reconcile cleans the host side of every NIC the VM had.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from crash_driver import command

from qmpnet.bandwidth import Bandwidth
from qmpnet.config import Config, Timeouts
from qmpnet.errors import QmpConnectError
from qmpnet.marks import claimed_owner
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.reconcile import OUR_QEMU_ID, Outcome, reconcile
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.probe import (
    has_ingress,
    held_fd_names,
    journal_file,
    marked_links,
    qdiscs,
    qemu_view,
    saved_ids,
    tun_count,
)
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.scene import RUN, make_sandbox
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

QUEUES = 2
PLUG_STEPS = [
    "validate",
    "open-queues",
    "prepare-links",
    "shape",
    "pass-fds",
    "netdev-add",
    "device-add",
    "wait-guest",
    "persist",
]
UNPLUG_STEPS = ["device-del", "netdev-del", "remove-links", "forget"]
#: Steps that change nothing: a kill there leaves no journal record at all.
BEFORE_THE_PLAN = {"validate"}
#: The step whose BEGIN writes the operation's one journal record (the plan).
FIRST_JOURNALED = {
    ("add", "tcfilter"): "open-queues",
    ("add", "macvtap"): "prepare-links",
    ("add", "none"): "open-queues",
    ("remove", "tcfilter"): "device-del",
    ("remove", "macvtap"): "device-del",
    ("remove", "none"): "device-del",
}
# /dev/vhost-net is missing on the test hosts, so open-vhost never runs (test_faults says so).

CASES = (
    [("add", "tcfilter", s, p) for s in PLUG_STEPS for p in ("begin", "done")]
    + [("remove", "tcfilter", s, p) for s in UNPLUG_STEPS for p in ("begin", "done")]
    + [
        ("add", "macvtap", s, "done")
        for s in ("prepare-links", "open-queues", "shape", "device-add")
    ]
    + [("remove", "macvtap", "device-del", "done"), ("remove", "macvtap", "remove-links", "begin")]
    + [("add", "none", s, "done") for s in ("open-queues", "shape", "pass-fds", "device-add")]
    + [("remove", "none", "netdev-del", "done")]
)


vm = module_vm("crash")

#: every NIC here is shaped both ways, so a crash at any step leaves shaping to settle too
SHAPED = {"inbound": {"average": 12500}, "outbound": {"average": 2500}}


def _config() -> Config:
    return Config(
        tap_name=f"{RUN}k{{idx}}", queues=QUEUES, timeouts=Timeouts(unplug=20.0, connect=30.0)
    )


async def _driver(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *command(*args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _ours(names: frozenset[str]) -> set[str]:
    return {m.group(1) for m in map(OUR_QEMU_ID.fullmatch, names) if m}


async def assert_views_agree(
    vm: GuestVM,
    state_dir: Path,
    netns: str,
    virt: str,
    model: str,
    tun_before: int,
    ours: set[str],
    *,
    shaped: bool = False,
) -> dict[str, str]:
    """QEMU, the host and the state file list the same NICs of this test, and nothing else.

    ``ours``: the endpoint ids this test made (the VM and the host netns are shared);
    ``shaped``: they were plugged with a bandwidth (tcfilter's htb is on the sandbox link).
    """
    saved = saved_ids(state_dir)
    assert journal_file(state_dir) is None, "the journal must be settled"
    view = await qemu_view(vm.qmp_path)
    plugged = {i for i, status in saved.items() if status == "plugged"}
    assert set(saved) == plugged, f"nothing may stay pending here: {saved}"
    assert _ours(view.devices) & ours == plugged, f"QOM {view.devices} vs state {plugged}"
    assert _ours(view.pci_devices) & ours <= plugged, f"query-pci {view.pci_devices}"
    assert _ours(view.netdevs) & ours == plugged, f"info network {view.netdevs} vs {plugged}"
    owners = {claimed_owner(alias) for alias in marked_links(netns).values()}
    assert owners & ours == plugged, f"marked links {owners} vs state {plugged}"
    if virt:
        assert has_ingress(netns, virt) == bool(plugged and model == "tcfilter")
        # tcfilter shapes what the guest sends on the sandbox link's egress
        htb = any(q.get("kind") == "htb" for q in qdiscs(netns, virt))
        assert htb == bool(shaped and plugged and model == "tcfilter"), qdiscs(netns, virt)
    per_nic = 0 if model == "macvtap" else QUEUES
    assert tun_count(vm.pid) == tun_before + per_nic * len(plugged)
    return saved


@pytest.mark.parametrize(
    ("op", "model", "step", "phase"), CASES, ids=[f"{o}-{m}-{s}-{p}" for o, m, s, p in CASES]
)
async def test_kill_driver_at_step_then_reconcile(
    vm: GuestVM,
    make_netns: Callable[[], str],
    tmp_path: Path,
    op: str,
    model: str,
    step: str,
    phase: str,
) -> None:
    netns = make_netns() if model != "none" else ""
    mac = "52:54:00:00:01:31"
    virt = "eth1" if netns else ""
    if netns:
        make_sandbox(netns, virt, mac)
    veth_before = ip_links(netns).get(virt, {}).get("address")
    state_dir = tmp_path / "state"
    tap_name = f"{RUN}kt" if model == "none" else ""
    tun_before = tun_count(vm.pid)
    base = [
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--mac",
        mac,
        "--netns",
        netns,
        "--model",
        model,
        "--queues",
        str(QUEUES),
        "--tap-template",
        f"{RUN}k{{idx}}",
        "--unplug-timeout",
        "20",
    ]
    if tap_name:
        base += ["--tap-name", tap_name]
    state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), _config())
    if op == "remove":
        await state.add_interface(
            InterfaceDescription(
                name="eth1", hw_addr=mac, bandwidth=Bandwidth.from_libvirt(SHAPED)
            ),
            model=InterworkingModel.parse(model),
            netns_path=netns,
            tap_name=tap_name or None,
            wait_guest=True,
        )
    args = [op, *base, "--kill-at", f"{step}:{phase}"]
    if op == "add":
        args += ["--wait-guest", "--bandwidth", json.dumps(SHAPED)]
    code, output = await _driver(*args)
    assert code == -signal.SIGKILL, f"the driver was not killed at {step}:{phase}: {output}"
    journal = journal_file(state_dir)
    if step in BEFORE_THE_PLAN:
        # Killed before anything was changed: no record, and nothing to settle.
        assert journal is None, journal
        report = await reconcile(state)
        assert report.ok, report.lines()
        assert not [a for a in report.actions if a.outcome is not Outcome.ORPHAN]
        await assert_views_agree(vm, state_dir, netns, virt, model, tun_before, set(), shaped=True)
        if virt:
            assert ip_links(netns)[virt]["address"] == veth_before
        return
    assert journal, "a killed operation leaves its plan in the journal"
    ((record_id, record),) = journal.items()
    # One durable record per operation, written before its first step that changes things.
    assert record["step"] == FIRST_JOURNALED[op, model]
    assert record["operation"] == ("hot-plug" if op == "add" else "unplug")

    ours = {record_id}
    report = await reconcile(state)
    print("\n".join(report.lines()))
    assert report.ok, report.lines()
    saved = await assert_views_agree(
        vm, state_dir, netns, virt, model, tun_before, ours, shaped=True
    )
    (action,) = [a for a in report.actions if a.outcome is not Outcome.ORPHAN]
    committed = op == "add" and step == "persist" and phase == "done"
    if committed:
        assert action.outcome is Outcome.COMPLETED
        assert len(saved) == 1
    elif op == "add":
        assert action.outcome is Outcome.ROLLED_BACK
        assert not saved
    else:
        assert action.outcome is Outcome.COMPLETED
        assert not saved
    assert not report.by_outcome(Outcome.ORPHAN)
    assert await held_fd_names(vm.qmp_path, action.endpoint_id) == []
    if virt:
        assert not ip_links(netns).keys() - {"lo", virt, virt + "p"} or committed
        if not committed:
            assert ip_links(netns)[virt]["address"] == veth_before, "the link's MAC is back"
    else:
        assert tap_name not in ip_links() or committed
    if committed:
        await state.remove_interface(mac)
        await assert_views_agree(vm, state_dir, netns, virt, model, tun_before, ours, shaped=True)


# --- QEMU itself killed ------------------------------------------------------------------------


@pytest.mark.parametrize("socket_left", [True, False], ids=["refused", "socket-removed"])
async def test_qemu_killed_ops_fail_fast_and_reconcile_cleans_host(
    guest_image: GuestImage, make_netns: Callable[[], str], tmp_path: Path, socket_left: bool
) -> None:
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=4, name=f"{RUN}-qk")
    try:
        config = Config(tap_name=f"{RUN}q{{idx}}", queues=QUEUES, timeouts=Timeouts(connect=30.0))
        state = NetworkState.open(tmp_path / "state", str(vm.mgmt_qmp_path), config)
        sandboxes = []
        for model, mac in (
            ("tcfilter", "52:54:00:00:01:41"),
            ("macvtap", "52:54:00:00:01:42"),
            ("bridged", "52:54:00:00:01:43"),
        ):
            netns = make_netns()
            make_sandbox(netns, "eth1", mac)
            await state.add_interface(
                InterfaceDescription(name="eth1", hw_addr=mac),
                model=InterworkingModel.parse(model),
                netns_path=netns,
            )
            sandboxes.append((model, netns, mac))
        tap = await state.add_interface(
            InterfaceDescription(name="eth9", hw_addr="52:54:00:00:01:44"),
            model=InterworkingModel.NONE,
            tap_name=f"{RUN}qt",
        )
        assert f"{RUN}qt" in ip_links()
        assert len(await state.list_interfaces()) == 4
        ids = {e.endpoint.id for e in await state.list_interfaces()}
        assert ip_links(sandboxes[1][1])["eth1"]["address"] != sandboxes[1][2]  # macvtap moved it

        os.kill(vm.pid, signal.SIGKILL)
        await vm.stop()  # reaps it; removes its directory, and with it the socket
        if socket_left:
            vm.workdir.mkdir(parents=True)
            import socket as socketmod

            sock = socketmod.socket(socketmod.AF_UNIX)
            sock.bind(str(vm.mgmt_qmp_path))  # a socket file nobody listens on: refused
            sock.close()

        for attempt in (
            lambda: state.add_interface(
                InterfaceDescription(name="eth7", hw_addr="52:54:00:00:01:47"),
                model=InterworkingModel.NONE,
                tap_name=f"{RUN}qu",
            ),
            lambda: state.remove_interface(tap.hardware_addr),
        ):
            started = time.monotonic()
            with pytest.raises(QmpConnectError) as info:
                await attempt()
            # fast: well inside the 30 s connect deadline, i.e. no wait at all
            assert time.monotonic() - started < 30
            cause = ConnectionRefusedError if socket_left else FileNotFoundError
            assert isinstance(info.value.__cause__, cause), info.value
            assert "QEMU is not running" in str(info.value)
        assert f"{RUN}qu" not in ip_links()
        assert len(await state.list_interfaces()) == 4, "nothing is dropped before reconcile"

        report = await reconcile(state)
        assert not report.qemu_running
        assert report.ok, report.lines()
        assert len(report.by_outcome(Outcome.DROPPED_QEMU_GONE)) == 4
        assert await state.list_interfaces() == []
        assert saved_ids(tmp_path / "state") == {}
        assert f"{RUN}qt" not in ip_links()
        assert not {claimed_owner(a) for a in marked_links().values()} & ids
        for model, netns, mac in sandboxes:
            links = ip_links(netns)
            assert set(links) == {"lo", "eth1", "eth1p"}, (model, links)
            assert links["eth1"]["address"] == mac, f"{model}: the link's own MAC is back"
            assert "master" not in links["eth1"]
            assert not has_ingress(netns, "eth1"), model
        print("\n" + "\n".join(report.lines()))
    finally:
        await vm.stop()


async def test_next_operation_recovers_the_journal_first(
    vm: GuestVM, make_netns: Callable[[], str], tmp_path: Path
) -> None:
    """No explicit reconcile: the next add_interface settles what the crash left, then plugs."""
    netns = make_netns()
    make_sandbox(netns, "eth1", "52:54:00:00:01:51")
    make_sandbox(netns, "eth2", "52:54:00:00:01:52")
    state_dir = tmp_path / "state"
    tun_before = tun_count(vm.pid)
    code, output = await _driver(
        "add",
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--mac",
        "52:54:00:00:01:51",
        "--name",
        "eth1",
        "--netns",
        netns,
        "--queues",
        str(QUEUES),
        "--tap-template",
        f"{RUN}k{{idx}}",
        "--kill-at",
        "device-add:done",
    )
    assert code == -signal.SIGKILL, output
    (crashed,) = journal_file(state_dir)
    assert f"{crashed}-dev" in (await qemu_view(vm.qmp_path)).devices

    state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), _config())
    second = await state.add_interface(
        InterfaceDescription(name="eth2", hw_addr="52:54:00:00:01:52"), netns_path=netns
    )
    saved = await assert_views_agree(
        vm, state_dir, netns, "", "tcfilter", tun_before, {crashed, second.id}
    )
    assert saved == {second.id: "plugged"}
    assert not has_ingress(netns, "eth1")
    assert has_ingress(netns, "eth2")
    await state.remove_interface("52:54:00:00:01:52")
    await assert_views_agree(
        vm, state_dir, netns, "eth2", "tcfilter", tun_before, {crashed, second.id}
    )


async def test_reconcile_drops_a_nic_unplugged_behind_its_back_and_reports_orphans(
    vm: GuestVM, make_netns: Callable[[], str], tmp_path: Path
) -> None:
    netns = make_netns()
    make_sandbox(netns, "eth1", "52:54:00:00:01:61")
    state_dir = tmp_path / "state"
    tun_before = tun_count(vm.pid)
    state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), _config())
    ep = await state.add_interface(
        InterfaceDescription(name="eth1", hw_addr="52:54:00:00:01:61"),
        netns_path=netns,
        wait_guest=True,
    )
    orphan = "qn0000000000-dev"
    async with await QmpSession.connect(str(vm.qmp_path), connect_timeout=30) as manager:
        # someone else (the VM manager) unplugs our NIC, and plugs a device with our pattern
        await manager.device_del(f"{ep.id}-dev", 60)
        await manager.execute(
            "device_add", {"driver": "virtio-net-pci", "id": orphan, "bus": "rp3"}
        )
    assert has_ingress(netns, "eth1"), "the host side is still there"

    report = await reconcile(state)
    assert report.ok, report.lines()
    assert [(a.outcome, a.endpoint_id) for a in report.actions] == [
        (Outcome.DROPPED_DEVICE_GONE, ep.id),
        (Outcome.ORPHAN, orphan),
    ]
    assert (
        json.loads(json.dumps(report.to_json()))["actions"][0]["outcome"] == "dropped-device-gone"
    )
    lines = report.lines()
    assert "QEMU running" in lines[0]
    assert any("orphan" in line and orphan in line for line in lines)
    await assert_views_agree(vm, state_dir, netns, "eth1", "tcfilter", tun_before, {ep.id})
    assert orphan in (await qemu_view(vm.qmp_path)).devices, "not ours to remove"

    again = await reconcile(state)
    assert [a.outcome for a in again.actions] == [Outcome.ORPHAN]
    async with await QmpSession.connect(str(vm.qmp_path), connect_timeout=30) as manager:
        await manager.device_del(orphan, 60)
