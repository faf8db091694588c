"""``cli.exec``: a ``qmpnet`` command line run inside qmpnetd for the compiled front.

A Python client process costs its interpreter's start-up, more than the request itself; the
compiled front (``contrib/cli-shim``) costs a few milliseconds and sends its command line
here instead. The command runs through :func:`qmpnet.cli.serve`, the thin client's own code,
so both fronts print the same bytes and exit alike; its requests reach the methods through
:meth:`Server.answer` with the caller's own credentials, as if the caller had sent them.

What the caller's process must do itself is asked of it: relative paths are the caller's
(its ``cwd``), and a file the command reads (the interface JSON, ``-`` for stdin, a config)
is read by the front, in its own mount namespace and with its own rights, and sent on
(``{"read": [path]}`` answers a request that lacks one; files are read before anything is
done). A command line that is not the service's to run (help, a usage error, ``--version``,
``--direct``, ``demo``, a caller the service refuses) answers ``{"fallback": why}``: the front
runs the Python ``qmpnet`` with the same arguments, which says what it says today.

The command's code is synchronous (the thin client blocks on its socket), so it runs in a
worker thread; its output goes to buffers of its own through a router on ``sys.stdout`` and
``sys.stderr`` (each worker's context names its buffers; the rest of the service writes
through to the real streams).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import io
import json
import os
import sys
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TextIO

from qmpnet import cli
from qmpnet.errors import InvalidInputError
from qmpnet.service import protocol
from qmpnet.service.client import Client, result_of
from qmpnet.service.methods import Caller, Params

#: command lines run at once; more wait for a worker
WORKERS = 64
#: the most files one command line reads (an interface and a config)
FILES_MAX = 4

Answer = Callable[[Any, Caller], Coroutine[Any, Any, dict[str, Any]]]

_streams: contextvars.ContextVar[tuple[io.StringIO, io.StringIO] | None] = contextvars.ContextVar(
    "qmpnet_cli_exec_streams", default=None
)


class _Routed(io.TextIOBase):
    """A standard stream that writes to the running command line's buffer, if any."""

    def __init__(self, real: TextIO | None, index: int) -> None:
        self._real = real
        self._index = index

    def write(self, text: str) -> int:
        buffers = _streams.get()
        if buffers is not None:
            return buffers[self._index].write(text)
        if self._real is None:
            return len(text)
        return self._real.write(text)

    def flush(self) -> None:
        if _streams.get() is None and self._real is not None:
            self._real.flush()

    def fileno(self) -> int:
        if self._real is None:
            raise OSError("no stream")
        return self._real.fileno()

    def isatty(self) -> bool:
        return _streams.get() is None and self._real is not None and self._real.isatty()

    def writable(self) -> bool:
        return True


def _route() -> None:
    if not isinstance(sys.stdout, _Routed):
        sys.stdout = _Routed(sys.stdout, 0)
    if not isinstance(sys.stderr, _Routed):
        sys.stderr = _Routed(sys.stderr, 1)


def _files(raw: dict[str, Any]) -> dict[str, bytes | OSError]:
    """The files the front read: ``{"data": base64}`` or ``{"errno": n}`` per path."""
    if len(raw) > FILES_MAX:
        raise InvalidInputError("files", len(raw), f"at most {FILES_MAX}")
    files: dict[str, bytes | OSError] = {}
    for path, got in raw.items():
        if isinstance(got, dict) and isinstance(got.get("errno"), int):
            files[path] = OSError(got["errno"], os.strerror(got["errno"]))
        elif isinstance(got, dict) and isinstance(got.get("data"), str):
            try:
                files[path] = base64.b64decode(got["data"], validate=True)
            except (binascii.Error, ValueError) as err:
                raise InvalidInputError("files", path, f"data is not base64: {err}") from err
        else:
            raise InvalidInputError("files", path, 'must be {"data": base64} or {"errno": n}')
    return files


class _Local(Client):
    """The thin client's ``Client``, answered by this service in-process (from a worker)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answer: Answer, caller: Caller) -> None:
        super().__init__("cli.exec")
        self._loop = loop
        self._answer = answer
        self._caller = caller

    def connect(self) -> None:
        pass

    def __enter__(self) -> _Local:
        return self

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        # through JSON and back, both ways: the methods see what a socket would carry
        message = json.loads(protocol.encode(protocol.request(method, params or {}, self._next_id)))
        self._next_id += 1
        future = asyncio.run_coroutine_threadsafe(self._answer(message, self._caller), self._loop)
        return result_of(protocol.encode(future.result()))


class CliExec:
    """The ``cli.exec`` method."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._pool: ThreadPoolExecutor | None = None

    async def execute(self, p: Params, caller: Caller) -> Any:
        argv, cwd, raw = p.strings("argv"), p.text("cwd"), p.table("files")
        p.done()
        if not os.path.isabs(cwd):
            raise InvalidInputError("cwd", cwd, "must be an absolute path")
        origin = cli.Origin(cwd, _files(raw))
        _route()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="cli.exec")
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        return await loop.run_in_executor(
            self._pool, context.run, self._run, loop, argv, origin, caller
        )

    def _run(
        self, loop: asyncio.AbstractEventLoop, argv: list[str], origin: cli.Origin, caller: Caller
    ) -> dict[str, Any]:
        out, err = io.StringIO(), io.StringIO()
        _streams.set((out, err))
        cli.ORIGIN.set(origin)
        args = cli.forwardable(argv)
        if args is None:
            return {"fallback": "not a command line the service runs"}
        try:
            code = cli.serve(args, _Local(loop, self._answer, caller))
        except cli.NeedFile as need:
            return {"read": [need.path]}
        if code is None:
            return {"fallback": "the service refuses this caller"}
        return {"exit": code, "stdout": out.getvalue(), "stderr": err.getvalue()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
