"""A one-shot stand-in for qmpnetd, for what the real service cannot be made to do on cue.

The compiled fronts' tests (``tests/test_cni_shim.py``, ``tests/test_cli_shim.py``) use it to
play a service that dies after a request, answers nonsense, refuses the caller or speaks an
older protocol; each test says that the peer is a stand-in.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def peer(path: Path, answer: Callable[[bytes], bytes | None]) -> Iterator[list[Any]]:
    """A stand-in for qmpnetd at ``path`` for what the real one cannot be made to do on cue
    (die after the request, answer nonsense): it serves each connection once with ``answer``
    of the request line (None: close without a reply) and records the requests."""
    seen: list[Any] = []
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    buf += chunk
                seen.append(json.loads(buf))
                reply = answer(buf)
                if reply is not None:
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)


def rpc(result: Any = None, error: Any = None) -> Callable[[bytes], bytes]:
    def answer(line: bytes) -> bytes:
        ident = json.loads(line)["id"]
        body = {"error": error} if error is not None else {"result": result}
        return json.dumps({"jsonrpc": "2.0", "id": ident, **body}).encode() + b"\n"

    return answer
