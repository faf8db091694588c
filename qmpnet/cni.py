"""``qmpnet-cni``: a CNI plugin (spec 1.0.0 and 1.1.0) that hot-plugs a pod's NIC into its VM.

A container runtime runs this program once per operation, with ``CNI_*`` environment
variables and the network configuration as JSON on stdin. It answers on stdout with a result,
or with the spec's error object (``cniVersion``, ``code``, ``msg``, ``details``) and a
non-zero exit status. Nothing else ever reaches stdout; logs go to stderr only with
``QMPNET_CNI_DEBUG=1``, and to ``logFile`` when the configuration names one.

Two modes, chosen by ``model``:

- **chained** (``tcfilter``, the default, ``macvtap`` or ``bridged``): after a main plugin
  (``bridge`` + ``host-local``, say) made the pod's veth ``CNI_IFNAME`` in ``CNI_NETNS``, ADD
  joins it to a new tap in that netns and hot-plugs a virtio-net NIC carrying the veth's MAC.
  The result is ``prevResult`` passed on, with an interface entry for ``CNI_IFNAME``
  (``sandbox`` = ``CNI_NETNS``) added when the main plugin gave none.
- **main** (``none``): ADD creates a tap named ``CNI_IFNAME`` in ``CNI_NETNS`` itself and
  hot-plugs it. Addresses come from the IPAM plugin ``ipam.type`` found in ``CNI_PATH`` and are
  reported in the result for the guest; the tap gets none, since the guest owns them.

Network configuration, besides ``cniVersion``, ``name`` and ``type``::

    qmpSocket     the VM's QMP monitor; "{containerId}" is replaced. runtimeConfig.qmpSocket,
                  then CNI_ARGS QMPNET_QMP=PATH, take precedence.
    stateDir      the VM's qmpnet state directory; must contain "{containerId}"
                  (default /run/qmpnet/cni/{containerId})
    model         tcfilter | macvtap | bridged | none            (default tcfilter)
    queues        queue pairs                                     (default one per guest vCPU)
    disableVhost  never use vhost-net                             (default false)
    waitGuest     answer ADD only once the guest driver has the NIC (default false)
    timeouts      {"connect", "command", "unplug", "guestReady"} in seconds
    mac, mtu      main mode: the NIC's MAC (also runtimeConfig.mac or CNI_ARGS MAC=) and MTU
    ipam          main mode: the delegated IPAM plugin's configuration
    logFile       append logs to this file

Each attachment (network, container, ifname) is recorded next to the VM's qmpnet state before
it is plugged, so DEL, CHECK and GC find exactly what this network made, and nothing else.

Error codes: the spec's well-known codes (see :class:`Code`), and from 100 qmpnet's own::

    100 QEMU failed a command or cannot be reached     104 CHECK found the attachment broken
    101 a host kernel operation failed (netlink, tun)  105 CNI_IFNAME is not in CNI_NETNS
    102 qmpnet cannot do this (endpoint type, model)   106 the attachment exists already
    103 the IPAM plugin could not be run or answered   199 internal error (a bug in qmpnet)
        nonsense (its own error JSON is passed on as is, code included)

:class:`CniError` joins qmpnet's error tree under ``QmpnetError``; every other qmpnet error is
mapped onto a code by :func:`to_cni_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import fcntl
import glob
import ipaddress
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from qemu.qmp import QMPClient

from qmpnet.config import Config, Timeouts
from qmpnet.endpoints import Endpoint, PlugContext
from qmpnet.endpoints.base import random_mac
from qmpnet.endpoints.netpair import parked_mac
from qmpnet.errors import (
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
)
from qmpnet.hypervisor import QemuHypervisor, device_id, plugged_tap
from qmpnet.lifecycle import Operation
from qmpnet.links import Links
from qmpnet.model import (
    InterfaceDescription,
    InterworkingModel,
    IPAddress,
    check_ifname,
    check_mac,
    check_mtu,
    check_queues,
)
from qmpnet.netns import check_netns, netns_exists
from qmpnet.network import NetworkState, NoSuchInterfaceError, host_link
from qmpnet.qmp import QmpSession
from qmpnet.reconcile import recover_journal
from qmpnet.store import Entry, Status

log = logging.getLogger("qmpnet.cni")

#: Spec versions this plugin speaks, oldest first; results are shaped alike for all of them.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
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

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_SEMVER_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


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
    if isinstance(err, QmpConnectError) and isinstance(err.__cause__, TimeoutError):
        # The monitor serves one client at a time: busy now, free later.
        return CniError(Code.TRY_AGAIN, str(err), "the QMP monitor is busy; try again later")
    for cls in type(err).__mro__:
        code = ERROR_CODES.get(cls)
        if code is not None:
            return CniError(code, str(err), _causes(err))
    return CniError(Code.INTERNAL, f"internal error: {type(err).__name__}: {err}",
                    "this is a bug in qmpnet-cni; run with QMPNET_CNI_DEBUG=1 for a traceback")


def _causes(err: BaseException) -> str:
    chain: list[str] = []
    cause = err.__cause__
    while cause is not None and len(chain) < 5:
        chain.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return "caused by " + " <- ".join(chain) if chain else ""


# --- the environment -------------------------------------------------------------------------

#: CNI_COMMAND -> the variables the spec makes mandatory for it.
REQUIRED_ENV: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}

#: The first spec version that has each command.
MIN_VERSION: Mapping[str, str] = {"CHECK": "0.4.0", "STATUS": "1.1.0", "GC": "1.1.0"}


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` as runtimes pass CNI_ARGS; keys qmpnet does not know are ignored."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(Code.INVALID_ENV, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


@attrs.frozen(kw_only=True)
class Env:
    """The ``CNI_*`` variables of one invocation, checked."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = attrs.field(factory=dict, hash=False)
    path: tuple[str, ...] = ()
    #: the whole environment, handed on unchanged to a delegated IPAM plugin.
    environ: Mapping[str, str] = attrs.field(factory=dict, hash=False, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Env:
        command = environ.get("CNI_COMMAND", "")
        if command not in REQUIRED_ENV:
            raise CniError(Code.INVALID_ENV, f"CNI_COMMAND {command!r} is not one of "
                           + ", ".join(REQUIRED_ENV))
        for var in REQUIRED_ENV[command]:
            if not environ.get(var):
                raise CniError(Code.INVALID_ENV, f"{var} is required for {command}")
        container_id = environ.get("CNI_CONTAINERID", "")
        if container_id and not _NAME_RE.match(container_id):
            raise CniError(Code.INVALID_ENV, f"CNI_CONTAINERID {container_id!r}: must be "
                           "letters, digits, '_', '.' or '-', starting with a letter or digit")
        netns = environ.get("CNI_NETNS", "")
        if netns and not os.path.isabs(netns):
            raise CniError(Code.INVALID_ENV, f"CNI_NETNS {netns!r}: must be an absolute path")
        ifname = environ.get("CNI_IFNAME", "")
        if ifname:
            try:
                check_ifname("CNI_IFNAME", ifname)
            except InvalidInputError as err:
                raise CniError(Code.INVALID_ENV, str(err)) from err
        path = tuple(p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p)
        return cls(command=command, container_id=container_id, netns=netns, ifname=ifname,
                   args=parse_cni_args(environ.get("CNI_ARGS", "")), path=path,
                   environ=dict(environ))


# --- the network configuration ----------------------------------------------------------------

def version_key(version: str) -> tuple[int, int, int]:
    match = _SEMVER_RE.match(version)
    if not match:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not a version")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def check_version(version: object, command: str) -> str:
    """The configuration's cniVersion, if this plugin speaks it and it has ``command``."""
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}",
                       "supported versions are " + ", ".join(SUPPORTED_VERSIONS))
    first = MIN_VERSION.get(command)
    if first is not None and version_key(version) < version_key(first):
        raise CniError(Code.INCOMPATIBLE_VERSION,
                       f"configuration version {version} does not allow {command}",
                       f"{command} needs cniVersion {first} or later")
    return version


