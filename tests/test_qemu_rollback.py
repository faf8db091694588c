"""All or nothing against a real, paused QEMU (TCG): deadlines and forced failures.

A paused guest never runs code, so it never releases a device: the unplug deadline must
fire with a typed error and leave the entry ``unplug-pending``. A failure at ``device_add``
or ``netdev_add`` must leave no netdev, no fd in QEMU, no tap and no state entry; a
conflicting object made by someone else (here: through the VM manager's own monitor) must
survive. QEMU refuses on its own; nothing is faked.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from qmpnet import tuntap
from qmpnet.config import Config, Timeouts
from qmpnet.endpoints import create_tap_endpoint
from qmpnet.errors import (
    InvalidInputError,
    PlugError,
    QmpCommandError,
    QmpConnectError,
    UnplugTimeoutError,
    UnsupportedError,
)
from qmpnet.hypervisor import QemuHypervisor, device_id, nic_macs
from qmpnet.lifecycle import Operation, Phase, Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.reconcile import Outcome, reconcile
from qmpnet.store import Status
from qmpnet.testing import GuestImage, GuestVM
from qmpnet.testing.scene import RUN
from qmpnet.tuntap import QueueFds

pytestmark = [pytest.mark.kernel, pytest.mark.qemu]

B, D, F, U = Phase.BEGIN, Phase.DONE, Phase.FAILED, Phase.UNDO


class Watch:
    """Records the steps of each operation and the id of the endpoint being plugged."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.history: list[tuple[Step, Phase]] = []
        self.began: dict[Step, float] = {}
        self.took: dict[str, float] = {}

    def __call__(self, op: Operation, step: Step, phase: Phase) -> None:
        if op.subject is not None and op.subject.id not in self.ids:
            self.ids.append(op.subject.id)
        self.history.append((step, phase))
        now = time.monotonic()
        if phase is B:
            self.began[step] = now
        elif phase in (D, F):
            self.took[step.value] = (now - self.began[step]) * 1000

    def report(self, label: str) -> None:
        print(
            f"\n[qmp timings] {label}: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in self.took.items())
        )


async def _snapshot(vm: GuestVM, host: Any) -> dict[str, Any]:
    async with await QmpSession.connect(str(vm.mgmt_qmp_path)) as qmp:
        peripherals = sorted(
            c["name"]
            for c in await qmp.qom_list("/machine/peripheral")
            if c["type"].startswith("child<")
        )
        network = str(await qmp.execute("human-monitor-command", {"command-line": "info network"}))
    return {
        "peripherals": peripherals,
        "network": network,
        "tun": len(host.tun_fds(vm.pid)),
        "links": sorted(host.links()),
    }


async def _fd_names_held(vm: GuestVM, endpoint_id: str, queues: int) -> list[str]:
    """Which of the endpoint's fd names QEMU still holds (closefd answers "not found")."""
    held = []
    async with await QmpSession.connect(str(vm.mgmt_qmp_path)) as qmp:
        for name in [f"{endpoint_id}-fd{i}" for i in range(queues)] + [f"{endpoint_id}-vhost0"]:
            if await qmp.close_fd(name):
                held.append(name)
    return held


def _plug_args(tap: str, mac: str, queues: int = 2) -> dict[str, Any]:
    return {
        "desc": InterfaceDescription(name="eth0", hw_addr=mac),
        "model": InterworkingModel.NONE,
        "queues": queues,
        "tap_name": tap,
    }


