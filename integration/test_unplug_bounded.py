"""Bounded unplug: a guest that does not release a NIC never hangs qmpnet nor loses the NIC.

``device_del`` waits for DEVICE_DELETED up to the configured deadline. Past it the entry is
``unplug-pending`` (neither dropped nor reported done), QEMU keeps serving other commands,
and a later ``remove_interface`` or a reconcile completes the unplug once the device is gone.
Two guests: one paused from the start (no event ever comes) and one that is stopped and later
continued (it answers late).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qmpnet.config import Config, Timeouts
from qmpnet.errors import PlugError, UnplugTimeoutError
from qmpnet.model import InterfaceDescription
from qmpnet.network import NetworkState
from qmpnet.reconcile import Outcome, reconcile
from qmpnet.store import Status
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.probe import journal_file, qemu_view, saved_ids, tun_count
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.probe import monitor_command as hmp
from qmpnet.testing.scene import RUN, make_sandbox
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

DEADLINE = 1.5
MAC_A, MAC_B = "52:54:00:00:03:31", "52:54:00:00:03:32"


def config() -> Config:
    return Config(
        tap_name=f"{RUN}u{{idx}}", queues=1, timeouts=Timeouts(unplug=DEADLINE, connect=30.0)
    )


booted = module_vm("ub")


async def test_default_deadline_is_bounded() -> None:
    assert Config().timeouts.unplug == 5.0


async def test_paused_guest_unplug_stays_pending_and_qemu_keeps_serving(
    guest_image: GuestImage, make_netns: Callable[[], str], tmp_path: Path
) -> None:
    netns = make_netns()
    make_sandbox(netns, "eth1", MAC_A)
    make_sandbox(netns, "eth2", MAC_B)
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=4, name=f"{RUN}-up")
    try:
        state = NetworkState.open(tmp_path / "state", str(vm.mgmt_qmp_path), config())
        a = await state.add_interface(
            InterfaceDescription(name="eth1", hw_addr=MAC_A), netns_path=netns
        )

        removal = asyncio.create_task(state.remove_interface(MAC_A))
        started = time.monotonic()
        # While qmpnet waits for the guest, QEMU answers other clients at once.
        status = await hmp(vm.qmp_path, "query-status")
        assert status["status"] == "prelaunch"
        with pytest.raises(PlugError) as info:
            await removal
        elapsed = time.monotonic() - started
        assert info.value.step == "device-del"
        assert isinstance(info.value.cause, UnplugTimeoutError)
        assert info.value.cause.timeout == DEADLINE
        assert elapsed >= DEADLINE, "it waited for the event up to the deadline"
        print(f"\npaused guest: device_del gave up after {elapsed:.2f} s (deadline {DEADLINE} s)")

        entries = {e.endpoint.id: e.status for e in await state.list_interfaces()}
        assert entries == {a.id: Status.UNPLUG_PENDING}, "not dropped, not reported done"
        assert saved_ids(tmp_path / "state") == {a.id: "unplug-pending"}
        assert journal_file(tmp_path / "state") is None
        view = await qemu_view(vm.qmp_path)
        assert f"{a.id}-dev" in view.devices
        assert f"{a.id}-net" in view.netdevs
        assert getattr(a, "tap_name", "") in ip_links(netns), "the NIC's tap is kept with it"

        # The VM is not blocked: a second NIC plugs right after.
        b = await state.add_interface(
            InterfaceDescription(name="eth2", hw_addr=MAC_B), netns_path=netns
        )
        assert b.pci_path != a.pci_path
        entries = {e.endpoint.id: e.status for e in await state.list_interfaces()}
        assert entries == {a.id: Status.UNPLUG_PENDING, b.id: Status.PLUGGED}
        assert {f"{a.id}-dev", f"{b.id}-dev"} <= (await qemu_view(vm.qmp_path)).devices

        # Asking again waits again (QEMU 7.2 refuses a second device_del of a device whose
        # unplug is pending; qmpnet waits for the first) and stays pending.
        with pytest.raises(PlugError) as again:
            await state.remove_interface(MAC_A)
        assert isinstance(again.value.cause, UnplugTimeoutError)
        report = await reconcile(state)
        assert [(x.outcome, x.endpoint_id) for x in report.actions] == [
            (Outcome.PENDING_KEPT, a.id)
        ]
        assert report.consistent == (b.id,)
        assert saved_ids(tmp_path / "state") == {a.id: "unplug-pending", b.id: "plugged"}
    finally:
        await vm.stop()


@pytest.mark.parametrize("complete_by", ["reconcile", "remove_interface"])
async def test_guest_answering_late_completes_the_pending_unplug(
    booted: GuestVM, make_netns: Callable[[], str], tmp_path: Path, complete_by: str
) -> None:
    netns = make_netns()
    make_sandbox(netns, "eth1", MAC_A)
    tun_before = tun_count(booted.pid)
    state = NetworkState.open(tmp_path / "state", str(booted.mgmt_qmp_path), config())
    cursor = booted.console_cursor()
    a = await state.add_interface(
        InterfaceDescription(name="eth1", hw_addr=MAC_A), netns_path=netns, wait_guest=True
    )
    await booted.wait_for(rf"QMPNET NIC-ADD .*mac={MAC_A}", 60, since=cursor)

    cursor = booted.console_cursor()
    await hmp(booted.qmp_path, "stop")
    try:
        with pytest.raises(PlugError) as info:
            await state.remove_interface(MAC_A)
        assert isinstance(info.value.cause, UnplugTimeoutError)
        assert saved_ids(tmp_path / "state") == {a.id: "unplug-pending"}
        assert f"{a.id}-dev" in (await qemu_view(booted.qmp_path)).devices
    finally:
        await hmp(booted.qmp_path, "cont")

    if complete_by == "reconcile":
        report = await reconcile(state)
        assert [(x.outcome, x.endpoint_id) for x in report.actions] == [
            (Outcome.PENDING_COMPLETED, a.id)
        ]
    else:
        removed = await state.remove_interface(MAC_A)
        assert removed.id == a.id
    # the guest itself saw the NIC go
    await booted.wait_for(rf"QMPNET NIC-DEL .*mac={MAC_A}", 60, since=cursor)
    assert await state.list_interfaces() == []
    view = await qemu_view(booted.qmp_path)
    assert not view.has_any_of(a.id)
    assert tun_count(booted.pid) == tun_before
    assert set(ip_links(netns)) == {"lo", "eth1", "eth1p"}
    assert journal_file(tmp_path / "state") is None
