"""The wire protocol of qmpnetd: JSON-RPC 2.0 requests and replies, one JSON object per line.

JSON-RPC over newline-framed JSON rather than varlink: the standard library speaks it (the
thin client imports nothing else), its error object carries typed data, and ``socat`` or any
language's JSON library can drive it. Every request's ``params`` is an object that carries
``"protocol": PROTOCOL_VERSION``; a service refuses any other version with
:data:`PROTOCOL_MISMATCH` (``version`` answers whatever the client speaks, so two releases
can always tell each other apart).

An error reply's ``code`` is qmpnet's exit code class for application errors (1 to 12, as the
CLI documents them) or JSON-RPC's own negative codes for a message that is not a request;
``data`` carries ``type`` (the error class), ``exit`` and the error's typed ``fields``.

Standard library only: the CLI's service mode imports this and nothing heavier.
"""

from __future__ import annotations

import json

from qmpnet.exits import EXIT_DENIED, EXIT_INPUT, EXIT_INTERNAL, EXIT_SERVICE

#: mypy reads any name ``TYPE_CHECKING`` as true; at run time ``typing`` (~5 ms) is not imported
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: the protocol this release speaks; bumped on any incompatible change
PROTOCOL_VERSION = 1
#: the longest request or reply line, in bytes: an interface and a config file of
#: ``boundary.DOCUMENT_MAX`` each, JSON-escaped, fit with room to spare
LINE_MAX = 8 << 20
DEFAULT_SOCKET = "/run/qmpnet/qmpnetd.sock"

# JSON-RPC 2.0's own codes (section 5.1)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: the client speaks another protocol version
PROTOCOL_MISMATCH = -32001

#: the methods, for the README and ``version``
METHODS = (
    "version",
    "status",
    "vm.register",
    "vm.unregister",
    "vm.list",
    "iface.add",
    "iface.remove",
    "iface.set_link",
    "iface.set_mtu",
    "iface.set_bandwidth",
    "iface.list",
    "iface.stats",
    "reconcile",
    "watch.start",
    "watch.stop",
    "watch.list",
    "cni.exec",
    "cli.exec",
)


def exit_of_code(code: int) -> int:
    """The CLI exit code for an error reply's ``code``."""
    if 0 < code <= EXIT_DENIED:
        return code
    if code in (INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR):
        return EXIT_INPUT
    if code == PROTOCOL_MISMATCH:
        return EXIT_SERVICE
    return EXIT_INTERNAL


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line (JSON never holds a raw newline)."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(method: str, params: dict[str, Any], ident: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": method,
        "params": {**params, "protocol": PROTOCOL_VERSION},
        "id": ident,
    }


def result(ident: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "result": value, "id": ident}


def error(
    ident: Any, code: int, message: str, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": "2.0", "error": body, "id": ident}
