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

The command's code is synchronous (the thin client blocks on its socket): it runs on the
event loop, stops at its request (which the service then answers as any other) and runs
again with the reply, to its end. Its output goes to buffers of its own through a router on
``sys.stdout`` and ``sys.stderr`` (the run's context names its buffers; the rest of the
service writes through to the real streams).
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import io
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO

from qmpnet import cli
from qmpnet.errors import InvalidInputError
from qmpnet.exits import EXIT_INTERNAL
from qmpnet.service import protocol
from qmpnet.service.client import Client, result_of
from qmpnet.service.methods import Caller, Params

#: the most requests one command line makes (each makes one)
REQUESTS_MAX = 4
#: the longest command line the service parses (items, bytes in all), and the longest cwd:
#: argparse's cost grows faster than its input, and it runs on the service's event loop
ARGV_MAX = 256
ARGV_BYTES_MAX = 64 << 10
CWD_MAX = 4096
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


class _NeedReply(cli.Pending):
    """The command line's next request, for the service to answer before the line runs again."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(message.get("method"))
        self.message = message


class _Replay(Client):
    """The thin client's ``Client`` for a line run inside the service: each request is
    answered by a reply the service fetched after an earlier run of the line stopped at it.

    A command reads its input and makes its one request, then prints: running it again
    with the reply is cheaper than a worker thread to block in, and keeps the line's code
    off the event loop's other work only for the sub-millisecond runs themselves.
    """

    def __init__(self, replies: list[bytes]) -> None:
        super().__init__("cli.exec")
        self._replies = replies

    def connect(self) -> None:
        pass

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        made = self._next_id - 1
        self._next_id += 1
        if made < len(self._replies):
            return result_of(self._replies[made])
        # through JSON and back: the method sees what a socket would carry
        raise _NeedReply(
            json.loads(protocol.encode(protocol.request(method, params or {}, made + 1)))
        )


def _internal(why: str) -> dict[str, Any]:
    return {"exit": EXIT_INTERNAL, "stdout": "", "stderr": f"qmpnet: internal error: {why}\n"}


class CliExec:
    """The ``cli.exec`` method."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer

    async def execute(self, p: Params, caller: Caller) -> Any:
        argv, cwd, raw = p.strings("argv"), p.text("cwd"), p.table("files")
        p.done()
        if not os.path.isabs(cwd):
            raise InvalidInputError("cwd", cwd, "must be an absolute path")
        if len(argv) > ARGV_MAX or sum(len(a) for a in argv) > ARGV_BYTES_MAX or len(cwd) > CWD_MAX:
            # nothing done: the caller's own process parses it, at its own cost
            return {"fallback": "a command line longer than the service parses"}
        origin = cli.Origin(cwd, _files(raw))
        _route()
        replies: list[bytes] = []
        while True:
            try:
                done = self._run(argv, origin, replies)
            except Exception as err:
                if not replies:
                    raise  # nothing done yet: an error reply, and the front may fall back
                # a request ran: the front must not run the line again, so this is an answer
                return _internal(f"{type(err).__name__}: {err}")
            if not isinstance(done, _NeedReply):
                return done
            if len(replies) >= REQUESTS_MAX:
                return _internal(f"the command line made more than {REQUESTS_MAX} requests")
            replies.append(protocol.encode(await self._answer(done.message, caller)))

    def _run(
        self, argv: list[str], origin: cli.Origin, replies: list[bytes]
    ) -> dict[str, Any] | _NeedReply:
        """One run of the line, to its end or to a request not answered yet."""
        out, err = io.StringIO(), io.StringIO()
        streams, where = _streams.set((out, err)), cli.ORIGIN.set(origin)
        try:
            args = cli.forwardable(argv)
            if args is None:
                return {"fallback": "not a command line the service runs"}
            try:
                code = cli.serve(args, _Replay(replies))
            except cli.NeedFile as need:
                return {"read": [need.path]}
            except _NeedReply as need:
                return need
            if code is None:
                return {"fallback": "the service refuses this caller"}
            return {"exit": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
        finally:
            cli.ORIGIN.reset(where)
            _streams.reset(streams)