def decode(raw: bytes) -> dict[str, Any]:
    """stdin as a JSON object (error 6 otherwise)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CniError(Code.DECODE, f"network configuration is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CniError(Code.DECODE, "network configuration must be a JSON object")
    return data


def _bad(key: str, value: object, why: str) -> CniError:
    return CniError(Code.INVALID_CONFIG, f"invalid network configuration: {key} {value!r}: {why}")


def _field(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any,
           what: str) -> Any:
    """``data[key]`` if it is of ``kind`` (bool is never an int here), else error 7."""
    if key not in data or data[key] is None:
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _bad(key, value, f"must be {what}")
    return value


def _template(key: str, value: str, need_id: bool) -> str:
    if not os.path.isabs(value):
        raise _bad(key, value, "must be an absolute path")
    if need_id and value.count(CONTAINER_ID) != 1:
        raise _bad(key, value, f"must contain {CONTAINER_ID} exactly once (one VM per pod)")
    return value


_TIMEOUT_KEYS = {"connect": "connect", "command": "command", "unplug": "unplug",
                 "guestReady": "guest_ready"}


def _timeouts(data: Mapping[str, Any]) -> Timeouts:
    table = _field(data, "timeouts", dict, {}, "an object")
    kwargs: dict[str, float] = {}
    for key, value in table.items():
        if key not in _TIMEOUT_KEYS:
            raise _bad("timeouts", key, "unknown key; known keys are " + ", ".join(_TIMEOUT_KEYS))
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
            raise _bad(f"timeouts.{key}", value, "must be seconds in (0, 3600]")
        kwargs[_TIMEOUT_KEYS[key]] = float(value)
    return Timeouts(**kwargs)


_CNI_MODELS = ("tcfilter", "macvtap", "bridged", "none", "default")


def _valid_attachments(data: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    key = next((k for k in GC_KEYS if k in data), None)
    if key is None:
        return None
    items = data[key]
    if not isinstance(items, list):
        raise _bad(key, items, "must be a list")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                or not isinstance(item.get("ifname"), str):
            raise _bad(key, item, 'each entry must be {"containerID": ..., "ifname": ...}')
        out.append((item["containerID"], item["ifname"]))
    return tuple(out)


@attrs.frozen(kw_only=True)
class NetConf:
    """The network configuration, checked once; ``raw`` is exactly what came on stdin."""

    cni_version: str
    name: str
    qmp_socket: str = ""
    state_dir: str = DEFAULT_STATE_DIR
    model: InterworkingModel = InterworkingModel.TCFILTER
    queues: int = 0
    disable_vhost: bool = False
    wait_guest: bool = False
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    mac: str = ""
    mtu: int = 1500
    log_file: str = ""
    ipam: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    dns: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    prev_result: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    runtime_config: Mapping[str, Any] = attrs.field(factory=dict, hash=False)
    valid_attachments: tuple[tuple[str, str], ...] | None = None
    raw: bytes = attrs.field(default=b"", repr=False)

    @property
    def main(self) -> bool:
        """Main mode (the plugin makes the tap and runs IPAM) rather than chained."""
        return self.model is InterworkingModel.NONE

    @property
    def ipam_type(self) -> str:
        return str(self.ipam["type"]) if self.ipam else ""

    def config(self) -> Config:
        return Config(internetworking_model=self.model, disable_vhost_net=self.disable_vhost,
                      queues=self.queues, timeouts=self.timeouts)

    @classmethod
    def parse(cls, raw: bytes, command: str) -> NetConf:
        data = decode(raw)
        version = check_version(data.get("cniVersion"), command)
        name = _field(data, "name", str, "", "a string")
        if not _NAME_RE.match(name):
            raise _bad("name", name, "must be letters, digits, '_', '.' or '-', starting with "
                       "a letter or digit")
        if not isinstance(data.get("type"), str) or not data["type"]:
            raise _bad("type", data.get("type"), "must be the plugin's name")
        model_text = _field(data, "model", str, "tcfilter", "a string")
        if model_text not in _CNI_MODELS:
            raise _bad("model", model_text, "valid values are " + ", ".join(_CNI_MODELS[:4]))
        model = InterworkingModel.parse(model_text).resolved()
        queues = _field(data, "queues", int, 0, "an integer")
        mtu = _field(data, "mtu", int, 1500, "an integer")
        mac = _field(data, "mac", str, "", "a MAC address")
        try:
            if queues:
                check_queues("queues", queues)
            check_mtu("mtu", mtu)
            if mac:
                mac = check_mac("mac", mac)
        except InvalidInputError as err:
            raise CniError(Code.INVALID_CONFIG, f"invalid network configuration: {err}") from err
        ipam = _field(data, "ipam", dict, None, "an object")
        prev = _field(data, "prevResult", dict, None, "an object")
        if model is InterworkingModel.NONE:
            if prev is not None and command == "ADD":
                raise CniError(Code.INVALID_CONFIG, "invalid network configuration: model "
                               "none makes its own tap: it must be the first plugin of the "
                               "list, not chained after another (prevResult is set)")
            if ipam is not None and (not isinstance(ipam.get("type"), str)
                                     or not _NAME_RE.match(ipam["type"])):
                raise _bad("ipam.type", ipam.get("type"), "must name an IPAM plugin binary")
        elif ipam is not None:
            raise CniError(Code.INVALID_CONFIG, "invalid network configuration: ipam is set "
                           f"but model {model} chains after a main plugin, which does the "
                           "IPAM; only model none delegates IPAM itself")
        elif prev is None and command in ("ADD", "CHECK"):
            raise CniError(Code.INVALID_CONFIG, f"invalid network configuration: model {model} "
                           "plugs the veth a main plugin made, but there is no prevResult: "
                           "chain it after one (or use model none)")
        runtime = _field(data, "runtimeConfig", dict, {}, "an object")
        qmp = _field(data, "qmpSocket", str, "", "a path")
        if qmp:
            _template("qmpSocket", qmp, need_id=False)
        return cls(
            cni_version=version, name=name, qmp_socket=qmp,
            state_dir=_template("stateDir", _field(data, "stateDir", str, DEFAULT_STATE_DIR,
                                                   "a path"), need_id=True),
            model=model, queues=queues,
            disable_vhost=_field(data, "disableVhost", bool, False, "true or false"),
            wait_guest=_field(data, "waitGuest", bool, False, "true or false"),
            timeouts=_timeouts(data), mac=mac, mtu=mtu,
            log_file=_field(data, "logFile", str, "", "a path"),
            ipam=ipam, dns=_field(data, "dns", dict, None, "an object"), prev_result=prev,
            runtime_config=runtime, valid_attachments=_valid_attachments(data), raw=raw)


# --- one invocation ---------------------------------------------------------------------------

@attrs.frozen
class Request:
    """One invocation: its environment and configuration, and what follows from both."""

    env: Env
    conf: NetConf

    @property
    def key(self) -> tuple[str, str, str]:
        return self.conf.name, self.env.container_id, self.env.ifname

    @property
    def state_dir(self) -> Path:
        return Path(self.conf.state_dir.replace(CONTAINER_ID, self.env.container_id))

    def qmp_socket(self) -> str:
        """The VM's monitor: runtimeConfig, then CNI_ARGS, then the configured template."""
        runtime = self.conf.runtime_config.get("qmpSocket")
        if runtime is not None and not isinstance(runtime, str):
            raise _bad("runtimeConfig.qmpSocket", runtime, "must be a path")
        for source, value in (("runtimeConfig.qmpSocket", runtime),
                              (f"CNI_ARGS {ARG_QMP}", self.env.args.get(ARG_QMP)),
                              ("qmpSocket", self.conf.qmp_socket)):
            if value:
                path = value.replace(CONTAINER_ID, self.env.container_id)
                if not os.path.isabs(path):
                    raise _bad(source, value, "must be an absolute path")
                return path
        raise CniError(Code.INVALID_CONFIG, "no QMP socket for the VM: set qmpSocket (a path, "
                       f"{CONTAINER_ID} is replaced), runtimeConfig.qmpSocket or CNI_ARGS "
                       f"{ARG_QMP}=PATH")

    def mac(self) -> str:
        """Main mode's MAC: runtimeConfig.mac, CNI_ARGS MAC, the configuration, or none."""
        for source, value in (("runtimeConfig.mac", self.conf.runtime_config.get("mac")),
                              (f"CNI_ARGS {ARG_MAC}", self.env.args.get(ARG_MAC)),
                              ("mac", self.conf.mac)):
            if value:
                try:
                    return check_mac(source, value)
                except InvalidInputError as err:
                    raise CniError(Code.INVALID_CONFIG, str(err)) from err
        return ""


