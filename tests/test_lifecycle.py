"""lifecycle.Operation: the exact sequence of steps and phases, undo included.

The steps here are plain coroutines: what is under test is the ordering contract (each
undo registered before the next step runs, unwound in reverse, the cause kept), which the
kernel and QEMU tiers then rely on.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

import pytest

from qmpnet.errors import HostError, PlugError, QmpCommandError
from qmpnet.lifecycle import Operation, Phase, Step

B, D, F, U, UF = Phase.BEGIN, Phase.DONE, Phase.FAILED, Phase.UNDO, Phase.UNDO_FAILED


class Recorder:
    """An observer that records (step, phase); async, like the journal's may be."""

    def __init__(self) -> None:
        self.seen: list[tuple[Step, Phase]] = []

    async def __call__(self, op: Operation, step: Step, phase: Phase) -> None:
        assert op.kind in ("hot-plug", "unplug")
        self.seen.append((step, phase))


def _ok(
    value: object = None, log: list[str] | None = None, name: str = ""
) -> Callable[[], Awaitable[object]]:
    async def action() -> object:
        if log is not None:
            log.append(f"do {name}")
        return value

    return action


def _undo(
    log: list[str], name: str, fail: BaseException | None = None
) -> Callable[[object], Awaitable[None]]:
    async def undo(result: object) -> None:
        log.append(f"undo {name} {result}")
        if fail is not None:
            raise fail

    return undo


async def _fail(err: BaseException) -> None:
    raise err


@pytest.mark.asyncio
async def test_success_runs_steps_in_order_and_commit_drops_the_undos() -> None:
    rec, log = Recorder(), list[str]()
    async with Operation("hot-plug", "eth0", observers=[rec]) as op:
        assert await op.step(Step.OPEN_QUEUES, _ok([3, 4], log, "q"), _undo(log, "q")) == [3, 4]
        await op.step(Step.NETDEV_ADD, _ok(None, log, "n"), _undo(log, "n"))
        await op.step(Step.DEVICE_ADD, _ok("01/00", log, "d"), _undo(log, "d"))
        op.commit()
    assert log == ["do q", "do n", "do d"]  # no undo ran
    assert rec.seen == [
        (Step.OPEN_QUEUES, B),
        (Step.OPEN_QUEUES, D),
        (Step.NETDEV_ADD, B),
        (Step.NETDEV_ADD, D),
        (Step.DEVICE_ADD, B),
        (Step.DEVICE_ADD, D),
    ]
    assert op.history == rec.seen
    assert op.undo_errors == []


@pytest.mark.asyncio
async def test_failure_undoes_earlier_steps_in_reverse_and_names_the_step() -> None:
    rec, log = Recorder(), list[str]()
    cause = QmpCommandError("device_add", {"id": "x"}, "GenericError", "Bus 'rp0' is full")
    op = Operation("hot-plug", "eth0", observers=[rec])

    async def plug() -> None:
        async with op:
            await op.step(Step.OPEN_QUEUES, _ok("fds"), _undo(log, "queues"))
            await op.step(Step.PASS_FDS, _ok("names"), _undo(log, "fds"))
            await op.step(Step.NETDEV_ADD, _ok("net"), _undo(log, "netdev"))
            await op.step(Step.DEVICE_ADD, lambda: _fail(cause), _undo(log, "device"))
            pytest.fail("not reached")

    with pytest.raises(PlugError) as caught:
        await plug()
    err = caught.value
    assert (err.operation, err.step, err.endpoint) == ("hot-plug", "device-add", "eth0")
    assert err.cause is cause
    assert err.__cause__ is cause
    assert "step device-add failed" in str(err)
    assert "Bus 'rp0' is full" in str(err)
    assert log == ["undo netdev net", "undo fds names", "undo queues fds"]
    assert rec.seen == [
        (Step.OPEN_QUEUES, B),
        (Step.OPEN_QUEUES, D),
        (Step.PASS_FDS, B),
        (Step.PASS_FDS, D),
        (Step.NETDEV_ADD, B),
        (Step.NETDEV_ADD, D),
        (Step.DEVICE_ADD, B),
        (Step.DEVICE_ADD, F),
        (Step.NETDEV_ADD, U),
        (Step.PASS_FDS, U),
        (Step.OPEN_QUEUES, U),
    ]


