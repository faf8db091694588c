"""The ``qmpnet-cni`` console script: VERSION at once, the rest forwarded to qmpnetd when it
is there, and done in this process (:mod:`.main`) when it is not.

The package's ``__init__`` imports nothing eagerly, so this module costs the interpreter, json
and itself: VERSION answers in the time a Python process starts, and a command the service
does costs one socket round trip more (:mod:`qmpnet.service.client` is standard library only).
"""

from __future__ import annotations

import json
import os
import sys

from qmpnet.cni.versions import LATEST, READ_MAX, SUPPORTED_VERSIONS, version_answer

#: the environment the service needs of an invocation (anything else stays this process's)
FORWARDED = (
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
    "QMPNET_CNI_DEBUG",
)
TRY_AGAIN = 11  # the spec's "try again later"


def _read() -> bytes | None:
    try:
        return sys.stdin.buffer.read(READ_MAX)
    except OSError:
        return None  # the full path reads again and reports the error


def _answer(status: int, out: str) -> None:
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    sys.exit(status)


def service_socket(raw: bytes) -> str:
    """The service socket the configuration names (``qmpnetd``), "" for the direct mode or a
    configuration this cannot read (the full path reports what is wrong with it)."""
    from qmpnet.service.protocol import DEFAULT_SOCKET

    try:
        doc = json.loads(raw)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    path = doc.get("qmpnetd", DEFAULT_SOCKET)
    return path if isinstance(path, str) and os.path.isabs(path) else ""


def forward(path: str, raw: bytes) -> tuple[int, str, str] | None:
    """The service's answer (status, stdout, stderr), or None when no service takes it."""
    from qmpnet.service.client import Client, ServiceError, ServiceLost, ServiceUnavailable

    try:
        stdin = raw.decode()
    except UnicodeDecodeError:
        return None
    environ = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    try:
        with Client(path) as client:
            got = client.call("cni.exec", {"protocol": 1, "environ": environ, "stdin": stdin})
    except ServiceUnavailable:
        return None  # not running (a stale socket), or not ours to use: the direct mode
    except ServiceError as err:
        if err.refused_caller:
            return None
        return 1, _error(raw, f"qmpnetd at {path}: {err}"), ""
    except ServiceLost as err:
        return 1, _error(raw, str(err)), ""
    if not isinstance(got, dict):
        return 1, _error(raw, f"qmpnetd at {path}: an answer that is not an object"), ""
    return int(got.get("exit", 1)), str(got.get("stdout", "")), str(got.get("stderr", ""))


def _error(raw: bytes, msg: str) -> str:
    version = LATEST
    try:
        asked = json.loads(raw).get("cniVersion")
        if asked in SUPPORTED_VERSIONS:
            version = asked
    except (ValueError, AttributeError):
        pass
    return json.dumps({"cniVersion": version, "code": TRY_AGAIN, "msg": msg})


def main() -> None:
    if os.environ.get("CNI_COMMAND") == "VERSION":
        _answer(0, json.dumps(version_answer(_read() or b"")))
    raw = _read()
    path = service_socket(raw) if raw is not None else ""
    if raw is not None and path and os.path.exists(path):
        done = forward(path, raw)
        if done is not None:
            status, out, err = done
            if err:
                sys.stderr.write(err)
                sys.stderr.flush()
            _answer(status, out)
    from qmpnet.cni.main import main as full

    full(raw)
