"""A guest that refuses an unplug ends the wait at once; the NIC stays plugged and whole.

QEMU >= 6.2 reports a guest's refusal with DEVICE_UNPLUG_GUEST_ERROR (``device``: the id,
``path``: the QOM path), withdraws the request and keeps the device. Real x86 QEMU never
sends it for a NIC: it is emitted only on ppc's spapr paths (a DRC the guest unisolates
again, the rollback of a memory unplug) and by ACPI memory hot-unplug; PCI hot-plug on q35
(ACPI or native pciehp) and pc has no path that reports a guest error, its guest simply
never answers. So the kit's fake QMP peer (:mod:`qmpnet.testing.fakeqemu`) plays QEMU here,
answering ``device_del`` as QEMU does for a refusing guest (:func:`refuse_unplug`). What is
not QEMU stays real: the tap is made in a fresh netns and checked with ``ip``.

Each unplug is given a long deadline (30 s); a refusal must end it well before (the bound
checked, 10 s, only tells "did not wait for the deadline" apart, it is no timing claim).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from qmpnet import cli
from qmpnet.config import Config, Timeouts
from qmpnet.endpoints import Endpoint
from qmpnet.errors import PlugError, QmpCommandError, UnplugRefusedError, UnplugTimeoutError
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.reconcile import Outcome, reconcile
from qmpnet.store import Entry, Status
from qmpnet.testing.fakeqemu import (
    COMMANDS,
    Client,
    FakeQemu,
    Reply,
    peripheral,
    refuse_unplug,
)
from qmpnet.testing.probe import journal_file, links, saved_ids

DEV = "qn0123456789-dev"
#: the unplug deadline: far longer than a refusal may take to be reported
DEADLINE = 30.0
#: "did not wait for the deadline"
WELL_BEFORE = 10.0
MAC = "52:54:00:00:03:21"


def _refuse_by_path(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    """A refusal of a device QEMU names by its QOM path alone (``device`` is optional)."""
    client.later("DEVICE_UNPLUG_GUEST_ERROR", {"path": peripheral(args["id"])})


def _others_refused_then_deleted(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    """Another device's refusal, then our device goes: the wait must not end at the first."""
    client.later("DEVICE_UNPLUG_GUEST_ERROR", {"device": "other", "path": peripheral("other")})
    client.later("DEVICE_UNPLUG_GUEST_ERROR", {"path": "/machine/unattached/device[7]"})
    COMMANDS["device_del"](peer, client, args)