# --- attachment records -----------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class Attachment:
    """What one ADD plugged: enough for DEL, CHECK and GC to find it again, and only it."""

    network: str
    container_id: str
    ifname: str
    netns: str
    mac: str
    qmp_socket: str
    ipam: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return self.network, self.container_id, self.ifname

    def to_json(self) -> dict[str, Any]:
        return {"network": self.network, "containerID": self.container_id,
                "ifname": self.ifname, "netns": self.netns, "mac": self.mac,
                "qmpSocket": self.qmp_socket, "ipam": self.ipam}

    @classmethod
    def from_json(cls, data: object) -> Attachment | None:
        if not isinstance(data, dict):
            return None
        texts = ("network", "containerID", "ifname", "netns", "mac", "qmpSocket")
        if not all(isinstance(data.get(k), str) for k in texts) or \
                not isinstance(data.get("ipam", False), bool):
            return None
        return cls(network=data["network"], container_id=data["containerID"],
                   ifname=data["ifname"], netns=data["netns"], mac=data["mac"],
                   qmp_socket=data["qmpSocket"], ipam=data.get("ipam", False))


@attrs.frozen
class Records:
    known: tuple[Attachment, ...] = ()
    #: entries this version cannot read: written back as they were, never dropped.
    unknown: tuple[Any, ...] = ()

    def find(self, key: tuple[str, str, str]) -> Attachment | None:
        return next((a for a in self.known if a.key == key), None)

    def without(self, attachment: Attachment) -> Records:
        return Records(tuple(a for a in self.known if a != attachment), self.unknown)


