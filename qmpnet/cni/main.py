"""The ``qmpnet-cni`` program: one invocation in, one answer on stdout, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from qmpnet.boundary import DOCUMENT_MAX, load_json
from qmpnet.cni.commands import COMMANDS, cmd_version
from qmpnet.cni.request import DIRECT, Env, NetConf, Request, Vms
from qmpnet.cni.spec import (
    DEBUG_ENV,
    LATEST,
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    to_cni_error,
)
from qmpnet.logs import fields

log = logging.getLogger("qmpnet.cni")


_FORMAT = logging.Formatter(
    "%(asctime)s qmpnet-cni[%(process)d] %(levelname)s %(name)s: %(message)s"
)


#: the invocation a log record belongs to: the service runs many at once, and a logFile or
#: debug stream must get its own invocation's records only
_INVOCATION: contextvars.ContextVar[object] = contextvars.ContextVar("qmpnet_cni_invocation")


class _Mine(logging.Filter):
    def __init__(self, token: object) -> None:
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        return _INVOCATION.get(None) is self.token


class _Logs:
    """qmpnet's log handlers for one invocation: stderr in debug mode, ``logFile`` if set.

    They hang on the ``qmpnet`` logger, pass only this invocation's records (see
    :data:`_INVOCATION`) and are removed again when the invocation ends. The root logger gets
    a NullHandler, so Python's last-resort handler never writes a library's warning to stderr
    behind the runtime's back. ``debug`` may be a stream other than stderr: the service
    collects a thin client's debug lines and sends them back with the answer.
    """

    def __init__(
        self, debug: bool, stream: TextIO | None = None, *, resident: bool = False
    ) -> None:
        self.logger = logging.getLogger("qmpnet")
        self.handlers: list[logging.Handler] = []
        self._token = object()
        self._reset = _INVOCATION.set(self._token)
        self._level = self.logger.level
        self._resident = resident
        root = logging.getLogger()
        if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
            root.addHandler(logging.NullHandler())
        if not resident:  # the service keeps its own level (its --verbose)
            self.logger.setLevel(logging.DEBUG if debug else logging.INFO)
        if debug:
            handler = logging.StreamHandler(stream or sys.stderr)
            handler.setLevel(logging.DEBUG)
            self._add(handler)

    def _add(self, handler: logging.Handler) -> None:
        handler.setFormatter(_FORMAT)
        handler.addFilter(_Mine(self._token))
        self.logger.addHandler(handler)
        self.handlers.append(handler)

    def to_file(self, path: str) -> None:
        try:
            self._add(logging.FileHandler(path))
        except OSError as err:  # a log file that cannot be opened must not break the network
            log.warning("cannot open logFile %s: %s", path, err)

    def close(self) -> None:
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        if not self._resident:
            self.logger.setLevel(self._level)
        with contextlib.suppress(ValueError):  # a context other than the one that set it
            _INVOCATION.reset(self._reset)


def _error_version(raw: bytes) -> str:
    with contextlib.suppress(Exception):
        version = load_json(raw, "network configuration", "on stdin").get("cniVersion")
        if isinstance(version, str) and version in SUPPORTED_VERSIONS:
            return version  # answer in the caller's version, if it is one we speak
    return LATEST


def run(raw: bytes, environ: Mapping[str, str]) -> tuple[int, str]:
    """One invocation in the direct mode: (exit status, what goes to stdout). Never raises,
    never prints."""
    logs = _Logs(environ.get(DEBUG_ENV) == "1")
    try:
        if environ.get("CNI_COMMAND") == "VERSION":  # before any other variable is read
            return 0, json.dumps(cmd_version(raw))
        # Anything printed by accident lands on stderr: stdout carries only the answer.
        with contextlib.redirect_stdout(sys.stderr):
            return asyncio.run(answer(raw, environ, DIRECT, logs))
    finally:
        logs.close()


async def answer(raw: bytes, environ: Mapping[str, str], vms: Vms, logs: _Logs) -> tuple[int, str]:
    """One invocation, wherever it runs (the plugin's process or the service): checked input,
    the command, and every failure turned into the spec's error JSON, never a traceback."""
    if environ.get("CNI_COMMAND") == "VERSION":
        return 0, json.dumps(cmd_version(raw))
    try:
        env = Env.from_environ(environ)
        conf = NetConf.parse(raw, env.command)
        if conf.log_file:
            logs.to_file(conf.log_file)
        log.info(
            "%s container=%s ifname=%s netns=%s network=%s model=%s%s",
            env.command,
            env.container_id,
            env.ifname,
            env.netns,
            conf.name,
            conf.model,
            " (through qmpnetd)" if vms.defers else "",
        )
        with fields(container_id=env.container_id):
            result: dict[str, Any] | None = await COMMANDS[env.command](Request(env, conf, vms))
    except Exception as err:
        cni_err = to_cni_error(err)
        level = logging.ERROR if cni_err.code != Code.INTERNAL else logging.CRITICAL
        log.log(
            level,
            "%s failed: code %d: %s",
            environ.get("CNI_COMMAND", "?"),
            cni_err.code,
            cni_err.msg,
        )
        log.debug("traceback", exc_info=True)
        return 1, json.dumps(cni_err.to_json(_error_version(raw)))
    if result is None:
        return 0, ""
    return 0, json.dumps(result)


def main(raw: bytes | None = None) -> None:
    """The ``qmpnet-cni`` console script's direct mode (``raw``: stdin, if already read)."""
    try:
        # one byte past the cap, so that decoding it tells the cap (never read without end)
        if raw is None:
            raw = sys.stdin.buffer.read(DOCUMENT_MAX + 1)
    except OSError as err:
        raw = b""
        status, out = (
            1,
            json.dumps(CniError(Code.IO_FAILURE, f"reading stdin: {err}").to_json(LATEST)),
        )
    else:
        status, out = run(raw, os.environ)
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    sys.exit(status)
