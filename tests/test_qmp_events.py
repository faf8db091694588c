"""QMP events cannot grow memory: only what an operation waits for is kept, and boundedly.

qemu.qmp's default listener queues (and records in a history) every event QEMU sends, for a
reader nobody runs. A peer flooding events took ``add-iface`` to 1 GiB in 20 s, and a kept
session kept three events per plug/unplug cycle forever. Real QEMU cannot be made to flood
events on demand, so the kit's fake QMP peer (:mod:`qmpnet.testing.fakeqemu`) plays the flood;
the kept-session slope against real QEMU is in ``integration/test_soak.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpnet.qmp import EVENT_QUEUE_MAX, BoundedListener, QmpSession, vm_identity
from qmpnet.testing.fakeqemu import Client, FakeQemu

#: The flood: a device_add that QEMU never answers while it sends events as fast as it can,
#: each with 1 KiB of data, DEVICE_DELETED of our own device among them. Run in a process of
#: its own, so its peak RSS is the flood's and not the test runner's.
FLOOD = r"""
import asyncio, json, sys, threading
from pathlib import Path
from qmpnet.errors import QmpTimeoutError
from qmpnet.qmp import QmpSession
from qmpnet.testing.fakeqemu import FakeQemu

def flood(peer, client, args):
    names = ["NIC_RX_FILTER_CHANGED", "DEVICE_DELETED", "RTC_CHANGE"]
    n = 0
    while not peer._stop.is_set():
        data = {"device": "qn0123456789-dev", "path": "x" * 1024}
        client.event(names[n % 3], data)  # raises once the client has gone
        n += 1

async def main(path):
    with FakeQemu(Path(path)) as peer:
        peer.commands["device_add"] = flood
        session = await QmpSession.connect(path, command_timeout=3.0)
        try:
            await session.device_add({"driver": "virtio-net-pci", "id": "qn0123456789-dev"})
        except QmpTimeoutError as err:
            outcome = f"{type(err).__name__}: {err}"
        else:
            outcome = "answered"
        queued = session.queued_events
        await session.close()
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"outcome": outcome, "hwm_kib": hwm, "queued": queued}))

asyncio.run(main(sys.argv[1]))
"""


def test_an_event_flood_during_a_plug_ends_at_the_deadline_in_bounded_memory(
    tmp_path: Path,
) -> None:
    run = subprocess.run(
        [sys.executable, "-c", FLOOD, str(tmp_path / "qmp.sock")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["outcome"] == ("QmpTimeoutError: device_add: no answer from QEMU within 3 s"), (
        result
    )
    assert result["hwm_kib"] < 64 * 1024, result
    assert result["queued"] == 0


def _chatty(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    """device_add as a booting guest answers it: the NIC's rx filter changes, twice."""
    peer.devices.add(args["id"])
    for _ in range(2):
        client.event("NIC_RX_FILTER_CHANGED", {"path": f"/machine/peripheral/{args['id']}"})


@pytest.mark.asyncio
async def test_a_kept_session_queues_no_event_across_plug_unplug_cycles(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with FakeQemu(path) as peer:
        peer.commands["device_add"] = _chatty
        session = await QmpSession.connect(str(path))
        try:
            for cycle in range(100):
                dev = f"qn{cycle:010x}-dev"
                await session.device_add({"driver": "virtio-net-pci", "id": dev})
                assert await session.device_del(dev, timeout=5.0)
                assert session.queued_events == 0, cycle
            await session.execute("query-status")  # the last events have been read
            assert session.queued_events == 0
            assert session._client.events.history == ()
        finally:
            await session.close()


@pytest.mark.asyncio
async def test_a_bounded_listener_keeps_at_most_its_size_and_counts_the_rest() -> None:
    listener = BoundedListener("DEVICE_DELETED", lambda e: e["data"]["device"] == "d")
    for n in range(1000):
        await listener.put({"event": "DEVICE_DELETED", "data": {"device": "d", "n": n}})
        await listener.put({"event": "DEVICE_DELETED", "data": {"device": "other"}})
        await listener.put({"event": "RTC_CHANGE", "data": {}})
    assert listener.qsize() == EVENT_QUEUE_MAX
    assert listener.dropped == 1000 - EVENT_QUEUE_MAX
    assert listener.history == ()
    first = await listener.get()
    assert first["data"]["n"] == 0
    assert len(listener.clear()) == EVENT_QUEUE_MAX - 1
    assert listener.empty()


def test_vm_identity_names_the_listening_process_and_changes_with_it(tmp_path: Path) -> None:
    """A new QEMU on an old socket path is told apart from the dead one (the fake peer stands
    in for QEMU: the identity is the listening process's, whatever it speaks)."""
    path = tmp_path / "qmp.sock"
    assert vm_identity(str(path)) is None  # nothing there
    with FakeQemu(path):
        here = vm_identity(str(path))
    assert here is not None
    assert here.pid == os.getpid()
    stat_line = Path("/proc/self/stat").read_bytes()
    assert here.start_time == int(stat_line[stat_line.rindex(b")") + 2 :].split()[19])
    path.unlink(missing_ok=True)
    other = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "ready"
        new = vm_identity(str(path))
        assert new is not None
        assert new.pid == other.pid
        assert new != here
    finally:
        other.kill()
        other.wait()
        if other.stdout is not None:
            other.stdout.close()


SERVE = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("ready", flush=True)
time.sleep(60)
"""
