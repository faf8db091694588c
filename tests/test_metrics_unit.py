"""qmpnetd's step metrics, from real Operations (no QEMU: the steps are plain coroutines)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from qmpnet.lifecycle import Operation, OpKind, Step
from qmpnet.service.metrics import Metrics


def _count(metrics: Metrics, step: str) -> float:
    value = metrics.registry.get_sample_value(
        "qmpnet_step_seconds_count", {"kind": "hot-plug", "step": step}
    )
    return value or 0.0


@pytest.mark.asyncio
async def test_a_step_cancelled_mid_way_leaves_no_timer_behind() -> None:
    metrics = Metrics()

    async def done() -> None:
        return None

    async def forever() -> None:
        await asyncio.Event().wait()

    async def plug(action: object) -> None:
        async with Operation(OpKind.HOT_PLUG, "eth0", observers=[metrics.observe]) as op:
            await op.step(Step.NETDEV_ADD, action)  # type: ignore[arg-type]
            op.commit()

    await plug(done)
    assert _count(metrics, "netdev-add") == 1

    async def cancelled() -> None:
        task = asyncio.create_task(plug(forever))
        await asyncio.sleep(0.01)
        assert len(metrics._began) == 1
        task.cancel()
        await asyncio.wait([task])
        assert task.cancelled()

    await cancelled()
    gc.collect()
    assert len(metrics._began) == 0  # the cancelled operation's start went with it
    await plug(done)
    assert _count(metrics, "netdev-add") == 2
