"""One invocation's input, checked: the ``CNI_*`` environment and the network configuration,
and where the VM it names lives (:class:`Vms`).

The commands in :mod:`.commands` are the same in the plugin's process and inside qmpnetd;
what differs is who owns the VM's qmpnet state and session. :class:`Vms` is the direct
mode: the state lives in the attachment's ``stateDir`` and each invocation connects on its
own. The service subclasses it (:mod:`qmpnet.service.cni`) to hand out its kept per-VM state
and session, and to keep the attachments of VMs that are not there yet *pending* instead of
failing the ADD.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from qmpnet.bandwidth import Bandwidth
from qmpnet.boundary import Boundary
from qmpnet.cni.records import Attachment
from qmpnet.cni.spec import (
    ARG_MAC,
    ARG_QMP,
    CONTAINER_ID,
    DEFAULT_STATE_DIR,
    GC_KEYS,
    NAME_RE,
    CniError,
    Code,
    check_version,
    decode,
)
from qmpnet.config import Config, Timeouts, check_queue_count
from qmpnet.errors import InvalidInputError, shown
from qmpnet.model import (
    InterworkingModel,
    check_ifname,
    check_mac,
    check_mtu,
    checked_by,
    checked_if_set,
    lowered,
)
from qmpnet.network import NetworkState
from qmpnet.service import protocol

#: CNI_COMMAND -> the variables the spec makes mandatory for it.
REQUIRED_ENV: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "VERSION": (),
    "STATUS": (),
    "GC": (),
}


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` as runtimes pass CNI_ARGS; keys qmpnet does not know are ignored."""
    out: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(Code.INVALID_ENV, f"CNI_ARGS: {shown(pair)} is not KEY=VALUE")
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
            raise CniError(
                Code.INVALID_ENV,
                f"CNI_COMMAND {shown(command)} is not one of " + ", ".join(REQUIRED_ENV),
            )
        for var in REQUIRED_ENV[command]:
            if not environ.get(var):
                raise CniError(Code.INVALID_ENV, f"{var} is required for {command}")
        container_id = environ.get("CNI_CONTAINERID", "")
        if container_id and not NAME_RE.fullmatch(container_id):
            raise CniError(
                Code.INVALID_ENV,
                f"CNI_CONTAINERID {shown(container_id)}: must be "
                "letters, digits, '_', '.' or '-', starting with a letter or digit",
            )
        netns = environ.get("CNI_NETNS", "")
        if netns and not os.path.isabs(netns):
            raise CniError(Code.INVALID_ENV, f"CNI_NETNS {shown(netns)}: must be an absolute path")
        ifname = environ.get("CNI_IFNAME", "")
        if ifname:
            try:
                check_ifname("CNI_IFNAME", ifname)
            except InvalidInputError as err:
                raise CniError(Code.INVALID_ENV, str(err)) from err
        path = tuple(p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p)
        return cls(
            command=command,
            container_id=container_id,
            netns=netns,
            ifname=ifname,
            args=parse_cni_args(environ.get("CNI_ARGS", "")),
            path=path,
            environ=dict(environ),
        )


def bad_config(key: str, value: object, why: str) -> CniError:
    what = f"invalid network configuration: {key} {shown(value)}: {why}"
    return CniError(Code.INVALID_CONFIG, what)