class Book:
    """The attachment records kept in a VM's state directory, under the plugin's own lock."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / ATTACHMENTS_FILE

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """One CNI invocation per VM at a time (another runtime thread may be on it).

        The last DEL removes the directory, lock file included, while holding the lock; a
        waiter that then gets the lock of the removed file starts over on a fresh one, so
        two invocations never both hold "the" lock.
        """
        deadline = time.monotonic() + LOCK_TIMEOUT
        lock = self.dir / LOCK_FILE
        while True:
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise StateError(str(self.dir), f"cannot create: {err.strerror}") from err
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise CniError(Code.TRY_AGAIN, f"another qmpnet-cni holds "
                                           f"{self.dir} for more than {LOCK_TIMEOUT:g} s"
                                           ) from None
                        await asyncio.sleep(0.02)
                if _same_file(fd, lock):
                    yield
                    return
            finally:
                os.close(fd)

    def load(self) -> Records:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Records()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StateError(str(self.path), f"unreadable: {err}") from err
        items = data.get("attachments") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise StateError(str(self.path), "not a qmpnet-cni attachment file")
        known, unknown = [], []
        for item in items:
            parsed = Attachment.from_json(item)
            if parsed is None:
                unknown.append(item)
            else:
                known.append(parsed)
        return Records(tuple(known), tuple(unknown))

    def save(self, records: Records) -> None:
        """Write atomically (temp file, fsync, rename); no records left: no file."""
        if not records.known and not records.unknown:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        text = json.dumps({"version": 1, "attachments": [
            *(a.to_json() for a in records.known), *records.unknown]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{ATTACHMENTS_FILE}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(str(self.path), f"write: {err.strerror}") from err

    def remove_if_unused(self, state: NetworkState) -> None:
        """Remove the directory once nothing in it is in use: no record, entry or journal."""
        if self.load() != Records():
            return
        snap = state.store.load()
        if snap.entries or snap.unknown or state.store.journal():
            return
        with contextlib.suppress(FileNotFoundError):
            (self.dir / LOCK_FILE).unlink()
        state.store.remove_all()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one removed meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# --- delegated IPAM ---------------------------------------------------------------------------

def find_plugin(name: str, path: Sequence[str]) -> str:
    """The executable ``name`` in CNI_PATH, like a runtime finds a plugin."""
    if not path:
        raise CniError(Code.INVALID_ENV, f"CNI_PATH is empty: cannot find IPAM plugin {name}")
    for directory in path:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(Code.IPAM, f"IPAM plugin {name!r} not found in CNI_PATH",
                   "searched " + os.pathsep.join(path))


async def exec_plugin(binary: str, command: str, stdin: bytes, environ: Mapping[str, str],
                      overrides: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Run a delegated plugin as a runtime would; its error JSON is passed on as our error."""
    env = {**environ, **(overrides or {}), "CNI_COMMAND": command}
    log.debug("exec %s %s", binary, command)
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
    except OSError as err:
        raise CniError(Code.IPAM, f"cannot run {binary}: {err.strerror}") from err
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), IPAM_TIMEOUT)
    except TimeoutError as err:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CniError(Code.IPAM, f"{binary} {command}: no answer within {IPAM_TIMEOUT:g} s") \
            from err
    text = out.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        try:
            reply = json.loads(text)
            code, msg = int(reply["code"]), str(reply["msg"])
        except (ValueError, KeyError, TypeError):
            raise CniError(Code.IPAM, f"{binary} {command} failed with status "
                           f"{proc.returncode}", text[:2000]) from None
        raise CniError(code, f"{os.path.basename(binary)}: {msg}", str(reply.get("details", "")))
    if not text:
        return None
    try:
        reply = json.loads(text)
    except json.JSONDecodeError as err:
        raise CniError(Code.IPAM, f"{binary} {command}: output is not JSON", text[:2000]) \
            from err
    if not isinstance(reply, dict):
        raise CniError(Code.IPAM, f"{binary} {command}: output is not a JSON object")
    return reply


