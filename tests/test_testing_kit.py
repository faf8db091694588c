"""The test kit itself (``qmpnet.testing``): the step recorder, the host probes, the leak
check, and that the kit imports without pytest."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmpnet import demo
from qmpnet.lifecycle import Operation, Phase, Step
from qmpnet.testing import probe
from qmpnet.testing.steps import StepRecorder

MAC = "52:54:00:00:00:07"


def _op(kind: str) -> Operation:
    return Operation(kind, "eth0", subject=SimpleNamespace(id="ep1", hardware_addr=MAC))


@pytest.mark.asyncio
async def test_step_recorder_sees_the_sequence_and_times_it() -> None:
    clock = StepRecorder()
    added = clock.reached(Step.DEVICE_ADD, Phase.DONE, "hot-plug")
    async with _op("hot-plug") as op:
        op.observers.append(clock)

        async def nothing() -> None:
            return None

        await op.step(Step.VALIDATE, nothing)
        await op.step(Step.DEVICE_ADD, nothing)
        op.commit()
    assert clock.history() == [
        (Step.VALIDATE, Phase.BEGIN),
        (Step.VALIDATE, Phase.DONE),
        (Step.DEVICE_ADD, Phase.BEGIN),
        (Step.DEVICE_ADD, Phase.DONE),
    ]
    assert clock.history(kind="unplug") == []
    assert clock.history(mac="52:54:00:00:00:08") == []
    assert [s for s, _ in clock.durations("hot-plug")] == [Step.VALIDATE, Step.DEVICE_ADD]
    assert all(took >= 0 for _, took in clock.durations())
    assert clock.began_at(kind="hot-plug") == clock.events[0].at
    assert clock.ended_at(Step.DEVICE_ADD, mac=MAC) == clock.events[-1].at
    assert clock.last(Step.VALIDATE, Phase.BEGIN) == clock.first(Step.VALIDATE, Phase.BEGIN)
    assert clock.span() == (clock.events[0].at, clock.events[-1].at)
    assert clock.endpoint_id == "ep1"
    event = await asyncio.wait_for(added, 1)
    assert (event.endpoint_id, event.step, event.phase) == ("ep1", Step.DEVICE_ADD, Phase.DONE)
    with pytest.raises(LookupError):
        clock.ended_at(Step.DEVICE_DEL)
    clock.clear()
    assert clock.history() == []


@pytest.fixture
def failing_ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ``ip`` (and ``tc``) first on PATH that fails as the real one does on a bad call."""
    for tool in ("ip", "tc"):
        fake = tmp_path / tool
        fake.write_text("#!/bin/sh\necho 'Cannot talk to rtnetlink' >&2\nexit 2\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


@pytest.mark.usefixtures("failing_ip")
def test_demo_leftovers_raises_when_ip_fails() -> None:
    """A failing ``ip`` must not read as "nothing left"."""
    with pytest.raises(probe.ProbeError, match="Cannot talk to rtnetlink"):
        demo.leftovers("qdxyz", None, [], [])


@pytest.mark.usefixtures("failing_ip")
@pytest.mark.parametrize(
    "view",
    [
        probe.links,
        lambda: probe.links("somens"),
        probe.netns_names,
        lambda: probe.qdiscs("", "lo"),
        lambda: probe.ip_json("addr"),
        lambda: probe.neighbour_mac("lo", "127.0.0.1"),
    ],
    ids=["links", "links-netns", "netns", "qdiscs", "ip_json", "neighbour"],
)
def test_probes_raise_when_the_tool_fails(view: Callable[[], object]) -> None:
    with pytest.raises(probe.ProbeError):
        view()


def test_probe_raises_when_the_tool_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(probe.ProbeError):
        probe.netns_names()


def _state(tmp_path: Path, endpoints: list[object], journal: object = None) -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "state.json").write_text(json.dumps({"version": 1, "endpoints": endpoints}))
    if journal is not None:
        (tmp_path / "journal.json").write_text(json.dumps(journal))
    return tmp_path


def test_state_leak_check_catches_a_leftover_entry(tmp_path: Path) -> None:
    """The after-test check reads the key the state file really has (``endpoints``)."""
    assert probe.state_leftovers(_state(tmp_path / "empty", [])) == []
    assert probe.state_leftovers(tmp_path / "none") == []
    left = probe.state_leftovers(_state(tmp_path / "one", [{"endpoint": {}, "status": "plugged"}]))
    assert left == [f"{tmp_path / 'one'}/state.json still lists 1 interface(s)"]
    busy = probe.state_leftovers(_state(tmp_path / "busy", [], {"ep1": {"op": "hot-plug"}}))
    assert busy == [f"{tmp_path / 'busy'}/journal.json has operations in flight"]
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "state.json").write_text(json.dumps({"version": 1, "entries": []}))
    assert probe.state_leftovers(tmp_path / "odd"), "a file without 'endpoints' is a problem"