def _check_path(field: str, value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise InvalidInputError(field, value, "must be an absolute path")
    return value


def _check_state_dir(field: str, value: object) -> str:
    if _check_path(field, value).count(CONTAINER_ID) != 1:
        raise InvalidInputError(
            field, value, f"must contain {CONTAINER_ID} exactly once (one VM per pod)"
        )
    return str(value)


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidInputError(
            field,
            value,
            "must be letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return value


_CNI_MODELS = ("tcfilter", "macvtap", "bridged", "none", "default")


def _cni_model(value: object) -> InterworkingModel:
    """The models a CNI configuration may name (not ``enlightened``), ``default`` resolved."""
    if not isinstance(value, str) or value not in _CNI_MODELS:
        raise InvalidInputError("model", value, "valid values are " + ", ".join(_CNI_MODELS[:4]))
    return InterworkingModel.parse(value).resolved()


def _valid_attachments(data: Mapping[str, Any]) -> tuple[tuple[str, str], ...] | None:
    key = next((k for k in GC_KEYS if k in data), None)
    if key is None:
        return None
    items = data[key]
    if not isinstance(items, list):
        raise bad_config(key, items, "must be a list")
    out = []
    for item in items:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise bad_config(key, item, 'each entry must be {"containerID": ..., "ifname": ...}')
        out.append((item["containerID"], item["ifname"]))
    return tuple(out)


@attrs.frozen(kw_only=True)
class NetConf:
    """The network configuration, checked once; ``raw`` is exactly what came on stdin."""

    cni_version: str
    name: str = attrs.field(validator=checked_by(_check_name))
    qmp_socket: str = attrs.field(default="", validator=checked_if_set(_check_path))
    state_dir: str = attrs.field(default=DEFAULT_STATE_DIR, validator=checked_by(_check_state_dir))
    model: InterworkingModel = InterworkingModel.TCFILTER
    queues: int = attrs.field(default=0, validator=checked_by(check_queue_count))
    disable_vhost: bool = False
    wait_guest: bool = False
    #: main mode only: CNI_NETNS may be qmpnet's own (the host's) namespace
    allow_host_netns: bool = False
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    mac: str = attrs.field(default="", converter=lowered, validator=checked_if_set(check_mac))
    mtu: int = attrs.field(default=1500, validator=checked_by(check_mtu))
    log_file: str = ""
    ipam: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    dns: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    prev_result: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    runtime_config: Mapping[str, Any] = attrs.field(factory=dict, hash=False)
    #: qmpnetd's socket: when it is there the plugin's process only forwards the invocation
    #: ("" always does the work in the plugin's process; read by :mod:`.entry` first)
    qmpnetd: str = attrs.field(
        default=protocol.DEFAULT_SOCKET, validator=checked_if_set(_check_path)
    )
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
        return Config(
            internetworking_model=self.model,
            disable_vhost_net=self.disable_vhost,
            queues=self.queues,
            timeouts=self.timeouts,
        )

    @classmethod
    def parse(cls, raw: bytes, command: str) -> NetConf:
        data = decode(raw)
        check_version(data.get("cniVersion"), command)
        if not isinstance(data.get("type"), str) or not data["type"]:
            raise bad_config("type", data.get("type"), "must be the plugin's name")
        try:
            conf = CNI.structure(data, cls)
        except InvalidInputError as err:
            raise bad_config(err.field, err.value, err.reason) from err
        model, ipam, prev = conf.model, conf.ipam, conf.prev_result
        if model is InterworkingModel.NONE:
            if prev is not None and command == "ADD":
                raise CniError(
                    Code.INVALID_CONFIG,
                    "invalid network configuration: model "
                    "none makes its own tap: it must be the first plugin of the "
                    "list, not chained after another (prevResult is set)",
                )
            if ipam is not None and (
                not isinstance(ipam.get("type"), str) or not NAME_RE.fullmatch(ipam["type"])
            ):
                raise bad_config("ipam.type", ipam.get("type"), "must name an IPAM plugin binary")
        elif conf.allow_host_netns:
            raise bad_config(
                "allowHostNetns",
                True,
                f"model {model} chains after a main plugin and joins the pod's link; "
                "only model none makes a tap of its own, and only it may use the host's netns",
            )
        elif ipam is not None:
            raise CniError(
                Code.INVALID_CONFIG,
                "invalid network configuration: ipam is set "
                f"but model {model} chains after a main plugin, which does the "
                "IPAM; only model none delegates IPAM itself",
            )
        elif prev is None and command in ("ADD", "CHECK"):
            raise CniError(
                Code.INVALID_CONFIG,
                f"invalid network configuration: model {model} "
                "plugs the veth a main plugin made, but there is no prevResult: "
                "chain it after one (or use model none)",
            )
        return attrs.evolve(conf, valid_attachments=_valid_attachments(data), raw=raw)


#: the network configuration on stdin: unknown keys are the runtime's, and ignored.
CNI = Boundary("network configuration", none_is_absent=True)
CNI.register(Timeouts, {"guest_ready": "guestReady"})
CNI.register(
    NetConf,
    {
        "cni_version": "cniVersion",
        "qmp_socket": "qmpSocket",
        "state_dir": "stateDir",
        "disable_vhost": "disableVhost",
        "wait_guest": "waitGuest",
        "allow_host_netns": "allowHostNetns",
        "log_file": "logFile",
        "prev_result": "prevResult",
        "runtime_config": "runtimeConfig",
    },
    forbid_extra_keys=False,
    hooks={"model": _cni_model},
    omit=("valid_attachments", "raw"),
)


class Deferred(enum.Enum):
    """What the service knows of an attachment it has not plugged."""

    #: recorded at ADD, waiting for its VM
    PENDING = "pending"
    #: its VM appeared, and the plug failed (and was undone); DEL clears it
    FAILED = "failed"


class Vms:
    """The direct mode: every VM's state in the attachment's own directory."""

    #: an ADD whose VM is not there may be kept pending (only the service can finish it)
    defers = False

    async def state(self, state_dir: Path, qmp: str, config: Config) -> NetworkState:
        """The VM's qmpnet state for one command, with that command's settings."""
        return NetworkState.open(state_dir, qmp, config)

    def registered_socket(self, container_id: str) -> str:
        """The QMP socket a runtime registered for this sandbox ("" if none)."""
        return ""

    async def present(self, qmp: str) -> bool:
        """Whether a QEMU serves ``qmp`` now (the direct mode tries and reports the error)."""
        return True

    async def defer(self, req: Request, qmp: str, result: Mapping[str, Any], **kw: Any) -> None:
        """Keep the attachment pending until its VM appears (the service only)."""
        raise NotImplementedError

    async def cancel(self, req: Request) -> bool:
        """Drop the attachment if it is pending; whether it was."""
        return False

    def deferred(self, req: Request) -> tuple[Deferred, str] | None:
        """The attachment's pending or failed state and why, if the service holds it so."""
        return None

    async def collect(self, network: str, valid: set[tuple[str, str]]) -> list[Attachment]:
        """Drop this network's pending attachments missing from the valid list (GC): what
        was dropped, for the release of the addresses their ADD took."""
        return []


#: the direct mode's placement, shared by every invocation of the plugin's process
DIRECT = Vms()


@attrs.frozen
class Request:
    """One invocation: its environment and configuration, and what follows from both."""

    env: Env
    conf: NetConf
    #: where the VM's state and session come from: the plugin's own, or the service's
    vms: Vms = attrs.field(default=DIRECT, eq=False, repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.conf.name, self.env.container_id, self.env.ifname

    @property
    def state_dir(self) -> Path:
        return Path(self.conf.state_dir.replace(CONTAINER_ID, self.env.container_id))

    def qmp_socket(self) -> str:
        """The VM's monitor: runtimeConfig, then CNI_ARGS, then the configured template.

        Through the service, a VM registered under the sandbox's container id comes first,
        and no socket at all is fine: the attachment waits for the registration.
        """
        registered = self.vms.registered_socket(self.env.container_id)
        if registered:
            return registered
        runtime = self.conf.runtime_config.get("qmpSocket")
        if runtime is not None and not isinstance(runtime, str):
            raise bad_config("runtimeConfig.qmpSocket", runtime, "must be a path")
        for source, value in (
            ("runtimeConfig.qmpSocket", runtime),
            (f"CNI_ARGS {ARG_QMP}", self.env.args.get(ARG_QMP)),
            ("qmpSocket", self.conf.qmp_socket),
        ):
            if value:
                path = value.replace(CONTAINER_ID, self.env.container_id)
                if not os.path.isabs(path):
                    raise bad_config(source, value, "must be an absolute path")
                return path
        if self.vms.defers:
            return ""
        raise CniError(
            Code.INVALID_CONFIG,
            "no QMP socket for the VM: set qmpSocket (a path, "
            f"{CONTAINER_ID} is replaced), runtimeConfig.qmpSocket or CNI_ARGS "
            f"{ARG_QMP}=PATH",
        )

    def bandwidth(self) -> Bandwidth | None:
        """CNI's ``bandwidth`` capability (``runtimeConfig.bandwidth``), bits/s and bits;
        ingress is into the pod, which is the guest's inbound (:mod:`qmpnet.bandwidth`)."""
        given = self.conf.runtime_config.get("bandwidth")
        if given is None:
            return None
        try:
            return Bandwidth.from_cni(given) or None
        except InvalidInputError as err:
            raise CniError(Code.INVALID_CONFIG, str(err)) from err

    def mac(self) -> str:
        """Main mode's MAC: runtimeConfig.mac, CNI_ARGS MAC, the configuration, or none."""
        for source, value in (
            ("runtimeConfig.mac", self.conf.runtime_config.get("mac")),
            (f"CNI_ARGS {ARG_MAC}", self.env.args.get(ARG_MAC)),
            ("mac", self.conf.mac),
        ):
            if value:
                try:
                    return check_mac(source, value)
                except InvalidInputError as err:
                    raise CniError(Code.INVALID_CONFIG, str(err)) from err
        return ""