async def _add(state: NetworkState, args: dict[str, Any]) -> Any:
    return await state.add_interface(
        args["desc"], model=args["model"], queues=args["queues"], tap_name=args["tap_name"]
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("queues", [1, 4])
async def test_paused_plug_and_the_unplug_deadline(
    paused_vm: GuestVM, host: Any, state_dir: Path, queues: int
) -> None:
    vm = paused_vm
    # the tap name comes from the configured template; QEMU holds the tap until it is
    # killed at teardown, which removes the (non-persistent) tap
    tap = f"{RUN}p0"
    mac = "52:54:00:00:00:71"
    watch = Watch()
    state = NetworkState.open(
        state_dir,
        str(vm.mgmt_qmp_path),
        Config(tap_name=f"{RUN}p{{idx}}", timeouts=Timeouts(unplug=1.0)),
    )
    state.observers.append(watch)
    before = await _snapshot(vm, host)

    endpoint = await state.add_interface(
        InterfaceDescription(name="eth0", hw_addr=mac), model=InterworkingModel.NONE, queues=queues
    )
    assert endpoint.host_link == tap
    watch.report(f"tap plug, {queues} queue(s), paused q35")
    after = await _snapshot(vm, host)
    assert f"{endpoint.id}-dev" in after["peripherals"]
    # the fds string QEMU parsed: one tap client per queue, each a tun fd of QEMU
    fds = [
        int(m)
        for m in re.findall(rf"{endpoint.id}-net: index=\d+,type=tap,fd=(\d+)", after["network"])
    ]
    assert len(fds) == queues
    assert all(os.readlink(f"/proc/{vm.pid}/fd/{fd}") == "/dev/net/tun" for fd in fds)
    assert "vhost" not in after["network"].split(f"{endpoint.id}-net")[1].split("\n")[0]
    assert after["tun"] == before["tun"] + queues
    assert tap in after["links"]

    watch.history.clear()
    watch.took.clear()
    started = time.monotonic()
    with pytest.raises(PlugError) as caught:
        await state.remove_interface(mac)
    print(
        f"[qmp timings] unplug deadline (1 s) fired after "
        f"{(time.monotonic() - started) * 1000:.0f} ms"
    )
    err = caught.value
    assert err.step == "device-del"
    assert isinstance(err.cause, UnplugTimeoutError)
    assert err.__cause__ is err.cause
    assert err.cause.device_id == f"{endpoint.id}-dev"
    assert watch.history == [(Step.DEVICE_DEL, B), (Step.DEVICE_DEL, F)]
    [entry] = await state.list_interfaces()
    assert entry.status is Status.UNPLUG_PENDING
    assert entry.endpoint == endpoint
    # nothing was taken away behind the guest's back: QEMU still has it all
    still = await _snapshot(vm, host)
    assert f"{endpoint.id}-dev" in still["peripherals"]
    assert f"{endpoint.id}-net" in still["network"]
    assert still["tun"] == after["tun"]


@pytest.mark.asyncio
async def test_device_add_failure_no_free_slot(
    guest_image: GuestImage, tmp_path: Path, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    """One root port: the second NIC has no slot. Its netdev and fds must be undone."""
    async with await GuestVM.start(
        guest_image, tmp_path, paused=True, root_ports=1, name=f"{RUN}-rp1"
    ) as vm:
        watch = Watch()
        state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), Config())
        state.observers.append(watch)
        first_tap, second_tap = host_link_names("t"), host_link_names("t")
        first = await _add(state, _plug_args(first_tap, "52:54:00:00:00:72"))
        assert first.pci_path == "01/00"
        before = await _snapshot(vm, host)
        watch.history.clear()
        watch.took.clear()

        with pytest.raises(PlugError) as caught:
            await _add(state, _plug_args(second_tap, "52:54:00:00:00:73"))
        watch.report("failed plug (no free slot), paused q35")
        assert caught.value.step == "device-add"
        assert isinstance(caught.value.cause, UnsupportedError)
        assert "no free hot-pluggable PCI slot" in str(caught.value)
        second_id = watch.ids[-1]
        assert second_id != first.id
        assert watch.history[-4:] == [
            (Step.DEVICE_ADD, F),
            (Step.NETDEV_ADD, U),
            (Step.PASS_FDS, U),
            (Step.OPEN_QUEUES, U),
        ]

        await _nothing_left(vm, host, state, before, second_id, second_tap, [first])


@pytest.mark.asyncio
async def test_device_add_refused_by_qemu(
    paused_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    """QEMU itself refuses device_add (the id is taken by the VM manager's device): the
    rollback leaves nothing of ours, and the manager's device is left alone."""
    vm = paused_vm
    watch = Watch()
    tap = host_link_names("t")

    async with await QmpSession.connect(str(vm.qmp_path)) as manager:

        async def take_the_id(op: Operation, step: Step, phase: Phase) -> None:
            if (step, phase) == (Step.DEVICE_ADD, B):
                await manager.device_add(
                    {"driver": "virtio-net-pci", "bus": "rp3", "id": f"{op.subject.id}-dev"}
                )

        state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), Config())
        state.observers += [watch, take_the_id]
        before = await _snapshot(vm, host)
        with pytest.raises(PlugError) as caught:
            await _add(state, _plug_args(tap, "52:54:00:00:00:74", queues=4))
    watch.report("failed plug (device_add refused), paused q35")
    err = caught.value
    assert err.step == "device-add"
    assert isinstance(err.cause, QmpCommandError)
    assert err.cause.command == "device_add"
    assert "Duplicate" in err.cause.desc  # QEMU's own words
    endpoint_id = watch.ids[-1]
    assert watch.history[-4:] == [
        (Step.DEVICE_ADD, F),
        (Step.NETDEV_ADD, U),
        (Step.PASS_FDS, U),
        (Step.OPEN_QUEUES, U),
    ]
    before["peripherals"] = sorted([*before["peripherals"], f"{endpoint_id}-dev"])
    await _nothing_left(vm, host, state, before, endpoint_id, tap, [], queues=4)


