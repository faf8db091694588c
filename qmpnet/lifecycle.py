"""A hot-plug or unplug as a visible sequence of named steps, each with its undo.

``Operation.step`` runs one step: it tells the observers the step begins (the journal writes
its intent durably there), runs it, and pushes its undo on a stack *before* the next step can
run. If a later step fails, ``Operation`` unwinds the stack in reverse order, tells the
observers about each undo, and raises :class:`PlugError` naming the failed step, chained to
the typed cause. Undo failures are logged and collected, never allowed to hide the cause.

Observers make the sequence testable (a test asserts the exact order, undo included) and
let a crash test stop the process at a named step, without test hooks in this code.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

import attrs

from qmpnet.errors import PlugError, QemuHoldsError, QmpnetError
from qmpnet.logs import fields

log = logging.getLogger(__name__)

T = TypeVar("T")


class Step(enum.StrEnum):
    """The named steps of a hot-plug (first group) and an unplug (second group)."""

    VALIDATE = "validate"
    PREPARE_LINKS = "prepare-links"
    OPEN_QUEUES = "open-queues"
    SHAPE = "shape"
    OPEN_VHOST = "open-vhost"
    PASS_FDS = "pass-fds"
    NETDEV_ADD = "netdev-add"
    DEVICE_ADD = "device-add"
    SET_LINK = "set-link"
    WAIT_GUEST = "wait-guest"
    ANNOUNCE = "announce"
    PERSIST = "persist"

    DEVICE_DEL = "device-del"
    NETDEV_DEL = "netdev-del"
    REMOVE_LINKS = "remove-links"
    FORGET = "forget"

    @property
    def changes_things(self) -> bool:
        """Whether the step can change the host, QEMU or the state (all but validation)."""
        return self is not Step.VALIDATE

    @property
    def gives_qemu(self) -> bool:
        """Whether the step hands QEMU something it may go on holding if its undo fails."""
        return self in (Step.PASS_FDS, Step.NETDEV_ADD, Step.DEVICE_ADD)


class OpKind(enum.StrEnum):
    """What an operation does; the journal records it, recovery decides by it."""

    HOT_PLUG = "hot-plug"
    UNPLUG = "unplug"
    #: host-side cleanup of an endpoint whose QEMU part is gone or already removed
    TEARDOWN = "teardown"


class Phase(enum.StrEnum):
    BEGIN = "begin"
    DONE = "done"
    FAILED = "failed"
    UNDO = "undo"
    UNDO_FAILED = "undo-failed"


#: An observer sees (operation, step, phase); it may be async.
Observer = Callable[["Operation", Step, Phase], Awaitable[None] | None]


@attrs.define(eq=False)
class Operation:
    """One plug or unplug of one endpoint; use as ``async with`` and call :meth:`commit`."""

    kind: OpKind = attrs.field(converter=OpKind)
    endpoint: str
    #: what the operation acts on (an endpoint); observers such as the journal save it.
    subject: Any = None
    observers: list[Observer] = attrs.field(factory=list)
    history: list[tuple[Step, Phase]] = attrs.field(factory=list)
    undo_errors: list[BaseException] = attrs.field(factory=list)
    #: an undo of a step that gave QEMU something failed: QEMU may still hold the NIC
    _qemu_holds: bool = False
    _stack: AsyncExitStack = attrs.field(factory=AsyncExitStack)
    _committed: bool = False

    async def __aenter__(self) -> Operation:
        await self._stack.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None and not self._committed:
            # Leaving without commit is a bug in the caller: undo rather than leave half-made.
            log.error("%s of %s left without commit: undoing", self.kind, self.endpoint)
        if self._committed:
            self._stack.pop_all()
            return False
        await self._stack.aclose()
        return False

    def commit(self) -> None:
        """The operation is complete: its undo stack is dropped."""
        self._committed = True

    @property
    def committed(self) -> bool:
        return self._committed

    async def _notify(self, step: Step, phase: Phase) -> None:
        self.history.append((step, phase))
        for observer in self.observers:
            result = observer(self, step, phase)
            if inspect.isawaitable(result):
                await result

    async def step(
        self,
        step: Step,
        action: Callable[[], Awaitable[T]],
        undo: Callable[[T], Awaitable[None]] | None = None,
    ) -> T:
        """Run one step; register its undo at once; wrap a failure as PlugError(step)."""
        await self._notify(step, Phase.BEGIN)
        try:
            with fields(step=step.value):
                result = await action()
        except (QmpnetError, OSError) as err:
            await self._notify(step, Phase.FAILED)
            if isinstance(err, PlugError):
                raise
            raise PlugError(self.kind, step.value, self.endpoint, err) from err
        if undo is not None:
            self._stack.push_async_callback(self._run_undo, step, undo, result)
        await self._notify(step, Phase.DONE)
        return result

    def on_undo(self, step: Step, undo: Callable[[], Awaitable[None]]) -> None:
        """Register an undo for work done outside :meth:`step` (e.g. a resource opened)."""

        async def call(_: None) -> None:
            await undo()

        self._stack.push_async_callback(self._run_undo, step, call, None)

    async def _run_undo(
        self, step: Step, undo: Callable[[Any], Awaitable[None]], result: Any
    ) -> None:
        if step is Step.PREPARE_LINKS and self._qemu_holds:
            # QEMU may still hold the NIC and its netdev (their undo failed: QEMU hung, the
            # guest holding on): deleting the tap under them now is what QEMU 7.2 cannot
            # survive once the guest resets a multiqueue NIC. The links stay for the
            # journal's rollback, which removes the device and netdev first.
            held = QemuHoldsError(self.endpoint)
            self.undo_errors.append(held)
            log.warning("%s of %s: %s", self.kind, self.endpoint, held)
            await self._notify(step, Phase.UNDO_FAILED)
            return
        try:
            with fields(step=f"undo {step.value}"):
                await undo(result)
        except Exception as err:  # keep unwinding: one failed undo must not stop the others
            self.undo_errors.append(err)
            self._qemu_holds = self._qemu_holds or step.gives_qemu
            log.error("%s of %s: undo of %s failed: %s", self.kind, self.endpoint, step, err)
            log.debug("undo traceback", exc_info=True)
            await self._notify(step, Phase.UNDO_FAILED)
            return
        except BaseException as err:
            # Cancelled again while undoing: this undo did not finish. Recorded, so the
            # journal is kept for the next operation; the later undos still run (the exit
            # stack goes on) and the cancellation propagates.
            self.undo_errors.append(err)
            log.error("%s of %s: undo of %s interrupted: %r", self.kind, self.endpoint, step, err)
            raise
        await self._notify(step, Phase.UNDO)
