"""Poll what sends no event, with a deadline: the one loop qmpnet writes for it.

Where QEMU or the kernel announces a change, wait for the announcement; what has none (a
guest driver's DRIVER_OK, a netlink change lagging its syscall, a ``flock`` held by another
process) is polled here: on a steady interval, or one that doubles up to a cap, until the
probe returns something truthy or the deadline passes.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def poll_until(
    probe: Callable[[], Awaitable[T]],
    *,
    error: Callable[[], BaseException],
    timeout: float | None = ...,
    deadline: float | None = ...,
    interval: float,
    cap: float | None = ...,
    pause: Callable[[float], Awaitable[object]] = ...,
    pause_first: bool = ...,
) -> T: ...


@overload
async def poll_until(
    probe: Callable[[], T],
    *,
    error: Callable[[], BaseException],
    timeout: float | None = ...,
    deadline: float | None = ...,
    interval: float,
    cap: float | None = ...,
    pause: Callable[[float], Awaitable[object]] = ...,
    pause_first: bool = ...,
) -> T: ...


async def poll_until(
    probe: Callable[[], Any],
    *,
    error: Callable[[], BaseException],
    timeout: float | None = None,
    deadline: float | None = None,
    interval: float,
    cap: float | None = None,
    pause: Callable[[float], Awaitable[object]] = asyncio.sleep,
    pause_first: bool = False,
) -> Any:
    """Call ``probe`` (sync or async) until it returns a truthy value, and return that.

    Give either ``timeout`` (seconds from now) or ``deadline`` (a ``time.monotonic()``
    instant). The probe runs at least once; once it fails after the deadline,
    ``error()`` is raised. Between probes the poll pauses ``interval`` seconds, doubling
    up to ``cap`` when one is given, never past the deadline. ``pause`` replaces the sleep
    (a wait that an event can cut short); ``pause_first`` pauses before the first probe too.
    An exception from the probe or the pause propagates as it is.
    """
    if (timeout is None) == (deadline is None):
        raise TypeError("poll_until needs exactly one of timeout and deadline")
    end = time.monotonic() + timeout if timeout is not None else deadline
    assert end is not None
    delay = interval
    if pause_first:
        await pause(min(delay, max(end - time.monotonic(), 0.0)))
        delay = _next(delay, cap)
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        remaining = end - time.monotonic()
        if remaining < 0:
            raise error()
        await pause(min(delay, remaining))
        delay = _next(delay, cap)


def _next(delay: float, cap: float | None) -> float:
    return delay if cap is None else min(delay * 2, cap)