@pytest.mark.asyncio
async def test_on_undo_is_registered_before_its_step_runs() -> None:
    """Work a step did before failing (fds sent before a getfd error) is released too."""
    log: list[str] = []

    async def pass_some() -> None:
        log.append("sent fd0")
        raise OSError(errno.EPIPE, "broken pipe")

    async def release() -> None:
        log.append("closefd fd0")

    op = Operation("hot-plug", "eth0")

    async def plug() -> None:
        async with op:
            await op.step(Step.OPEN_QUEUES, _ok("fds"), _undo(log, "queues"))
            op.on_undo(Step.PASS_FDS, release)
            await op.step(Step.PASS_FDS, pass_some)

    with pytest.raises(PlugError) as caught:
        await plug()
    assert caught.value.step == "pass-fds"
    assert isinstance(caught.value.cause, OSError)
    assert log == ["sent fd0", "closefd fd0", "undo queues fds"]
    assert op.history[-3:] == [(Step.PASS_FDS, F), (Step.PASS_FDS, U), (Step.OPEN_QUEUES, U)]


@pytest.mark.asyncio
async def test_failed_undos_are_collected_and_do_not_hide_the_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    cause = HostError("open tap queue", "tap0", errno.EBUSY)
    undo_err = HostError("delete link", "tap0", errno.EPERM)
    op = Operation("hot-plug", "eth0")

    async def plug() -> None:
        async with op:
            await op.step(Step.VALIDATE, _ok(1), _undo(log, "a"))
            await op.step(Step.PREPARE_LINKS, _ok(2), _undo(log, "b", fail=undo_err))
            await op.step(Step.OPEN_VHOST, _ok(3), _undo(log, "c", fail=RuntimeError("boom")))
            await op.step(Step.OPEN_QUEUES, lambda: _fail(cause))

    with (
        caplog.at_level(logging.ERROR, logger="qmpnet.lifecycle"),
        pytest.raises(PlugError) as caught,
    ):
        await plug()
    assert caught.value.cause is cause  # not an undo error
    assert caught.value.step == "open-queues"
    assert log == ["undo c 3", "undo b 2", "undo a 1"]  # a failed undo does not stop the rest
    first, second = op.undo_errors  # in unwinding order
    assert isinstance(first, RuntimeError)
    assert second is undo_err
    assert op.history[-4:] == [
        (Step.OPEN_QUEUES, F),
        (Step.OPEN_VHOST, UF),
        (Step.PREPARE_LINKS, UF),
        (Step.VALIDATE, U),
    ]
    assert sum("undo of" in r.message for r in caplog.records) == 2


@pytest.mark.asyncio
async def test_a_plug_error_from_a_nested_step_is_not_wrapped_twice() -> None:
    inner = PlugError(
        "hot-plug",
        "netdev-add",
        "eth0",
        QmpCommandError("netdev_add", {}, "GenericError", "Duplicate ID"),
    )
    with pytest.raises(PlugError) as caught:
        async with Operation("hot-plug", "eth0") as op:
            await op.step(Step.DEVICE_ADD, lambda: _fail(inner))
    assert caught.value is inner


@pytest.mark.asyncio
async def test_an_unexpected_exception_still_unwinds_and_propagates_unchanged() -> None:
    log: list[str] = []
    op = Operation("unplug", "eth0")

    async def unplug() -> None:
        async with op:
            await op.step(Step.DEVICE_DEL, _ok("d"), _undo(log, "d"))
            await op.step(Step.NETDEV_DEL, lambda: _fail(ZeroDivisionError()))

    with pytest.raises(ZeroDivisionError):
        await unplug()
    assert log == ["undo d d"]
    assert (Step.NETDEV_DEL, B) in op.history
    assert (Step.NETDEV_DEL, F) not in op.history


@pytest.mark.asyncio
async def test_leaving_without_commit_undoes(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    with caplog.at_level(logging.ERROR, logger="qmpnet.lifecycle"):
        async with Operation("hot-plug", "eth0") as op:
            await op.step(Step.OPEN_QUEUES, _ok("q"), _undo(log, "q"))
    assert log == ["undo q q"]
    assert "left without commit" in caplog.text


@pytest.mark.asyncio
async def test_sync_observers_are_called_too() -> None:
    seen = []
    async with Operation(
        "hot-plug", "eth0", observers=[lambda op, s, p: seen.append((s, p))]
    ) as op:
        await op.step(Step.PERSIST, _ok())
        op.commit()
    assert seen == [(Step.PERSIST, B), (Step.PERSIST, D)]
