"""A blocking client of qmpnetd, on the standard library alone.

The CLI's service mode uses it so that a request costs a socket round trip, not the import of
QMP, netlink and attrs machinery. Errors are :class:`ServiceError` with the service's
``code``, ``message`` and typed ``data``; a service that is not there is
:class:`ServiceUnavailable` (the caller may fall back to the direct mode), one that goes away
before it answers is :class:`ServiceLost` (it may have done the work: the journal settles it).
"""

from __future__ import annotations

import _socket
import json
import os

from qmpnet.service import protocol

#: mypy reads any name ``TYPE_CHECKING`` as true; at run time ``typing`` (~5 ms) is not imported
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ServiceError(Exception):
    """The service answered with an error."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data or {}

    @property
    def exit_code(self) -> int:
        code = self.data.get("exit")
        return code if isinstance(code, int) else protocol.exit_of_code(self.code)

    @property
    def refused_caller(self) -> bool:
        """The service refuses this user altogether (not root, not in its group)."""
        return bool(self.data.get("refused_caller"))


class ServiceUnavailable(Exception):
    """No service listens on the socket, or this user may not open it."""

    def __init__(self, path: str, reason: str, *, denied: bool = False) -> None:
        super().__init__(f"qmpnetd at {path}: {reason}")
        self.path = path
        self.denied = denied


class ServiceLost(Exception):
    """The connection broke before the reply: the service stopped or died mid-request."""

    def __init__(self, path: str, method: str) -> None:
        super().__init__(
            f"qmpnetd at {path} closed the connection before answering {method} (stopped or "
            "died): the operation is complete, or rolled back when the service is back; "
            "`qmpnet list-ifaces` tells which"
        )


class Client:
    """One connection; requests are sent one at a time, each waiting for its reply."""

    def __init__(self, path: str = protocol.DEFAULT_SOCKET, timeout: float | None = None) -> None:
        self.path = path
        self._timeout = timeout
        self._sock: _socket.socket | None = None
        self._buf = b""
        self._next_id = 1

    def connect(self) -> None:
        # _socket, not socket: the wrapper module's enum conversions and selectors import
        # cost a thin client more than its whole request
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            raise ServiceUnavailable(self.path, "not running") from err
        except PermissionError as err:
            sock.close()
            raise ServiceUnavailable(self.path, "permission denied", denied=True) from err
        except OSError as err:
            sock.close()
            raise ServiceUnavailable(self.path, err.strerror or str(err)) from err
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result, or raise :class:`ServiceError`."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        ident = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(protocol.encode(protocol.request(method, params or {}, ident)))
            line = self._readline()
        except (BrokenPipeError, ConnectionResetError) as err:
            raise ServiceLost(self.path, method) from err
        if not line:
            raise ServiceLost(self.path, method)
        return result_of(line)

    def _readline(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buf:
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                return b""
            self._buf += chunk
            if len(self._buf) > protocol.LINE_MAX:
                raise ServiceError(protocol.INTERNAL_ERROR, "reply longer than the line cap")
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def result_of(line: bytes) -> Any:
    """A reply line's result, or its error raised as :class:`ServiceError`."""
    try:
        reply = json.loads(line)
    except ValueError as err:
        raise ServiceError(protocol.INTERNAL_ERROR, f"unreadable reply: {err}") from err
    if not isinstance(reply, dict):
        raise ServiceError(protocol.INTERNAL_ERROR, "the reply is not a JSON object")
    if "error" in reply:
        body = reply["error"] if isinstance(reply["error"], dict) else {}
        data = body.get("data")
        raise ServiceError(
            int(body.get("code", protocol.INTERNAL_ERROR)),
            str(body.get("message", "error")),
            data if isinstance(data, dict) else None,
        )
    return reply.get("result")


def socket_path(option: str | None = None) -> str:
    """The service socket: the option, else ``$QMPNET_SOCKET``, else the default."""
    return option or os.environ.get("QMPNET_SOCKET") or protocol.DEFAULT_SOCKET