def _pending_then_refused(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    """QEMU 7.2's answer to a repeated request; the guest then refuses the pending one."""
    client.later(
        "DEVICE_UNPLUG_GUEST_ERROR", {"device": args["id"], "path": peripheral(args["id"])}
    )
    raise Reply(f"Device {args['id']} is already in the process of unplug")


def _hold(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    """A guest that never answers (paused, or without hot-plug support): no event at all."""


# --- the session ---------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "handler",
    [refuse_unplug, _refuse_by_path, _pending_then_refused],
    ids=["id", "path", "pending"],
)
async def test_a_refused_device_del_raises_at_once_with_the_device_and_its_path(
    tmp_path: Path, handler: Any
) -> None:
    with FakeQemu(tmp_path / "qmp.sock") as peer:
        peer.devices.add(DEV)
        peer.commands["device_del"] = handler
        async with await QmpSession.connect(str(tmp_path / "qmp.sock")) as session:
            started = time.monotonic()
            with pytest.raises(UnplugRefusedError) as caught:
                await session.device_del(DEV, DEADLINE)
            took = time.monotonic() - started
            assert took < WELL_BEFORE, f"waited {took:.1f} s: the refusal did not end the wait"
            err = caught.value
            assert (err.device, err.path) == (DEV, peripheral(DEV))
            assert "the guest refused to release the device" in str(err)
            assert cli.exit_code_for(err) == cli.EXIT_QEMU
            # the session goes on, and the bounded listener left nothing queued
            await session.execute("query-status")
            assert session.queued_events == 0
        assert DEV in peer.devices  # QEMU keeps a device whose unplug the guest refused


@pytest.mark.asyncio
async def test_another_devices_refusal_does_not_end_the_wait(tmp_path: Path) -> None:
    with FakeQemu(tmp_path / "qmp.sock") as peer:
        peer.devices.add(DEV)
        peer.commands["device_del"] = _others_refused_then_deleted
        async with await QmpSession.connect(str(tmp_path / "qmp.sock")) as session:
            assert await session.device_del(DEV, DEADLINE) is True
            await session.execute("query-status")
            assert session.queued_events == 0
        assert DEV not in peer.devices


@pytest.mark.asyncio
async def test_a_device_del_error_reply_is_still_a_command_error(tmp_path: Path) -> None:
    """Only the event means a refusal: QEMU refusing the command itself is what it was."""
    with FakeQemu(tmp_path / "qmp.sock") as peer:
        peer.devices.add(DEV)
        peer.fail["device_del"] = "Bus 'rp0' does not support hotplugging"
        async with await QmpSession.connect(str(tmp_path / "qmp.sock")) as session:
            with pytest.raises(QmpCommandError):
                await session.device_del(DEV, DEADLINE)


# --- the front door: a plugged tap NIC, its tap real ----------------------------------------


def _state(state_dir: Path, sock: Path, unplug: float = DEADLINE) -> NetworkState:
    return NetworkState.open(state_dir, str(sock), Config(timeouts=Timeouts(unplug=unplug)))


async def _plug(state: NetworkState, netns: str) -> Endpoint:
    return await state.add_interface(
        InterfaceDescription(name="eth0", hw_addr=MAC),
        model=InterworkingModel.NONE,
        netns_path=netns,
        tap_name="qtap0",
    )


def _whole(peer: FakeQemu, ep: Endpoint, netns: str) -> None:
    """QEMU still has the NIC's device and netdev, the host its tap."""
    assert f"{ep.id}-dev" in peer.devices
    assert f"{ep.id}-net" in peer.netdevs
    assert "qtap0" in links(netns)


@pytest.mark.kernel
@pytest.mark.asyncio
async def test_remove_interface_refused_keeps_the_nic_plugged_and_a_retry_unplugs_it(
    tmp_path: Path, state_dir: Path, netns: str
) -> None:
    """The entry stays ``plugged``, not ``unplug-pending``: QEMU withdrew the refused
    request, and device_del is the unplug's first step, so nothing was torn down."""
    sock = tmp_path / "qmp.sock"
    with FakeQemu(sock) as peer:
        state = _state(state_dir, sock)
        ep = await _plug(state, netns)
        peer.commands["device_del"] = refuse_unplug

        started = time.monotonic()
        with pytest.raises(PlugError) as caught:
            await state.remove_interface(MAC)
        took = time.monotonic() - started
        assert took < WELL_BEFORE, f"waited {took:.1f} s: the refusal did not end the wait"
        err = caught.value
        assert err.step == "device-del"
        assert isinstance(err.cause, UnplugRefusedError)
        assert err.__cause__ is err.cause
        assert (err.cause.device, err.cause.path) == (f"{ep.id}-dev", peripheral(f"{ep.id}-dev"))
        assert cli.exit_code_for(err) == cli.EXIT_QEMU

        # the state as before the request; QEMU and the host too
        assert await state.list_interfaces() == [Entry(ep, Status.PLUGGED)]
        assert saved_ids(state_dir) == {ep.id: "plugged"}
        assert journal_file(state_dir) is None
        _whole(peer, ep, netns)
        # the audit finds it consistent, and does not ask the guest again
        asked = peer.received.count("device_del")
        report = await reconcile(state)
        assert (report.actions, report.consistent, report.errors) == ((), (ep.id,), ())
        assert peer.received.count("device_del") == asked

        # the guest agrees next time: a later del-iface unplugs it completely
        peer.commands["device_del"] = COMMANDS["device_del"]
        assert await state.remove_interface(MAC) == ep
        assert await state.list_interfaces() == []
        assert journal_file(state_dir) is None
        assert (peer.devices, peer.netdevs, peer.fds) == (set(), {}, {})
        assert "qtap0" not in links(netns)


@pytest.mark.kernel
@pytest.mark.asyncio
async def test_a_refused_retry_of_a_pending_unplug_keeps_it_pending(
    tmp_path: Path, state_dir: Path, netns: str
) -> None:
    """An entry already ``unplug-pending`` (an earlier request timed out) keeps that status
    when the guest refuses: a refusal changes nothing. reconcile keeps it pending without an
    error, and completes it once the guest lets the device go."""
    sock = tmp_path / "qmp.sock"
    with FakeQemu(sock) as peer:
        ep = await _plug(_state(state_dir, sock), netns)
        peer.commands["device_del"] = _hold
        with pytest.raises(PlugError) as timed_out:
            await _state(state_dir, sock, unplug=0.3).remove_interface(MAC)
        assert isinstance(timed_out.value.cause, UnplugTimeoutError)
        assert saved_ids(state_dir) == {ep.id: "unplug-pending"}

        state = _state(state_dir, sock)
        peer.commands["device_del"] = refuse_unplug
        started = time.monotonic()
        with pytest.raises(PlugError) as refused:
            await state.remove_interface(MAC)
        assert time.monotonic() - started < WELL_BEFORE
        assert isinstance(refused.value.cause, UnplugRefusedError)
        assert saved_ids(state_dir) == {ep.id: "unplug-pending"}
        assert journal_file(state_dir) is None
        _whole(peer, ep, netns)

        report = await reconcile(state)
        assert [a.outcome for a in report.actions] == [Outcome.PENDING_KEPT], report.lines()
        assert report.ok, report.errors
        assert saved_ids(state_dir) == {ep.id: "unplug-pending"}
        _whole(peer, ep, netns)

        peer.commands["device_del"] = COMMANDS["device_del"]
        report = await reconcile(state)
        assert [a.outcome for a in report.actions] == [Outcome.PENDING_COMPLETED], report.lines()
        assert saved_ids(state_dir) == {}
        assert (peer.devices, peer.netdevs, peer.fds) == (set(), {}, {})
        assert "qtap0" not in links(netns)
