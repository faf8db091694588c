"""The saved state and the journal: round trips, damaged files, atomic writes, the lock.

No VM and no kernel objects: files in a temp directory, and one helper process holding the
lock (``flock`` is per open file, so a second process is the honest way to contend for it).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from qmpnet.bandwidth import Bandwidth, Rate
from qmpnet.codec import UnknownEntry
from qmpnet.endpoints import create_endpoint, create_tap_endpoint, net_info_from_interface
from qmpnet.errors import StateError
from qmpnet.model import InterfaceDescription, InterworkingModel, LinkState
from qmpnet.store import Entry, Snapshot, Status, Store


def _veth() -> object:
    desc = InterfaceDescription(name="eth1", hw_addr="52:54:00:00:05:01")
    return create_endpoint(
        net_info_from_interface(desc, InterworkingModel.MACVTAP),
        1,
        InterworkingModel.MACVTAP,
        netns_path="/run/netns/x",
    )


def test_round_trip_keeps_every_field_and_status(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    tap = create_tap_endpoint(0, "eth0", tap_name="tap0_kata", mac="52:54:00:00:05:02")
    snap = Snapshot((Entry(tap), Entry(_veth(), Status.UNPLUG_PENDING)))  # type: ignore[arg-type]
    asyncio.run(store.save(snap))
    assert store.load() == snap
    data = json.loads(store.state_path.read_text())
    assert data["version"] == 1
    assert [e["status"] for e in data["endpoints"]] == ["plugged", "unplug-pending"]
    assert "vm_fds" not in store.state_path.read_text()


def test_an_unchanged_file_reuses_its_snapshot_and_any_write_is_seen(tmp_path: Path) -> None:
    """load() reads the file every time; only the same text gives back the same snapshot.
    Another process's write (here: another Store on the directory, and a hand edit of the
    same length) and damage after a good load are all seen."""
    ours, theirs = Store(tmp_path / "s"), Store(tmp_path / "s")
    taps = [create_tap_endpoint(i, "eth0", tap_name=f"t{i}") for i in range(2)]
    asyncio.run(ours.save(Snapshot((Entry(taps[0]),))))
    first = ours.load()
    assert ours.load() is first
    asyncio.run(theirs.save(Snapshot((Entry(taps[0]), Entry(taps[1], Status.UNPLUG_PENDING)))))
    second = ours.load()
    assert second is not first
    assert [e.status for e in second.entries] == [Status.PLUGGED, Status.UNPLUG_PENDING]
    text = ours.state_path.read_text()
    ours.state_path.write_text(text.replace('"unplug-pending"', '"plugged"       ', 1))
    assert [e.status for e in ours.load().entries] == [Status.PLUGGED, Status.PLUGGED]
    ours.state_path.write_text(text[:-3])
    with pytest.raises(StateError, match="not valid JSON"):
        ours.load()
    # a save writes what the snapshot holds, reused endpoint JSON or not
    asyncio.run(ours.save(second))
    asyncio.run(ours.save(Snapshot(second.entries[1:])))
    assert theirs.load().entries == second.entries[1:]


def test_unknown_entries_are_kept_verbatim(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    store.dir.mkdir()
    alien = {"status": "plugged", "endpoint": {"type": "wireguard", "peer": "x"}}
    odd_status = {"status": "half", "endpoint": {"type": "tap"}}
    store.state_path.write_text(json.dumps({"version": 1, "endpoints": [alien, odd_status, 7]}))
    snap = store.load()
    assert snap.entries == ()
    assert [u.raw for u in snap.unknown] == [alien, odd_status, 7]
    assert all(isinstance(u, UnknownEntry) and u.reason for u in snap.unknown)
    tap = create_tap_endpoint(0, "eth0", tap_name="t0")
    asyncio.run(store.save(Snapshot((Entry(tap),), snap.unknown)))
    written = json.loads(store.state_path.read_text())["endpoints"]
    assert written[1:] == [alien, odd_status, 7]


def test_a_link_set_down_is_saved_and_an_unknown_link_state_is_kept_verbatim(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s")
    up = create_tap_endpoint(0, "eth0", tap_name="t0", mac="52:54:00:00:05:03")
    down = create_tap_endpoint(1, "eth1", tap_name="t1", mac="52:54:00:00:05:04")
    snap = Snapshot((Entry(up), Entry(down, link=LinkState.DOWN)))
    asyncio.run(store.save(snap))
    assert store.load() == snap
    written = json.loads(store.state_path.read_text())["endpoints"]
    assert ["link" in e for e in written] == [False, True]  # up is the default, not written
    assert written[1]["link"] == "down"
    written[0]["link"] = "sideways"
    store.state_path.write_text(json.dumps({"version": 1, "endpoints": written}))
    loaded = store.load()
    assert [e.endpoint.id for e in loaded.entries] == [down.id]
    (kept,) = loaded.unknown
    assert kept.raw == written[0]
    assert "unknown link state 'sideways'" in kept.reason


def test_bandwidth_and_trust_are_saved_only_when_set_and_bad_ones_kept_verbatim(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s")
    plain = create_tap_endpoint(0, "eth0", tap_name="t0", mac="52:54:00:00:05:05")
    shaped = create_tap_endpoint(1, "eth1", tap_name="t1", mac="52:54:00:00:05:06")
    bw = Bandwidth(inbound=Rate(average=2_500_100, burst=99_999))
    snap = Snapshot((Entry(plain), Entry(shaped, bandwidth=bw, trust_rx_filters=True)))
    asyncio.run(store.save(snap))
    assert store.load() == snap
    written = json.loads(store.state_path.read_text())["endpoints"]
    assert ["bandwidth" in e or "trust_rx_filters" in e for e in written] == [False, True]
    assert written[1]["bandwidth"] == {
        "inbound": {"average": 2_500_100, "peak": 0, "burst": 99_999}
    }
    written[0]["bandwidth"] = {"inbound": {"average": -1, "peak": 0, "burst": 0}}
    written[1]["trust_rx_filters"] = "yes"
    store.state_path.write_text(json.dumps({"version": 1, "endpoints": written}))
    loaded = store.load()
    assert loaded.entries == ()
    assert [u.raw for u in loaded.unknown] == written
    assert "unknown bandwidth" in loaded.unknown[0].reason
    assert "unknown trust_rx_filters" in loaded.unknown[1].reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[]", "not a qmpnet state file"),
        (b'{"version": 1}', "not a qmpnet state file"),
        (b'{"version": 2, "endpoints": []}', "state version 2 is not 1"),
    ],
)
def test_damaged_state_file_is_a_state_error(tmp_path: Path, content: bytes, reason: str) -> None:
    store = Store(tmp_path)
    store.state_path.write_bytes(content)
    with pytest.raises(StateError) as info:
        store.load()
    assert info.value.path == str(store.state_path)
    assert reason in info.value.reason


def test_write_is_atomic_and_private(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    asyncio.run(store.save(Snapshot()))
    first = store.state_path.stat().st_ino
    asyncio.run(store.save(Snapshot((Entry(create_tap_endpoint(0, "eth0", tap_name="t0")),))))
    assert store.state_path.stat().st_ino != first, "replaced by rename, not rewritten"
    assert sorted(p.name for p in store.dir.iterdir()) == ["state.json"], "no temp file left"
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.state_path.stat().st_mode) == 0o600


def test_loose_directory_is_tightened(tmp_path: Path) -> None:
    loose = tmp_path / "s"
    loose.mkdir()
    os.chmod(loose, 0o755)
    asyncio.run(Store(loose).save(Snapshot()))
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(StateError):
        asyncio.run(Store(tmp_path / "f").save(Snapshot()))


def test_journal_records_and_ends(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    a = create_tap_endpoint(0, "eth0", tap_name="t0")
    b = create_tap_endpoint(1, "eth1", tap_name="t1")
    assert store.journal() == {}
    asyncio.run(store.journal_begin(a.id, "hot-plug", "validate", a, 10.0))
    asyncio.run(store.journal_begin(a.id, "hot-plug", "device-add", a, 10.0))
    asyncio.run(store.journal_begin(b.id, "unplug", "device-del", b, 11.0))
    records = store.journal()
    assert set(records) == {a.id, b.id}
    assert records[a.id].step == "device-add"
    assert records[a.id].endpoint == a
    assert records[b.id].operation == "unplug"
    assert stat.S_IMODE(store.journal_path.stat().st_mode) == 0o600
    asyncio.run(store.journal_end(a.id))
    assert set(store.journal()) == {b.id}
    asyncio.run(store.journal_end(b.id))
    assert not store.journal_path.exists(), "an empty journal is no file at all"
    asyncio.run(store.journal_end("never-there"))


def test_damaged_journal_records_are_kept_not_fatal(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.journal_path.write_text(
        json.dumps(
            {
                "a": {
                    "operation": "hot-plug",
                    "step": "x",
                    "endpoint": {"type": "nope"},
                    "started": "yesterday",
                },
                "b": [1, 2],
                "c": {"started": 1e400},
            }
        )
    )
    records = store.journal()
    assert set(records) == {"a", "b", "c"}
    assert isinstance(records["a"].endpoint, UnknownEntry)
    assert records["a"].started == 0.0
    assert isinstance(records["b"].endpoint, UnknownEntry)
    store.journal_path.write_text("[1]")
    with pytest.raises(StateError, match="not a qmpnet journal"):
        store.journal()


@pytest.mark.asyncio
async def test_lock_serializes_tasks(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    order: list[str] = []

    async def hold(name: str) -> None:
        async with store.locked():
            order.append(f"{name}+")
            await asyncio.sleep(0.05)
            order.append(f"{name}-")

    await asyncio.gather(hold("a"), hold("b"))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])


@pytest.mark.asyncio
async def test_lock_held_by_another_process_times_out_with_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", lock_timeout=0.3)
    await store.save(Snapshot())
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import fcntl, os, sys\n"
        f"fd = os.open({str(store.dir / 'lock')!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert await holder.stdout.readline() == b"held\n"
        with pytest.raises(StateError, match="another process holds the VM's lock"):
            async with store.locked():
                pass
    finally:
        holder.stdin.close()
        await holder.wait()
    async with store.locked():  # released with the process
        pass


def test_remove_all(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    asyncio.run(store.save(Snapshot()))
    asyncio.run(
        store.journal_begin(
            "k", "hot-plug", "validate", create_tap_endpoint(0, "eth0", tap_name="t0"), 0.0
        )
    )
    asyncio.run(store.remove_all())
    assert not store.dir.exists()


@pytest.mark.asyncio
async def test_reconcile_reports_an_unreadable_entry_and_keeps_it(tmp_path: Path) -> None:
    """An entry this version cannot read may stand for a plugged NIC: reconcile must not
    call the VM consistent (here QEMU is gone: its socket does not exist)."""
    from qmpnet.config import Config
    from qmpnet.network import NetworkState
    from qmpnet.reconcile import reconcile

    store = Store(tmp_path / "s")
    store.dir.mkdir()
    alien = {"status": "plugged", "endpoint": {"type": "wireguard", "peer": "x"}}
    store.state_path.write_text(json.dumps({"version": 1, "endpoints": [alien]}))
    state = NetworkState.open(store.dir, str(tmp_path / "gone.sock"), Config())
    report = await reconcile(state)
    assert not report.ok
    assert any("unreadable state entry" in e for e in report.errors)
    assert [u.raw for u in store.load().unknown] == [alien]


@pytest.mark.asyncio
async def test_reconcile_reports_an_unreadable_journal_record_and_keeps_it(tmp_path: Path) -> None:
    from qmpnet.config import Config
    from qmpnet.network import NetworkState
    from qmpnet.reconcile import Outcome, reconcile

    store = Store(tmp_path / "s")
    store.dir.mkdir()
    record = {
        "operation": "hot-plug",
        "step": "device-add",
        "started": 1.0,
        "endpoint": {"type": "wireguard", "peer": "x"},
    }
    (store.dir / "journal.json").write_text(json.dumps({"qn0123456789": record}))
    state = NetworkState.open(store.dir, str(tmp_path / "gone.sock"), Config())
    report = await reconcile(state)
    [action] = report.actions
    assert (action.outcome, action.endpoint_id, action.step) == (
        Outcome.UNREADABLE,
        "qn0123456789",
        "device-add",
    )
    assert list(store.journal()) == ["qn0123456789"]
