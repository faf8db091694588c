"""poll_until: the one poll-with-deadline loop; its intervals, its deadline, its error.

The pauses are recorded through ``pause`` (no sleeping), so the interval schedule is asserted
exactly, and no test depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from qmpnet.poll import poll_until


class Pauses:
    """A ``pause`` that records what it was asked to wait and waits nothing."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)


class Sleeps(Pauses):
    """Records, and sleeps for real (for a deadline that has to pass)."""

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        await asyncio.sleep(seconds)


class Late(Exception):
    pass


def _answers(*values: object) -> Callable[[], object]:
    """A sync probe that returns ``values`` in turn."""
    it = iter(values)
    return lambda: next(it)


@pytest.mark.asyncio
async def test_returns_the_first_truthy_value_of_a_sync_probe() -> None:
    pauses = Pauses()
    got = await poll_until(
        _answers(0, "", None, "yes"), timeout=60, interval=0.01, error=Late, pause=pauses
    )
    assert got == "yes"
    assert pauses.asked == [0.01, 0.01, 0.01]  # steady without a cap


@pytest.mark.asyncio
async def test_an_async_probe_is_awaited() -> None:
    calls = 0

    async def probe() -> int:
        nonlocal calls
        calls += 1
        return calls if calls == 3 else 0

    assert await poll_until(probe, timeout=60, interval=0, error=Late, pause=Pauses()) == 3


@pytest.mark.asyncio
async def test_the_interval_doubles_up_to_the_cap() -> None:
    pauses = Pauses()
    await poll_until(
        _answers(*[False] * 6, True), timeout=60, interval=0.01, cap=0.05, error=Late, pause=pauses
    )
    assert pauses.asked == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05, 0.05])


@pytest.mark.asyncio
async def test_past_the_deadline_the_callers_error_is_raised() -> None:
    probes = 0

    def never() -> bool:
        nonlocal probes
        probes += 1
        return False

    started = time.monotonic()
    with pytest.raises(Late, match="too late"):
        await poll_until(
            never, timeout=0.05, interval=0.005, cap=0.01, error=lambda: Late("too late")
        )
    assert time.monotonic() - started >= 0.05
    assert probes > 2


@pytest.mark.asyncio
async def test_the_probe_runs_once_even_with_no_time_left() -> None:
    pauses = Pauses()
    assert await poll_until(_answers(True), timeout=0, interval=1, error=Late, pause=pauses) is True
    with pytest.raises(Late):
        await poll_until(
            _answers(False), deadline=time.monotonic() - 1, interval=1, error=Late, pause=pauses
        )
    assert pauses.asked == []


@pytest.mark.asyncio
async def test_a_pause_never_runs_past_the_deadline() -> None:
    pauses = Sleeps()
    with pytest.raises(Late):
        await poll_until(lambda: False, timeout=0.05, interval=10, error=Late, pause=pauses)
    assert pauses.asked
    assert all(asked <= 0.05 for asked in pauses.asked)


@pytest.mark.asyncio
async def test_pause_first_waits_before_the_first_probe() -> None:
    events: list[str] = []

    async def pause(seconds: float) -> None:
        events.append(f"pause {seconds:g}")

    def probe() -> bool:
        events.append("probe")
        return len(events) > 3

    await poll_until(
        probe, timeout=60, interval=0.05, cap=0.5, pause=pause, pause_first=True, error=Late
    )
    assert events == ["pause 0.05", "probe", "pause 0.1", "probe"]


@pytest.mark.asyncio
async def test_an_error_of_the_probe_propagates() -> None:
    def broken() -> bool:
        raise OSError(5, "EIO")

    with pytest.raises(OSError, match="EIO"):
        await poll_until(broken, timeout=60, interval=0, error=Late)


@pytest.mark.asyncio
async def test_exactly_one_of_timeout_and_deadline() -> None:
    with pytest.raises(TypeError):
        await poll_until(lambda: True, interval=0, error=Late)
    with pytest.raises(TypeError):
        await poll_until(lambda: True, timeout=1, deadline=time.monotonic(), interval=0, error=Late)
