"""The CNI protocol's terms: versions, error codes, and qmpnet errors mapped onto them."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

from qmpnet.boundary import load_json
from qmpnet.cni import versions
from qmpnet.errors import (
    ConnectFailure,
    HostError,
    InvalidInputError,
    NetnsError,
    PlugError,
    QmpConnectError,
    QmpError,
    QmpnetError,
    QmpTimeoutError,
    StateError,
    UnsupportedError,
    shown,
)

#: Spec versions this plugin speaks (defined in :mod:`.versions`, which VERSION needs alone)
SUPPORTED_VERSIONS = versions.SUPPORTED_VERSIONS
LATEST = versions.LATEST
DEFAULT_STATE_DIR = "/run/qmpnet/cni/{containerId}"
CONTAINER_ID = "{containerId}"
ATTACHMENTS_FILE = "cni-attachments.json"
LOCK_FILE = "cni.lock"
TUN_PATH = "/dev/net/tun"
#: How long a delegated IPAM plugin may take, and how long to wait for another invocation's
#: lock on the same VM: generous, a loaded node is slow, but never forever.
IPAM_TIMEOUT = 60.0
LOCK_TIMEOUT = 60.0
DEBUG_ENV = "QMPNET_CNI_DEBUG"
ARG_QMP = "QMPNET_QMP"
ARG_MAC = "MAC"
GC_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_SEMVER_RE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class Code(enum.IntEnum):
    """CNI error codes: 1-99 are the spec's, 100+ qmpnet's own (see the module docstring)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENV = 4
    IO_FAILURE = 5
    DECODE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN = 11
    NOT_AVAILABLE = 50
    QEMU = 100
    HOST = 101
    UNSUPPORTED = 102
    IPAM = 103
    CHECK_FAILED = 104
    NO_INTERFACE = 105
    ATTACHMENT_EXISTS = 106
    CHECK_PENDING = 107
    CHECK_PLUG_FAILED = 108
    INTERNAL = 199


class CniError(QmpnetError):
    """An error in the CNI protocol's terms: a code, a short message and optional details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        self.code = int(code)
        self.msg = msg
        self.details = details
        super().__init__(msg)

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


#: qmpnet error class -> CNI code; the most specific class in an error's MRO wins.
ERROR_CODES: Mapping[type[BaseException], Code] = {
    InvalidInputError: Code.INVALID_CONFIG,
    UnsupportedError: Code.UNSUPPORTED,
    NetnsError: Code.UNKNOWN_CONTAINER,
    HostError: Code.HOST,
    QmpError: Code.QEMU,
    QmpTimeoutError: Code.TRY_AGAIN,
    StateError: Code.IO_FAILURE,
}


def to_cni_error(err: BaseException) -> CniError:
    """The CNI error for any failure; a failed step keeps its cause's code and names the step."""
    if isinstance(err, CniError):
        return err
    if isinstance(err, PlugError):
        inner = to_cni_error(err.cause)
        details = f"{err.operation} step {err.step} of {err.endpoint} failed"
        return CniError(inner.code, str(err), "; ".join(filter(None, [details, inner.details])))
    if isinstance(err, QmpConnectError) and err.kind is ConnectFailure.BUSY:
        # The monitor serves one client at a time: busy now, free later.
        return CniError(Code.TRY_AGAIN, str(err), "the QMP monitor is busy; try again later")
    for cls in type(err).__mro__:
        code = ERROR_CODES.get(cls)
        if code is not None:
            return CniError(code, str(err), _causes(err))
    return CniError(
        Code.INTERNAL,
        f"internal error: {type(err).__name__}: {err}",
        "this is a bug in qmpnet-cni; run with QMPNET_CNI_DEBUG=1 for a traceback",
    )


def _causes(err: BaseException) -> str:
    chain: list[str] = []
    cause = err.__cause__
    while cause is not None and len(chain) < 5:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return "caused by " + " <- ".join(chain) if chain else ""


#: The first spec version that has each command.
MIN_VERSION: Mapping[str, str] = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def version_key(version: str) -> tuple[int, int, int]:
    match = _SEMVER_RE.fullmatch(version)
    if not match:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"cniVersion {shown(version)} is not a version")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_version(version: object, command: str) -> str:
    """The configuration's cniVersion, if this plugin speaks it and it has ``command``."""
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            f"incompatible CNI version {shown(version)}",
            "supported versions are " + ", ".join(SUPPORTED_VERSIONS),
        )
    first = MIN_VERSION.get(command)
    if first is not None and version_key(version) < version_key(first):
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            f"configuration version {version} does not allow {command}",
            f"{command} needs cniVersion {first} or later",
        )
    return version


def decode(raw: bytes) -> dict[str, Any]:
    """stdin as a JSON object within the boundary's caps (error 6 otherwise)."""
    try:
        data = load_json(raw, "network configuration", "on stdin")
    except InvalidInputError as err:
        raise CniError(Code.DECODE, f"network configuration on stdin: {err.reason}") from err
    if not isinstance(data, dict):
        raise CniError(Code.DECODE, "network configuration must be a JSON object")
    return data
