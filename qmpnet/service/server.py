"""The socket side of qmpnetd: accept, check credentials, read framed requests, reply.

Each connection reads one line at a time (capped at :data:`protocol.LINE_MAX`, with an idle
deadline) and answers each request before reading the next; a client wanting parallel
requests opens more connections (capped at :data:`CONNECTIONS_MAX`). A request's work runs in
a task of its own: a client that goes away does not cancel it. Whatever a client sends — not
JSON, not a request, too long, too slow — costs it an error reply or its connection, never the
service or another client's operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from qmpnet.boundary import DEPTH_MAX
from qmpnet.errors import DeniedError, QmpnetError
from qmpnet.exits import EXIT_DENIED, EXIT_INPUT, EXIT_SERVICE, exit_code_for
from qmpnet.service import protocol
from qmpnet.service.auth import Authority, Peer, Role
from qmpnet.service.cliexec import CliExec
from qmpnet.service.methods import Caller, Params, Service

log = logging.getLogger(__name__)

#: connections served at once; more are answered with an error and closed
CONNECTIONS_MAX = 256
#: seconds a connection may stay silent (between requests, or within one line)
IDLE_TIMEOUT = 300.0


def wire_error(err: BaseException) -> dict[str, Any]:
    """An error's class, exit code and typed fields, as JSON."""
    fields = {k: _jsonable(v) for k, v in vars(err).items() if not k.startswith("_")}
    return {"type": type(err).__name__, "exit": exit_code_for(err), "fields": fields}


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "value") and isinstance(value.value, str):  # an enum
        return value.value
    if isinstance(value, list | tuple) and depth < 4:
        return [_jsonable(v, depth + 1) for v in value[:64]]
    if isinstance(value, dict) and depth < 4:
        return {str(k): _jsonable(v, depth + 1) for k, v in list(value.items())[:64]}
    return str(value)


def _depth(value: Any, limit: int = DEPTH_MAX) -> bool:
    """Whether ``value`` nests no deeper than ``limit`` (json.loads itself may recurse far)."""
    stack = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if level > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return True


class Server:
    def __init__(self, service: Service, authority: Authority) -> None:
        self.service = service
        self.authority = authority
        self._connections: set[asyncio.Task[Any]] = set()
        self._methods = service.table()
        self.cli = CliExec(self.answer)
        self._methods["cli.exec"] = self.cli.execute
        #: command lines being run for a compiled front (cli.exec)
        self._carriers: set[asyncio.Task[Any]] = set()
        self._stopping = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # drain() ends the connections of a stopping service. A handler task that ends
            # cancelled makes asyncio's streams (Python 3.11) log "Exception in callback"
            # with a traceback, on every clean stop with a client connected: end quietly.
            if not self._stopping:
                raise
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer = Peer.of(sock)
        role = self.authority.role(peer)
        caller = Caller(peer, role)
        if len(self._connections) > CONNECTIONS_MAX:
            await self._send(writer, protocol.error(None, 1, "qmpnetd: too many connections"))
            return
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except TimeoutError:
                return
            except (ValueError, asyncio.LimitOverrunError):
                await self._send(
                    writer,
                    protocol.error(
                        None,
                        protocol.INVALID_REQUEST,
                        f"request longer than {protocol.LINE_MAX} bytes",
                        {"exit": EXIT_INPUT},
                    ),
                )
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await self._reply(line, caller)
            await self._send(writer, reply)

    async def _send(self, writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(protocol.encode(message))
        await writer.drain()

    async def _reply(self, line: bytes, caller: Caller) -> dict[str, Any]:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as err:
            return protocol.error(
                None, protocol.PARSE_ERROR, f"not JSON: {err}", {"exit": EXIT_INPUT}
            )
        return await self.answer(message, caller)

    async def answer(self, message: Any, caller: Caller) -> dict[str, Any]:
        """The reply to one decoded message, from a socket or a forwarded command line."""
        if not isinstance(message, dict) or not _depth(message):
            return protocol.error(None, protocol.INVALID_REQUEST, "not a JSON-RPC request object")
        ident = message.get("id")
        method, params = message.get("method"), message.get("params", {})
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str):
            return protocol.error(ident, protocol.INVALID_REQUEST, "not a JSON-RPC 2.0 request")
        if not isinstance(params, dict):
            return protocol.error(ident, protocol.INVALID_PARAMS, "params must be an object")
        if caller.role is Role.NONE:
            denied = DeniedError(
                f"uid {caller.peer.uid}", "not root and not in the service's group"
            )
            data = {**wire_error(denied), "refused_caller": True}
            return protocol.error(ident, EXIT_DENIED, str(denied), data)
        if method != "version" and params.get("protocol") != protocol.PROTOCOL_VERSION:
            return protocol.error(
                ident,
                protocol.PROTOCOL_MISMATCH,
                f"qmpnetd speaks protocol {protocol.PROTOCOL_VERSION}, the client "
                f"{params.get('protocol')!r}: use a client of this release",
                {"protocol": protocol.PROTOCOL_VERSION},
            )
        if self._stopping:
            # drain() waits for what it saw; a request after that would race the sessions'
            # close (a compiled front's second round on its open connection, say)
            return protocol.error(
                ident, EXIT_SERVICE, "qmpnetd is stopping: ask again when it is back"
            )
        call = self._methods.get(method)
        if call is None:
            return protocol.error(
                ident, protocol.METHOD_NOT_FOUND, f"no method {method[:80]!r}", {"exit": EXIT_INPUT}
            )
        work = asyncio.create_task(call(Params(params), caller), name=f"request {method}")
        # a forwarded command line is not a request of its own: the ones it makes are counted
        tasks = self._carriers if method == "cli.exec" else self.service.inflight
        tasks.add(work)
        work.add_done_callback(tasks.discard)
        try:
            # shielded: a client that goes away does not cut the operation in half
            value = await asyncio.shield(work)
        except asyncio.CancelledError:
            raise
        except QmpnetError as err:
            self.service.record_error(method, params, err)
            log.info("%s by uid %d failed: %s", method, caller.peer.uid, err)
            wire = wire_error(err)
            return protocol.error(ident, wire["exit"], str(err), wire)
        except Exception as err:
            self.service.record_error(method, params, err)
            log.exception("%s failed", method)
            wire = wire_error(err)
            return protocol.error(ident, wire["exit"], f"internal error: {err}", wire)
        return protocol.result(ident, value)

    async def drain(self, timeout: float) -> None:
        """Wait for requests in flight (bounded); what is left is cancelled, so undone."""
        self._stopping = True
        inflight = self.service.inflight | self._carriers
        if inflight:
            log.info("finishing %d request(s) in flight", len(inflight))
            _, left = await asyncio.wait(inflight, timeout=timeout)
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left)
        for conn in list(self._connections):
            conn.cancel()
