"""The test kit itself (``qmpnet.testing``): the step recorder, the host probes, the leak
check, and that the kit imports without pytest."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from qmpnet.lifecycle import Operation, Phase, Step
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
    assert clock.history() == [(Step.VALIDATE, Phase.BEGIN), (Step.VALIDATE, Phase.DONE),
                               (Step.DEVICE_ADD, Phase.BEGIN), (Step.DEVICE_ADD, Phase.DONE)]
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