@pytest.mark.asyncio
async def test_netdev_add_refused_by_qemu(
    paused_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    """The netdev id is taken (by the VM manager): netdev_add fails; the fds QEMU was given
    are released, the tap goes, and the manager's netdev survives."""
    vm = paused_vm
    watch = Watch()
    tap = host_link_names("t")
    async with await QmpSession.connect(str(vm.qmp_path)) as manager:

        async def take_the_id(op: Operation, step: Step, phase: Phase) -> None:
            if (step, phase) == (Step.NETDEV_ADD, B):
                await manager.execute(
                    "netdev_add", {"type": "hubport", "hubid": 0, "id": f"{op.subject.id}-net"}
                )

        state = NetworkState.open(state_dir, str(vm.mgmt_qmp_path), Config())
        state.observers += [watch, take_the_id]
        before = await _snapshot(vm, host)
        with pytest.raises(PlugError) as caught:
            await _add(state, _plug_args(tap, "52:54:00:00:00:75", queues=2))
    watch.report("failed plug (netdev_add refused), paused q35")
    err = caught.value
    assert err.step == "netdev-add"
    assert isinstance(err.cause, QmpCommandError)
    assert err.cause.command == "netdev_add"
    endpoint_id = watch.ids[-1]
    assert watch.history[-3:] == [(Step.NETDEV_ADD, F), (Step.PASS_FDS, U), (Step.OPEN_QUEUES, U)]
    snap = await _snapshot(vm, host)
    # theirs survives (a hub port: listed under its hub), and no tap client of that name
    assert re.search(rf"^hub 0\s+\\ {endpoint_id}-net\s*$", snap["network"], re.M)
    assert f"{endpoint_id}-net: index" not in snap["network"]
    assert snap["tun"] == before["tun"]
    assert await _fd_names_held(vm, endpoint_id, 2) == []
    host.wait_until(lambda: tap not in host.links(), what="tap gone")
    assert await state.list_interfaces() == []
    assert not state.store.journal_path.exists()


async def _nothing_left(
    vm: GuestVM,
    host: Any,
    state: NetworkState,
    before: dict[str, Any],
    endpoint_id: str,
    tap: str,
    entries: list[Any],
    queues: int = 2,
) -> None:
    after = await _snapshot(vm, host)
    assert f"{endpoint_id}-net" not in after["network"]
    assert after["peripherals"] == before["peripherals"]
    assert after["tun"] == before["tun"]
    assert await _fd_names_held(vm, endpoint_id, queues) == []
    host.wait_until(lambda: tap not in host.links(), what="tap gone")
    assert [e.endpoint for e in await state.list_interfaces()] == entries
    assert not state.store.journal_path.exists()
    assert host.tun_fds(os.getpid()) == []


@pytest.mark.asyncio
async def test_a_busy_monitor_is_a_typed_error_and_nothing_is_made(
    paused_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    tap = host_link_names("t")
    async with await QmpSession.connect(str(paused_vm.mgmt_qmp_path)):  # someone holds it
        state = NetworkState.open(
            state_dir, str(paused_vm.mgmt_qmp_path), Config(timeouts=Timeouts(connect=1.0))
        )
        with pytest.raises(QmpConnectError, match="busy"):
            await _add(state, _plug_args(tap, "52:54:00:00:00:76"))
    assert tap not in host.links()
    assert await state.list_interfaces() == []


@pytest.mark.asyncio
@pytest.mark.parametrize("where", [Step.NETDEV_ADD, Step.PERSIST])
async def test_a_cancelled_plug_is_undone_before_the_save_and_kept_after(
    paused_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path, where: Step
) -> None:
    """The state file is the commit point. A caller cancelling while an (async) observer
    sees ``where`` done: before the save everything is undone; once the state records the
    NIC, QEMU keeps it too, so the three views agree either way. (The guest is paused, so a
    device once added could not be taken back: the undone case stops at the netdev.)"""
    tap = host_link_names("t")
    reached = asyncio.Event()

    async def suspend_at(op: Operation, step: Step, phase: Phase) -> None:
        if (step, phase) == (where, D):
            reached.set()
            await asyncio.sleep(3600)  # cancelled here

    state = NetworkState.open(state_dir, str(paused_vm.mgmt_qmp_path), Config())
    state.observers.append(suspend_at)
    before = await _snapshot(paused_vm, host)
    task = asyncio.create_task(_add(state, _plug_args(tap, "52:54:00:00:00:7a")))
    await asyncio.wait_for(reached.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    entries = await state.list_interfaces()
    now = await _snapshot(paused_vm, host)
    if where is Step.NETDEV_ADD:
        assert entries == []
        assert now == before
        assert tap not in host.links()
    else:
        [entry] = entries
        assert entry.status is Status.PLUGGED
        assert f"{entry.endpoint.id}-dev" in now["peripherals"]
        assert f"{entry.endpoint.id}-net" in now["network"]
        assert tap in now["links"]
    assert state.store.journal() == {}


@pytest.mark.asyncio
async def test_a_cancelled_unplug_is_pending_not_plugged(
    paused_vm: GuestVM, host_link_names: Any, state_dir: Path
) -> None:
    """Cancelled while waiting for DEVICE_DELETED: QEMU is unplugging the NIC, so the state
    must say unplug-pending (a later call completes it), never plugged."""
    tap = host_link_names("t")
    reached = asyncio.Event()

    def watch(op: Operation, step: Step, phase: Phase) -> None:
        if (step, phase) == (Step.DEVICE_DEL, B):
            reached.set()

    state = NetworkState.open(
        state_dir, str(paused_vm.mgmt_qmp_path), Config(timeouts=Timeouts(unplug=30.0))
    )
    await _add(state, _plug_args(tap, "52:54:00:00:00:7b"))
    state.observers.append(watch)
    task = asyncio.create_task(state.remove_interface("52:54:00:00:00:7b"))
    await asyncio.wait_for(reached.wait(), 30)
    await asyncio.sleep(0.3)  # device_del sent, its wait under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [entry] = await state.list_interfaces()
    assert entry.status is Status.UNPLUG_PENDING
    assert state.store.journal() == {}


@pytest.mark.asyncio
async def test_a_second_cancel_during_the_undo_keeps_the_journal(
    paused_vm: GuestVM, host_link_names: Any, state_dir: Path
) -> None:
    """Cancelled at wait-guest, the undo's device_del waits for a guest that never answers;
    cancelled again there, the undo is unfinished, so the journal must keep the plug for
    the next operation or a reconcile (QEMU still has the device)."""
    tap = host_link_names("t")
    phases: list[tuple[Step, Phase]] = []
    waiting = asyncio.Event()

    def watch(op: Operation, step: Step, phase: Phase) -> None:
        phases.append((step, phase))
        if (step, phase) == (Step.WAIT_GUEST, B):
            waiting.set()

    state = NetworkState.open(
        state_dir,
        str(paused_vm.mgmt_qmp_path),
        Config(timeouts=Timeouts(unplug=30.0, guest_ready=60.0)),
    )
    state.observers.append(watch)
    args = _plug_args(tap, "52:54:00:00:00:7c")
    task = asyncio.create_task(
        state.add_interface(
            args["desc"], model=args["model"], queues=args["queues"], tap_name=tap, wait_guest=True
        )
    )
    await asyncio.wait_for(waiting.wait(), 30)
    task.cancel()
    await asyncio.sleep(0.5)  # the undo's device_del is waiting for the guest
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await state.list_interfaces() == []
    journal = state.store.journal()
    assert len(journal) == 1, phases
    (endpoint_id,) = journal
    async with await QmpSession.connect(str(paused_vm.qmp_path)) as qmp:
        assert f"{endpoint_id}-dev" in {
            c["name"] for c in await qmp.qom_list("/machine/peripheral")
        }


@pytest.mark.asyncio
async def test_a_mac_the_vm_already_has_is_refused_across_state_directories(
    paused_vm: GuestVM, host: Any, host_link_names: Any, tmp_path: Path
) -> None:
    """Two state directories (the CLI's and a CNI plugin's, say) for one VM: the second plug
    of one MAC is refused from QEMU's own view, before anything is made."""
    first, second = host_link_names("t"), host_link_names("t")
    mac = "52:54:00:00:00:7d"
    one = NetworkState.open(tmp_path / "one", str(paused_vm.mgmt_qmp_path), Config())
    two = NetworkState.open(tmp_path / "two", str(paused_vm.mgmt_qmp_path), Config())
    await _add(one, _plug_args(first, mac))
    before = await _snapshot(paused_vm, host)
    with pytest.raises(InvalidInputError) as caught:
        await _add(two, _plug_args(second, mac))
    assert caught.value.field == "hwAddr"
    assert "QEMU already has NIC" in str(caught.value)
    assert await _snapshot(paused_vm, host) == before
    assert second not in host.links()
    assert await two.list_interfaces() == []


@pytest.mark.asyncio
async def test_a_plug_cancelled_while_qemu_runs_netdev_add_is_undone_after(
    paused_vm: GuestVM, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    """Cancelled while ``netdev_add`` is in flight (QEMU is stopped with SIGSTOP, so it has
    the command but has not answered): once QEMU runs again it creates the netdev, and the
    undo registered for that unknown outcome must delete it. Nothing is left afterwards."""
    tap = host_link_names("t")
    sent = asyncio.Event()

    def stop_qemu(op: Operation, step: Step, phase: Phase) -> None:
        if (step, phase) == (Step.NETDEV_ADD, B):
            os.kill(paused_vm.pid, signal.SIGSTOP)
            sent.set()

    state = NetworkState.open(state_dir, str(paused_vm.mgmt_qmp_path), Config())
    state.observers.append(stop_qemu)
    before = await _snapshot(paused_vm, host)
    task = asyncio.create_task(_add(state, _plug_args(tap, "52:54:00:00:00:7e", queues=1)))
    try:
        await asyncio.wait_for(sent.wait(), 30)
        await asyncio.sleep(0.3)  # netdev_add is on the socket, unanswered
        task.cancel()
        await asyncio.sleep(0.3)  # the undo's netdev_del queues behind it
    finally:
        os.kill(paused_vm.pid, signal.SIGCONT)
    with pytest.raises(asyncio.CancelledError):
        await task
    after = await _snapshot(paused_vm, host)
    assert re.search(r"qn[0-9a-f]{10}-net", after["network"]) is None, after["network"]
    assert after["peripherals"] == before["peripherals"]
    host.wait_until(lambda: tap not in host.links(), what="tap gone")
    assert after["tun"] == before["tun"]
    assert await state.list_interfaces() == []
    assert state.store.journal() == {}


@pytest.mark.asyncio
async def test_concurrent_plugs_through_one_session_take_different_slots(
    paused_vm: GuestVM, host: Any, host_link_names: Any
) -> None:
    """Two plugs racing through one hypervisor: the slot choice and the device_add that
    takes it are one critical section, so each NIC gets its own root port."""
    taps = [host_link_names("c") for _ in range(3)]
    fds = [QueueFds(tap=tuntap.open_tap_queues(name, 1)) for name in taps]
    try:
        async with await QmpSession.connect(str(paused_vm.mgmt_qmp_path)) as session:
            hv = QemuHypervisor(session)
            taps_of = [
                create_tap_endpoint(i, "eth0", tap_name=name).tap_interface
                for i, name in enumerate(taps)
            ]
            paths = await asyncio.gather(
                *(
                    hv.plug_tap(tap, fd, f"52:54:00:00:01:{i:02x}")
                    for i, (tap, fd) in enumerate(zip(taps_of, fds, strict=True))
                )
            )
            assert len(set(paths)) == 3, paths
            present = await hv.peripheral_ids()
            assert {device_id(t) for t in taps_of} <= present
            # no firmware ran: query-pci sees no bus below a port, every port is read in QOM
            assert (await hv.read_topology()).exact
    finally:
        for fd in fds:
            fd.close()


@pytest.mark.asyncio
async def test_a_slot_taken_behind_a_kept_session_is_found_and_another_used(
    paused_vm: GuestVM, host_link_names: Any
) -> None:
    """The kept topology is only a cache: a VM manager plugging on "our" next slot through
    its own monitor makes our device_add fail once, re-read QEMU, and use the next slot."""
    taps = [host_link_names("s") for _ in range(2)]
    fds = [QueueFds(tap=tuntap.open_tap_queues(name, 1)) for name in taps]
    try:
        async with (
            await QmpSession.connect(str(paused_vm.mgmt_qmp_path)) as ours,
            await QmpSession.connect(str(paused_vm.qmp_path)) as theirs,
        ):
            hv, manager = QemuHypervisor(ours), QemuHypervisor(theirs)
            taps_of = [
                create_tap_endpoint(i, "eth0", tap_name=name).tap_interface
                for i, name in enumerate(taps)
            ]
            first = await hv.plug_tap(taps_of[0], fds[0], "52:54:00:00:02:01")
            [next_free, *_] = await manager.free_slots()
            await theirs.device_add(
                {
                    "driver": "virtio-net-pci",
                    "id": f"{RUN}-theirs",
                    "bus": next_free.bus,
                    "addr": hex(next_free.addr),
                    "romfile": "",
                }
            )
            second = await hv.plug_tap(taps_of[1], fds[1], "52:54:00:00:02:02")
            assert len({first, next_free.pci_path, second}) == 3, (first, next_free, second)
            assert device_id(taps_of[1]) in await manager.peripheral_ids()
    finally:
        for fd in fds:
            fd.close()


@pytest.mark.asyncio
async def test_a_new_qemu_behind_the_state_is_a_new_vm(
    guest_image: GuestImage, tmp_path: Path, host: Any, host_link_names: Any, state_dir: Path
) -> None:
    """The state remembers which QEMU process its NICs belong to (pid and start time from
    the socket's peer credentials). Another QEMU behind the same state is a new VM: its
    listing never shows the old VM's NICs as plugged, and the next operation drops them
    (their host side cleaned) before it does anything else."""
    tap = host_link_names("v")
    first = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2, name=f"{RUN}-va")
    try:
        old = NetworkState.open(state_dir, str(first.mgmt_qmp_path), Config())
        endpoint = await _add(old, _plug_args(tap, "52:54:00:00:03:01", queues=1))
        [entry] = await old.list_interfaces()
        assert entry.status is Status.PLUGGED
        saved = json.loads((state_dir / "state.json").read_text())
        assert saved["vm"]["pid"] == first.pid
    finally:
        await first.stop()
    second = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2, name=f"{RUN}-vb")
    try:
        new = NetworkState.open(state_dir, str(second.mgmt_qmp_path), Config())
        [gone] = await new.list_interfaces()
        assert gone.status is Status.VM_GONE
        assert gone.endpoint.id == endpoint.id
        report = await reconcile(new)
        assert report.ok, report.lines()
        assert [a.outcome for a in report.actions] == [Outcome.DROPPED_QEMU_GONE]
        assert await new.list_interfaces() == []
        assert json.loads((state_dir / "state.json").read_text())["vm"]["pid"] == second.pid
        again = await _add(new, _plug_args(tap, "52:54:00:00:03:01", queues=1))
        [entry] = await new.list_interfaces()
        assert (entry.status, entry.endpoint.id) == (Status.PLUGGED, again.id)
        assert f"{again.id}-dev" in (await _snapshot(second, host))["peripherals"]
    finally:
        await second.stop()


@pytest.mark.asyncio
async def test_the_network_list_and_the_filter_view_name_the_same_nics(
    guest_image: GuestImage, host_link_names: Any, tmp_path: Path
) -> None:
    """The MAC check reads QEMU's network list (``info network``); QEMU's rx-filter view, the
    independent one, must name the same NICs and MACs: ours, and the VM manager's own."""
    cold = "52:54:00:00:00:c0"
    extra = [
        "-netdev",
        f"tap,id={RUN}u0,ifname={host_link_names('t')},script=no,downscript=no",
        "-device",
        f"virtio-net-pci,netdev={RUN}u0,mac={cold},id={RUN}cold,romfile=",
    ]
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=4, extra_args=extra)
    try:
        state = NetworkState.open(tmp_path / "state", str(vm.mgmt_qmp_path), Config())
        for mac in ("52:54:00:00:00:c1", "52:54:00:00:00:c2"):
            await _add(state, _plug_args(host_link_names("t"), mac))
        async with await QmpSession.connect(str(vm.qmp_path)) as qmp:
            text = await qmp.execute("human-monitor-command", {"command-line": "info network"})
            filters = await qmp.execute("query-rx-filter")
            hv = QemuHypervisor(qmp)
            assert await hv.nic_with_mac(cold.upper()) == f"{RUN}cold"
            assert await hv.nic_with_mac("52:54:00:00:00:ff") is None
        listed = nic_macs(text)
        assert listed == {f["name"]: f["main-mac"].lower() for f in filters}, text
        assert set(listed.values()) == {cold, "52:54:00:00:00:c1", "52:54:00:00:00:c2"}
    finally:
        await vm.stop()
