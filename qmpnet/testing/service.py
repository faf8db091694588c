"""qmpnetd as a test runs it: a subprocess with its own socket and state root, reaped after.

``async with await ServiceProcess.start(workdir) as svc:`` launches ``qmpnetd`` (or a
launcher script that runs it with lifecycle observers, as the crash drills do), waits for its
ready line, and on the way out stops it with SIGTERM (SIGKILL after a deadline) — only the
process it started, by pid. ``svc.env`` points a ``qmpnet`` client at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import attrs

READY = "qmpnetd: ready on"
#: the stderr reader's line limit: at -vv the service logs whole QMP replies (query-pci of a
#: VM with 8 NICs is longer than asyncio's 64 KiB default); a reader that stopped on a long
#: line would leave the pipe full and block the service's next log write, and so every request
LINE_LIMIT = 1 << 24
#: lines of the service's stderr kept for a failing test's message
TAIL = 200


@attrs.define(eq=False)
class ServiceProcess:
    socket: Path
    root: Path
    _proc: asyncio.subprocess.Process
    _lines: list[str] = attrs.field(factory=list)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        workdir: Path,
        *,
        args: Sequence[str] = (),
        launcher: Sequence[str] | None = None,
        root: Path | None = None,
        socket: Path | None = None,
        ready_timeout: float = 120.0,
        verbose: int = 2,
    ) -> Self:
        """Start the service; ``launcher`` replaces ``python -m qmpnet.service.daemon``.

        Tests log at debug (``verbose=2``, every QMP message); a bench measures at info, as a
        node runs it.
        """
        socket = socket or workdir / "svc" / "qmpnetd.sock"
        root = root or workdir / "root"
        command = [
            *(launcher or [sys.executable, "-m", "qmpnet.service.daemon"]),
            "--socket",
            str(socket),
            "--state-root",
            str(root),
            "-" + "v" * max(verbose, 1),
            *args,
        ]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=LINE_LIMIT,
        )
        svc = cls(socket, root, proc)
        ready = asyncio.get_running_loop().create_future()
        svc._reader = asyncio.create_task(svc._read(ready))
        try:
            await asyncio.wait_for(asyncio.shield(ready), ready_timeout)
        except (TimeoutError, EOFError) as err:
            await svc.kill()
            raise RuntimeError(f"qmpnetd did not get ready: {svc.tail()}") from err
        return svc

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self._proc.stderr is not None
        while True:
            try:
                line = await self._proc.stderr.readline()
            except ValueError:  # longer than LINE_LIMIT: keep draining, cut into chunks
                line = await self._proc.stderr.read(LINE_LIMIT)
            if not line:
                break
            text = line.decode(errors="replace").rstrip("\n")
            self._lines.append(text)
            del self._lines[:-TAIL]
            if READY in text and not ready.done():
                ready.set_result(None)
        if not ready.done():
            ready.set_exception(EOFError("qmpnetd exited"))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def env(self) -> dict[str, str]:
        return {"QMPNET_SOCKET": str(self.socket), "QMPNET_STATE_ROOT": str(self.root)}

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def tail(self, n: int = 60) -> str:
        return "\n".join(self._lines[-n:])

    def lines(self) -> list[str]:
        return list(self._lines)

    async def wait(self, timeout: float = 60.0) -> int:
        rc = await asyncio.wait_for(self._proc.wait(), timeout)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader
        return rc

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns its exit status."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except TimeoutError:
                await self.kill()
        return self._proc.returncode if self._proc.returncode is not None else -9

    async def kill(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await self.wait(30.0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