async def ipam(req: Request, command: str, overrides: Mapping[str, str] | None = None,
               ) -> dict[str, Any] | None:
    binary = find_plugin(req.conf.ipam_type, req.env.path)
    stdin = await ipam_config(req)
    return await exec_plugin(binary, command, stdin, req.env.environ, overrides)


async def ipam_config(req: Request) -> bytes:
    """The configuration for the IPAM plugin, in a version it speaks.

    A 1.1 configuration reaches IPAM plugins that speak only 1.0 (Debian's host-local):
    ADD, DEL and CHECK mean the same in both and their results have the same shape, so the
    plugin is asked in the newest 1.x version both sides speak. Versions before 1.0 differ
    in their result, so they are never substituted.
    """
    versions = await ipam_versions(req)
    if req.conf.cni_version in versions:
        return req.conf.raw
    common = [v for v in SUPPORTED_VERSIONS if v in versions and version_key(v) >= (1, 0, 0)
              and version_key(v) <= version_key(req.conf.cni_version)]
    if not common:
        raise CniError(Code.INCOMPATIBLE_VERSION, f"IPAM plugin {req.conf.ipam_type} does not "
                       f"speak CNI {req.conf.cni_version}",
                       "it speaks " + (", ".join(versions) or "nothing it would say"))
    data = {k: v for k, v in decode(req.conf.raw).items() if k not in GC_KEYS}
    return json.dumps({**data, "cniVersion": common[-1]}).encode()


async def ipam_versions(req: Request) -> list[str]:
    """The spec versions the IPAM plugin speaks, from its VERSION answer."""
    binary = find_plugin(req.conf.ipam_type, req.env.path)
    reply = await exec_plugin(binary, "VERSION",
                              json.dumps({"cniVersion": req.conf.cni_version}).encode(),
                              req.env.environ)
    versions = reply.get("supportedVersions", []) if reply else []
    return [str(v) for v in versions] if isinstance(versions, list) else []


async def ipam_speaks(req: Request, version: str) -> bool:
    """Whether the IPAM plugin has ``version`` (STATUS and GC are only sent to 1.1 plugins)."""
    return version in await ipam_versions(req)


async def ipam_release(req: Request, found: Attachment) -> None:
    """GC's release of one stale attachment's address: the DEL that attachment would have had.

    GC comes with a 1.1 configuration; :func:`ipam_config` asks a 1.0 IPAM plugin in 1.0.
    """
    await ipam(req, "DEL", _attachment_env(found))


def ips_of(result: Mapping[str, Any], interface: int | None) -> tuple[IPAddress, ...]:
    """The result's addresses (of interface index ``interface``; None: all) as IPAddress."""
    out = []
    ips = result.get("ips") or []
    if not isinstance(ips, list):
        raise CniError(Code.DECODE, "result ips must be a list")
    for ip in ips:
        if not isinstance(ip, dict):
            raise CniError(Code.DECODE, f"result ips entry {ip!r} is not an object")
        if interface is not None and ip.get("interface") != interface:
            continue
        try:
            iface = ipaddress.ip_interface(str(ip.get("address")))
        except ValueError as err:
            raise CniError(Code.DECODE, f"result address {ip.get('address')!r} is not "
                           "an address with a prefix") from err
        out.append(IPAddress(family=iface.version, address=str(iface.ip),
                             mask=str(iface.network.prefixlen)))
    return tuple(out)


# --- results ----------------------------------------------------------------------------------

def interface_entry(version: str, name: str, mac: str, sandbox: str, mtu: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "mac": mac, "sandbox": sandbox}
    if version_key(version) >= (1, 1, 0):
        entry["mtu"] = mtu  # a 1.1 field
    return entry


def sandbox_mac(endpoint: Endpoint) -> str:
    """The MAC ``CNI_IFNAME`` wears while plugged: macvtap and bridged park the pod's link on
    another one (the VM's NIC has the pod's), tcfilter leaves it as it was."""
    pair = endpoint.network_pair
    if pair is not None and pair.model in (InterworkingModel.MACVTAP,
                                           InterworkingModel.BRIDGED):
        return parked_mac(endpoint.id)
    return endpoint.hardware_addr


def chained_result(conf: NetConf, env: Env, mac: str, mtu: int) -> dict[str, Any]:
    """prevResult passed on, in the configuration's version, with our interface as it now is
    (``mac``: what the link in the netns wears, so a later plugin's CHECK agrees)."""
    result = copy.deepcopy(dict(conf.prev_result or {}))
    result["cniVersion"] = conf.cni_version
    interfaces = result.setdefault("interfaces", [])
    if not isinstance(interfaces, list):
        raise CniError(Code.DECODE, "prevResult interfaces must be a list")
    ours = [i for i in interfaces if isinstance(i, dict) and i.get("name") == env.ifname
            and i.get("sandbox") == env.netns]
    for entry in ours:
        entry["mac"] = mac
    if not ours:
        interfaces.append(interface_entry(conf.cni_version, env.ifname, mac, env.netns, mtu))
    return result


def prev_interface(conf: NetConf, env: Env) -> tuple[int | None, Mapping[str, Any] | None]:
    """Index and entry of CNI_IFNAME in prevResult's interfaces, if listed."""
    interfaces = (conf.prev_result or {}).get("interfaces") or []
    if not isinstance(interfaces, list):
        raise CniError(Code.DECODE, "prevResult interfaces must be a list")
    for index, iface in enumerate(interfaces):
        if isinstance(iface, dict) and iface.get("name") == env.ifname and \
                iface.get("sandbox", env.netns) == env.netns:
            return index, iface
    return None, None


