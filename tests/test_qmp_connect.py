"""A failed connect says why in ``QmpConnectError.kind``: gone, busy, or not a monitor.

Callers act on the kind (a reconcile cleans up after a QEMU that is gone; the CNI plugin says
"try again" to a busy monitor), so each kind is pinned here against a real unix socket.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from qmpnet.errors import ConnectFailure, QmpConnectError
from qmpnet.qmp import QmpSession


async def _kind(path: Path, connect_timeout: float = 5.0) -> QmpConnectError:
    with pytest.raises(QmpConnectError) as caught:
        await QmpSession.connect(str(path), connect_timeout=connect_timeout)
    return caught.value


@pytest.mark.asyncio
async def test_no_socket_is_absent(tmp_path: Path) -> None:
    err = await _kind(tmp_path / "none.sock")
    assert (err.kind, err.gone) == (ConnectFailure.ABSENT, True)
    assert isinstance(err.__cause__, FileNotFoundError)


@pytest.mark.asyncio
async def test_a_file_that_is_no_socket(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("")
    err = await _kind(tmp_path / "plain")
    assert (err.kind, err.gone) == (ConnectFailure.NOT_A_SOCKET, False)


@pytest.mark.asyncio
async def test_a_socket_nobody_listens_on_is_absent(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # the file stays, nothing listens: what a killed QEMU leaves
    err = await _kind(path)
    assert (err.kind, err.gone) == (ConnectFailure.ABSENT, True)
    assert "refused" in err.reason


@pytest.mark.asyncio
async def test_a_monitor_closed_before_the_greeting_is_closed(tmp_path: Path) -> None:
    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    path = tmp_path / "exiting.sock"
    server = await asyncio.start_unix_server(hang_up, path=str(path))
    try:
        err = await _kind(path)
    finally:
        server.close()
        await server.wait_closed()
    assert (err.kind, err.gone) == (ConnectFailure.CLOSED, True)


@pytest.mark.asyncio
async def test_a_monitor_without_a_greeting_is_busy(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # another client holds the monitor: QEMU says nothing to us

    path = tmp_path / "busy.sock"
    server = await asyncio.start_unix_server(silent, path=str(path))
    try:
        err = await _kind(path, connect_timeout=0.2)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert (err.kind, err.gone) == (ConnectFailure.BUSY, False)
