"""A lifecycle observer that records every (step, phase) of the operations it sees.

Add a :class:`StepRecorder` to ``NetworkState.observers``; it stamps each notification with
``time.monotonic()`` (one clock for the event loop, worker threads and other processes), so
the tests and the benches can assert the exact sequence of steps, time each step, and
subtract a stamp from a console marker's. It keeps what it saw until :meth:`clear`: scope
it to the operations being looked at.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import attrs

from qmpnet.lifecycle import Operation, Phase, Step


@attrs.frozen
class StepEvent:
    """One notification: which operation, which step and phase, and when."""

    #: the operation's kind: ``hot-plug``, ``unplug``, ``reconcile``, ``forget``
    kind: str
    #: the endpoint's id and MAC (empty while the operation has no endpoint)
    endpoint_id: str
    mac: str
    step: Step
    phase: Phase
    #: ``time.monotonic()`` when the observer was told
    at: float


@attrs.define(eq=False)
class StepRecorder:
    """Records (step, phase, time) of every operation; selectors narrow by kind and MAC."""

    events: list[StepEvent] = attrs.field(factory=list)
    _waiters: list[tuple[Step, Phase, str | None, asyncio.Future[StepEvent]]] = attrs.field(
        factory=list
    )

    def __call__(self, op: Operation, step: Step, phase: Phase) -> None:
        subject = op.subject
        event = StepEvent(
            op.kind,
            str(getattr(subject, "id", "")),
            str(getattr(subject, "hardware_addr", "")),
            step,
            phase,
            time.monotonic(),
        )
        self.events.append(event)
        waiting = []
        for waiter in self._waiters:
            w_step, w_phase, w_kind, future = waiter
            if future.done():
                continue  # cancelled: dropped
            if (w_step, w_phase) == (step, phase) and w_kind in (None, op.kind):
                future.set_result(event)
            else:
                waiting.append(waiter)
        self._waiters[:] = waiting

    def clear(self) -> None:
        """Forget what was seen (waiters still wait)."""
        self.events.clear()

    def select(self, kind: str | None = None, mac: str | None = None) -> Iterator[StepEvent]:
        """The events of operations of ``kind`` on ``mac`` (``None``: any), in order."""
        return (
            e
            for e in self.events
            if (kind is None or e.kind == kind) and (mac is None or e.mac == mac)
        )

    def history(
        self,
        kind: str | None = None,
        mac: str | None = None,
    ) -> list[tuple[Step, Phase]]:
        """(step, phase) in the order seen, as ``Operation.history`` has it."""
        return [(e.step, e.phase) for e in self.select(kind, mac)]

    @property
    def endpoint_id(self) -> str:
        """The id of the last endpoint an operation acted on (empty if none had one)."""
        ids = [e.endpoint_id for e in self.events if e.endpoint_id]
        return ids[-1] if ids else ""

    def durations(
        self,
        kind: str | None = None,
        mac: str | None = None,
    ) -> list[tuple[Step, float]]:
        """(step, seconds from its BEGIN to its DONE), in the order the steps ended."""
        begun: dict[Step, float] = {}
        out = []
        for e in self.select(kind, mac):
            if e.phase is Phase.BEGIN:
                begun[e.step] = e.at
            elif e.phase is Phase.DONE and e.step in begun:
                out.append((e.step, e.at - begun.pop(e.step)))
        return out

    def first(
        self, step: Step | None, phase: Phase, *, kind: str | None = None, mac: str | None = None
    ) -> float:
        """When (step, phase) was first seen; ``step=None``: any step."""
        for e in self.select(kind, mac):
            if e.phase is phase and (step is None or e.step is step):
                return e.at
        raise LookupError(
            f"no {step or 'step'} {phase} of {kind or 'any operation'} "
            f"{mac or ''} among {len(self.events)} events"
        )

    def last(
        self, step: Step, phase: Phase, *, kind: str | None = None, mac: str | None = None
    ) -> float:
        """When (step, phase) was last seen (a MAC plugged twice: its latest plug)."""
        found = [e.at for e in self.select(kind, mac) if e.step is step and e.phase is phase]
        if not found:
            raise LookupError(
                f"no {step} {phase} of {kind or 'any operation'} {mac or ''} "
                f"among {len(self.events)} events"
            )
        return found[-1]

    def span(self) -> tuple[float, float]:
        """When the first and the last notification came."""
        if not self.events:
            raise LookupError("no step was seen")
        return self.events[0].at, self.events[-1].at

    def began_at(
        self, step: Step | None = None, *, kind: str | None = None, mac: str | None = None
    ) -> float:
        """When ``step`` (``None``: the first step) first began."""
        return self.first(step, Phase.BEGIN, kind=kind, mac=mac)

    def ended_at(
        self,
        step: Step,
        *,
        kind: str | None = None,
        mac: str | None = None,
    ) -> float:
        """When ``step`` was first done."""
        return self.first(step, Phase.DONE, kind=kind, mac=mac)

    def reached(
        self,
        step: Step,
        phase: Phase,
        kind: str | None = None,
    ) -> asyncio.Future[StepEvent]:
        """A future of the next time an operation (of ``kind``) reaches (step, phase).

        Registered at once, so take it before starting the operation; cancel it to give up.
        """
        future: asyncio.Future[StepEvent] = asyncio.get_running_loop().create_future()
        self._waiters.append((step, phase, kind, future))
        return future