def main_result(conf: NetConf, env: Env, mac: str, ipam_result: Mapping[str, Any] | None,
                ) -> dict[str, Any]:
    result: dict[str, Any] = {
        "cniVersion": conf.cni_version,
        "interfaces": [interface_entry(conf.cni_version, env.ifname, mac, env.netns, conf.mtu)],
    }
    got = ipam_result or {}
    ips = [{**ip, "interface": 0} for ip in got.get("ips") or [] if isinstance(ip, dict)]
    if ips:
        result["ips"] = ips
    if got.get("routes"):
        result["routes"] = got["routes"]
    dns = got.get("dns") or conf.dns
    if dns:
        result["dns"] = dns
    return result


# --- the VM side ------------------------------------------------------------------------------


def _vm_gone(err: QmpConnectError) -> bool:
    """The monitor's socket is missing or refuses: QEMU is not running (any more)."""
    return isinstance(err.__cause__, FileNotFoundError | ConnectionRefusedError)


def _entry_for(state: NetworkState, mac: str) -> Entry | None:
    return next((e for e in state.store.load().entries if e.endpoint.hardware_addr == mac), None)


async def _forget(state: NetworkState, entry: Entry) -> None:
    """The VM is gone with its device: undo the host side and drop the state entry.

    The endpoint's ``detach`` only touches host links; it is given a session that was never
    connected, so nothing can reach for the QEMU that is not there.
    """
    session = QmpSession(QMPClient("gone"), state.qmp_path, 1.0, log.getChild("gone"))
    hypervisor = QemuHypervisor(session)
    op = Operation("forget", entry.endpoint.name, subject=entry.endpoint)
    async with op:
        await entry.endpoint.detach(PlugContext(hypervisor, state.config, op),
                                    netns_created=True)
        op.commit()
    async with state.store.locked():
        snap = state.store.load()
        state.store.save(attrs.evolve(snap, entries=tuple(
            e for e in snap.entries if e.endpoint.id != entry.endpoint.id)))


async def unplug(attachment: Attachment, state_dir: Path, config: Config) -> None:
    """Unplug one attachment; success when the VM, the device or the state is already gone."""
    state = NetworkState.open(state_dir, attachment.qmp_socket, config)
    entry = _entry_for(state, attachment.mac)
    if entry is None:
        if state.store.journal():
            # an ADD that failed and could not undo itself: finish its rollback now
            async with state.store.locked():
                report = await recover_journal(state)
            if not report.ok:
                raise CniError(Code.TRY_AGAIN, f"{attachment.ifname}: the rollback of its "
                               "failed ADD is not finished", "; ".join(report.errors))
            return
        log.info("%s has no state entry: nothing to unplug", attachment.ifname)
        return
    try:
        await state.remove_interface(attachment.mac)
    except NoSuchInterfaceError:
        log.info("%s was unplugged meanwhile", attachment.ifname)
    except QmpConnectError as err:
        if not _vm_gone(err):
            raise
        log.info("the VM is gone (%s): removing the host side of %s only", err,
                 attachment.ifname)
        await _forget(state, entry)


async def sandbox_link(netns: str, ifname: str) -> tuple[str, int, str]:
    """MAC, MTU and kind of the link the main plugin made, as the kernel reports them."""
    async with Links.open(netns) as links:
        info = await links.lookup(ifname)
    if info is None:
        raise CniError(Code.NO_INTERFACE, f"no interface {ifname} in {netns}",
                       "the main plugin of the chain must create CNI_IFNAME in CNI_NETNS")
    try:
        mac = check_mac(f"MAC of {ifname}", info.mac)
    except InvalidInputError as err:
        raise CniError(Code.UNSUPPORTED, str(err)) from err
    # No kind: a plain device (moved in by host-device, say), refused with the reason.
    return mac, info.mtu, info.kind or "device"


# --- commands ---------------------------------------------------------------------------------

async def cmd_add(req: Request) -> dict[str, Any]:
    env, conf = req.env, req.conf
    check_netns(env.netns)
    qmp = req.qmp_socket()
    book = Book(req.state_dir)
    async with book.locked():
        records = book.load()
        if records.find(req.key) is not None:
            raise CniError(Code.ATTACHMENT_EXISTS, f"{env.ifname} of container "
                           f"{env.container_id} is already attached to network {conf.name}",
                           "DEL it first")
        state = NetworkState.open(req.state_dir, qmp, conf.config())
        try:
            if conf.main:
                return await _add_main(req, book, records, state)
            return await _add_chained(req, book, records, state)
        finally:
            book.remove_if_unused(state)


async def _add_chained(req: Request, book: Book, records: Records,
                       state: NetworkState) -> dict[str, Any]:
    env, conf = req.env, req.conf
    mac, mtu, kind = await sandbox_link(env.netns, env.ifname)
    index, _ = prev_interface(conf, env)
    addrs = ips_of(conf.prev_result or {}, index) if index is not None else ()
    desc = InterfaceDescription(device=env.ifname, name=env.ifname, hw_addr=mac, mtu=mtu,
                                ip_addresses=addrs, link_type=kind)
    record = Attachment(network=conf.name, container_id=env.container_id, ifname=env.ifname,
                        netns=env.netns, mac=mac, qmp_socket=state.qmp_path)
    # The record goes first: a crash after the plug leaves something DEL can find.
    book.save(Records((*records.known, record), records.unknown))
    try:
        plugged = await state.add_interface(desc, model=conf.model, netns_path=env.netns,
                                            queues=conf.queues, wait_guest=conf.wait_guest)
    except BaseException:
        _forget_failed_add(book, records, state)
        raise
    return chained_result(conf, env, sandbox_mac(plugged), mtu)


