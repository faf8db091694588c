"""The ``qmpnet-cni`` program: one invocation in, one answer on stdout, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from qmpnet.boundary import DOCUMENT_MAX, load_json
from qmpnet.cni.commands import COMMANDS, cmd_version
from qmpnet.cni.request import Env, NetConf, Request
from qmpnet.cni.spec import (
    DEBUG_ENV,
    LATEST,
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    to_cni_error,
)

log = logging.getLogger("qmpnet.cni")


_FORMAT = logging.Formatter(
    "%(asctime)s qmpnet-cni[%(process)d] %(levelname)s %(name)s: %(message)s"
)


class _Logs:
    """qmpnet's log handlers for one invocation: stderr in debug mode, ``logFile`` if set.

    They hang on the ``qmpnet`` logger and are removed again when the invocation ends. The
    root logger gets a NullHandler, so Python's last-resort handler never writes a library's
    warning to stderr behind the runtime's back.
    """

    def __init__(self, debug: bool) -> None:
        self.logger = logging.getLogger("qmpnet")
        self.handlers: list[logging.Handler] = []
        self._level = self.logger.level
        root = logging.getLogger()
        if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
            root.addHandler(logging.NullHandler())
        self.logger.setLevel(logging.DEBUG if debug else logging.INFO)
        if debug:
            self._add(logging.StreamHandler(sys.stderr))

    def _add(self, handler: logging.Handler) -> None:
        handler.setFormatter(_FORMAT)
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
        self.logger.setLevel(self._level)


def _error_version(raw: bytes) -> str:
    with contextlib.suppress(Exception):
        version = load_json(raw, "network configuration", "on stdin").get("cniVersion")
        if isinstance(version, str) and version in SUPPORTED_VERSIONS:
            return version  # answer in the caller's version, if it is one we speak
    return LATEST


def run(raw: bytes, environ: Mapping[str, str]) -> tuple[int, str]:
    """One invocation: (exit status, what goes to stdout). Never raises, never prints."""
    logs = _Logs(environ.get(DEBUG_ENV) == "1")
    try:
        return _run(raw, environ, logs)
    finally:
        logs.close()


def _run(raw: bytes, environ: Mapping[str, str], logs: _Logs) -> tuple[int, str]:
    if environ.get("CNI_COMMAND") == "VERSION":  # before any other variable is read
        return 0, json.dumps(cmd_version(raw))
    try:
        env = Env.from_environ(environ)
        conf = NetConf.parse(raw, env.command)
        if conf.log_file:
            logs.to_file(conf.log_file)
        log.info(
            "%s container=%s ifname=%s netns=%s network=%s model=%s",
            env.command,
            env.container_id,
            env.ifname,
            env.netns,
            conf.name,
            conf.model,
        )
        # Anything printed by accident lands on stderr: stdout carries only the answer.
        with contextlib.redirect_stdout(sys.stderr):
            result: dict[str, Any] | None = asyncio.run(COMMANDS[env.command](Request(env, conf)))
    except Exception as err:  # every failure becomes the spec's error JSON, never a traceback
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


def main() -> None:
    """The ``qmpnet-cni`` console script."""
    try:
        # one byte past the cap, so that decoding it tells the cap (never read without end)
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