async def _add_main(req: Request, book: Book, records: Records,
                    state: NetworkState) -> dict[str, Any]:
    env, conf = req.env, req.conf
    mac = req.mac() or random_mac()
    got = await ipam(req, "ADD") if conf.ipam else None
    record = Attachment(network=conf.name, container_id=env.container_id, ifname=env.ifname,
                        netns=env.netns, mac=mac, qmp_socket=state.qmp_path,
                        ipam=conf.ipam is not None)
    try:
        addrs = ips_of(got, None) if got else ()
        desc = InterfaceDescription(device=env.ifname, name=env.ifname, hw_addr=mac,
                                    mtu=conf.mtu, ip_addresses=addrs, link_type="tap")
        book.save(Records((*records.known, record), records.unknown))
        await state.add_interface(desc, model=InterworkingModel.NONE, netns_path=env.netns,
                                  tap_name=env.ifname, queues=conf.queues,
                                  wait_guest=conf.wait_guest)
    except BaseException:
        _forget_failed_add(book, records, state)
        if conf.ipam:
            try:
                await ipam(req, "DEL")
            except CniError as err:
                log.error("releasing the address of %s after a failed ADD: %s", env.ifname, err)
        raise
    return main_result(conf, env, mac, got)


def _forget_failed_add(book: Book, records: Records, state: NetworkState) -> None:
    """Drop the record of an ADD that undid itself; keep it when its undo could not finish
    (the journal still holds the plug), so the runtime's DEL finds the VM and settles it."""
    if not state.store.journal():
        book.save(records)


async def cmd_del(req: Request) -> None:
    """Unplug and forget; every "already gone" is success, as the spec demands."""
    conf = req.conf
    if req.state_dir.is_dir():
        book = Book(req.state_dir)
        async with book.locked():
            records = book.load()
            found = records.find(req.key)
            qmp = found.qmp_socket if found else ""
            state = NetworkState.open(req.state_dir, qmp, conf.config())
            if found is not None:
                await unplug(found, req.state_dir, conf.config())
                book.save(records.without(found))
            book.remove_if_unused(state)
    if conf.main and conf.ipam:
        await ipam(req, "DEL")


async def cmd_check(req: Request) -> None:
    """The attachment is recorded, in qmpnet's state, in QEMU with its MAC, and on the host."""
    env, conf = req.env, req.conf
    check_netns(env.netns)
    book = Book(req.state_dir)
    if not book.path.exists():
        raise CniError(Code.CHECK_FAILED, f"no attachment of {env.ifname} is recorded in "
                       f"{req.state_dir}")
    async with book.locked():
        found = book.load().find(req.key)
        if found is None:
            raise CniError(Code.CHECK_FAILED, f"no attachment of {env.ifname} to network "
                           f"{conf.name} is recorded")
        state = NetworkState.open(req.state_dir, found.qmp_socket, conf.config())
        entry = _entry_for(state, found.mac)
        if entry is None or entry.status is not Status.PLUGGED:
            raise CniError(Code.CHECK_FAILED, f"qmpnet's state has no plugged NIC with MAC "
                           f"{found.mac} for {env.ifname}")
        await _check_qemu(state, entry.endpoint, found.mac)
        await _check_host(entry.endpoint, found, conf.main)
    _check_prev_result(conf, env, entry.endpoint, found)
    if conf.main and conf.ipam:
        await ipam(req, "CHECK")


def _check_prev_result(conf: NetConf, env: Env, endpoint: Endpoint, found: Attachment) -> None:
    """prevResult (what ADD returned) must still describe the attachment: its MAC, and in
    main mode the addresses the VM's NIC was given."""
    index, prev = prev_interface(conf, env)
    if prev is None:
        return
    # main mode reports the VM NIC's MAC (the tap is only its wire); chained the link's
    expected = found.mac if conf.main else sandbox_mac(endpoint)
    if str(prev.get("mac", expected)).lower() != expected:
        raise CniError(Code.CHECK_FAILED, f"prevResult gives {env.ifname} MAC "
                       f"{prev.get('mac')}, it has {expected}")
    if conf.main:
        given = {a.cidr for a in ips_of(conf.prev_result or {}, index)}
        info = endpoint.properties
        have = {a.cidr for a in info.addrs} if info is not None else set()
        if given != have:
            raise CniError(Code.CHECK_FAILED, f"prevResult gives {env.ifname} the addresses "
                           f"{sorted(given)}, the VM's NIC was given {sorted(have)}")


async def _check_qemu(state: NetworkState, endpoint: Endpoint, mac: str) -> None:
    async with state.hypervisor() as hv:
        dev = device_id(plugged_tap(endpoint))
        if dev not in await hv.peripheral_ids():
            raise CniError(Code.CHECK_FAILED, f"QEMU has no device {dev} for {endpoint.name}")
        got = str(await hv.qmp.qom_get(f"/machine/peripheral/{dev}", "mac")).lower()
    if got != mac:
        raise CniError(Code.CHECK_FAILED, f"QEMU's device {dev} has MAC {got}, not {mac}")


async def _check_host(endpoint: Endpoint, found: Attachment, main: bool) -> None:
    names = [host_link(endpoint)] if main else [found.ifname, host_link(endpoint)]
    async with Links.open(found.netns) as links:
        for name in filter(None, names):
            if await links.lookup(name) is None:
                raise CniError(Code.CHECK_FAILED, f"{name} is missing from {found.netns}")


async def cmd_status(req: Request) -> None:
    """Ready when taps can be made and, in main mode, the IPAM plugin is there and ready."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise CniError(Code.NOT_AVAILABLE, f"plugin not available: {TUN_PATH}: "
                       f"{err.strerror}", "qmpnet needs the tun driver to make taps") from err
    os.close(fd)
    if req.conf.main and req.conf.ipam:
        try:
            find_plugin(req.conf.ipam_type, req.env.path)
        except CniError as err:
            raise CniError(Code.NOT_AVAILABLE, f"plugin not available: {err.msg}",
                           err.details) from err
        try:
            await ipam_config(req)
        except CniError as err:
            raise CniError(Code.NOT_AVAILABLE, f"plugin not available: {err.msg}",
                           err.details) from err
        if await ipam_speaks(req, LATEST):
            await ipam(req, "STATUS")


def state_dirs(template: str) -> Iterator[tuple[Path, str]]:
    """Every existing state directory the template names, with its container id."""
    prefix, _, suffix = template.partition(CONTAINER_ID)
    for found in sorted(glob.glob(glob.escape(prefix) + "*" + glob.escape(suffix))):
        container = found[len(prefix):len(found) - len(suffix)]
        if _NAME_RE.match(container) and os.path.isdir(found):
            yield Path(found), container


async def cmd_gc(req: Request) -> None:
    """Unplug this network's attachments that are not in the valid list; the rest stays."""
    conf = req.conf
    if conf.valid_attachments is None:
        raise _bad(GC_KEYS[0], None, "GC needs the list of valid attachments")
    valid = set(conf.valid_attachments)
    failures: list[CniError] = []
    for directory, _ in state_dirs(conf.state_dir):
        try:
            await _gc_directory(req, directory, valid, failures)
        except QmpnetError as err:  # one broken directory must not stop the others
            failures.append(to_cni_error(err))
    if conf.main and conf.ipam and await ipam_speaks(req, LATEST):
        await ipam(req, "GC")
    if failures:
        raise CniError(failures[0].code, f"GC could not remove {len(failures)} attachment(s): "
                       + failures[0].msg, "; ".join(f.msg for f in failures))


async def _gc_directory(req: Request, directory: Path, valid: set[tuple[str, str]],
                        failures: list[CniError]) -> None:
    conf = req.conf
    book = Book(directory)
    async with book.locked():
        records = book.load()
        for found in records.known:
            if found.network != conf.name or (found.container_id, found.ifname) in valid:
                continue
            try:
                await unplug(found, directory, conf.config())
                if found.ipam and conf.main and conf.ipam:
                    await ipam_release(req, found)
            except QmpnetError as err:
                failures.append(to_cni_error(err))
                continue
            records = records.without(found)
            book.save(records)
            log.info("GC removed %s of container %s", found.ifname, found.container_id)
        book.remove_if_unused(NetworkState.open(directory, "", conf.config()))


def _attachment_env(found: Attachment) -> dict[str, str]:
    """The environment a DEL of ``found`` would have had, for its IPAM release."""
    return {"CNI_CONTAINERID": found.container_id, "CNI_IFNAME": found.ifname,
            "CNI_NETNS": found.netns if netns_exists(found.netns) else "", "CNI_ARGS": ""}


def cmd_version(raw: bytes) -> dict[str, Any]:
    asked: object = None
    if raw.strip():
        with contextlib.suppress(CniError):
            asked = decode(raw).get("cniVersion")
    version = asked if isinstance(asked, str) and asked in SUPPORTED_VERSIONS else LATEST
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}


#: CNI_COMMAND -> its handler; VERSION needs no configuration and is answered before.
COMMANDS: Mapping[str, Callable[[Request], Coroutine[Any, Any, dict[str, Any] | None]]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}


# --- the program ------------------------------------------------------------------------------

_FORMAT = logging.Formatter("%(asctime)s qmpnet-cni[%(process)d] %(levelname)s %(name)s: "
                            "%(message)s")


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
        version = json.loads(raw).get("cniVersion")
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
    try:
        env = Env.from_environ(environ)
        if env.command == "VERSION":
            return 0, json.dumps(cmd_version(raw))
        conf = NetConf.parse(raw, env.command)
        if conf.log_file:
            logs.to_file(conf.log_file)
        log.info("%s container=%s ifname=%s netns=%s network=%s model=%s", env.command,
                 env.container_id, env.ifname, env.netns, conf.name, conf.model)
        # Anything printed by accident lands on stderr: stdout carries only the answer.
        with contextlib.redirect_stdout(sys.stderr):
            result: dict[str, Any] | None = asyncio.run(COMMANDS[env.command](Request(env, conf)))
    except Exception as err:  # every failure becomes the spec's error JSON, never a traceback
        cni_err = to_cni_error(err)
        level = logging.ERROR if cni_err.code != Code.INTERNAL else logging.CRITICAL
        log.log(level, "%s failed: code %d: %s", environ.get("CNI_COMMAND", "?"),
                cni_err.code, cni_err.msg)
        log.debug("traceback", exc_info=True)
        return 1, json.dumps(cni_err.to_json(_error_version(raw)))
    if result is None:
        return 0, ""
    return 0, json.dumps(result)


def main() -> None:
    """The ``qmpnet-cni`` console script."""
    try:
        raw = sys.stdin.buffer.read()
    except OSError as err:
        raw = b""
        status, out = 1, json.dumps(CniError(Code.IO_FAILURE, f"reading stdin: {err}")
                                    .to_json(LATEST))
    else:
        status, out = run(raw, os.environ)
    if out:
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
    sys.exit(status)


__all__ = [
    "Attachment", "Book", "CniError", "Code", "Env", "NetConf", "Request", "SUPPORTED_VERSIONS",
    "chained_result", "main", "main_result", "parse_cni_args", "run", "to_cni_error",
]
