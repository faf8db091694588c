"""A real containerd CRI node for tests: a private containerd, a local pause image, a CRI client.

kubelet talks to a runtime over the CRI v1 gRPC API; this module does the same with the small
subset of that API in ``cri_runtime_v1.proto`` (the real package, names and field numbers),
against Debian's containerd 1.6 started just for the test:

- :func:`stubs` generates the Python gRPC stubs from the proto with grpcio-tools, once, into
  a cache directory keyed by the proto's hash (``$QMPNET_CRI_CACHE``, else
  ``~/.cache/qmpnet/cri``); nothing generated lives in the source tree.
- :func:`pause_image` writes a docker-archive tarball of a pause-like image made from
  busybox-static: ``/bin/busybox`` and a ``/pause`` script that sleeps until SIGTERM.
- :class:`Containerd` lays out a per-run directory (named with :data:`~.scene.RUN`) holding
  containerd's root, state, sockets, runc's root, the CNI ``bin_dir`` (symlinks to Debian's
  plugins and the installed ``qmpnet-cni``) and ``conf_dir``; starts containerd, imports the
  pause image with ``ctr``, and on :meth:`Containerd.close` removes every pod it still has,
  stops it by its pid, ends the shims it started (found by this run's socket path in their
  command line), unmounts what is left under the directory (netns, shm) and removes it all.
- :class:`CriClient` is the RuntimeService client over the unix socket (``grpc.aio``).

Host knobs this needs on these machines: ``restrict_oom_score_adj = true`` (the CRI plugin
cannot raise oom_score_adj here), ``netns_mounts_under_state_dir`` (the pod netns lives under
the per-run state directory, not ``/run/netns``), and a snapshotter that works on the host's
filesystem (overlayfs when a trial mount works, else native).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Self

import attrs

from qmpnet.poll import poll_until
from qmpnet.testing.scene import unique

__all__ = [
    "CNI_PLUGINS",
    "PROTO",
    "Containerd",
    "CriClient",
    "CriError",
    "SandboxStatus",
    "pause_image",
    "stubs",
]

PROTO = Path(__file__).with_name("cri_runtime_v1.proto")
#: the proto's package, as the real API has it
API = "runtime.v1"
DEBIAN_CNI = Path("/usr/lib/cni")
#: what ``bin_dir`` links to: Debian's plugins a conflist may use, and the installed plugin
CNI_PLUGINS: Mapping[str, Path] = {
    "bridge": DEBIAN_CNI / "bridge",
    "host-local": DEBIAN_CNI / "host-local",
    "loopback": DEBIAN_CNI / "loopback",
    "tuning": DEBIAN_CNI / "tuning",
    "qmpnet-cni": Path(sys.executable).with_name("qmpnet-cni"),
}
BUSYBOX = Path("/bin/busybox")
#: the shims' sockets: containerd 1.6 puts them here whatever its state directory is
SHIM_SOCKETS = Path("/run/containerd/s")
#: plugins a CRI node does not need (``opt`` would create /opt/containerd)
DISABLED_PLUGINS = (
    "io.containerd.internal.v1.opt",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
_SUN_PATH_MAX = 107
#: containerd goes on serving without a plugin that failed: its log says so
_CRI_FAILED = "failed to load plugin io.containerd.grpc.v1.cri"


class CriError(RuntimeError):
    """A CRI call failed: the method, gRPC's status code name and the runtime's message."""

    def __init__(self, method: str, code: str, details: str) -> None:
        super().__init__(f"CRI {method}: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details


# --- the stubs ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("QMPNET_CRI_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qmpnet" / "cri"


#: grpc's fork handlers run in a child forked while a channel is open (a QEMU or containerd
#: this process starts) and can abort it before its exec ("epoll_wait error: Bad file
#: descriptor", seen here as a QEMU that exited with SIGABRT before its monitors): off, before
#: grpc is first imported
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


@functools.cache
def stubs(cache_dir: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """``(messages, services)``: the ``_pb2`` and ``_pb2_grpc`` modules of :data:`PROTO`.

    Generated once into ``cache_dir/<sha256 of the proto>/`` (a finished directory is moved
    into place whole, so a concurrent or interrupted run never sees half of it).
    """
    source = PROTO.read_bytes()
    where = (cache_dir or default_cache_dir()) / hashlib.sha256(source).hexdigest()[:16]
    stem = PROTO.stem
    if not (where / f"{stem}_pb2_grpc.py").exists():
        where.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{where.name}-", dir=where.parent))
        try:
            shutil.copy(PROTO, scratch / PROTO.name)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"-I{scratch}",
                    f"--python_out={scratch}",
                    f"--grpc_python_out={scratch}",
                    str(scratch / PROTO.name),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"grpc_tools.protoc failed: {proc.stderr.strip()}")
            with contextlib.suppress(FileExistsError, OSError):
                scratch.rename(where)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    messages = _load(f"{stem}_pb2", where / f"{stem}_pb2.py")
    services = _load(f"{stem}_pb2_grpc", where / f"{stem}_pb2_grpc.py")
    return messages, services


def _load(name: str, path: Path) -> ModuleType:
    # the generated _grpc module imports its _pb2 by bare name: register it under that name
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- the pause image ------------------------------------------------------------------------

PAUSE_SCRIPT = b"""#!/bin/busybox sh
# a pod sandbox's process: do nothing until told to stop
trap 'exit 0' TERM INT
while :; do /bin/busybox sleep 3600 & wait $!; done
"""


def pause_image(path: Path, reference: str, busybox: Path = BUSYBOX) -> Path:
    """Write a docker-archive tarball (what ``ctr images import`` reads) of a pause image.

    One layer: ``/bin/busybox`` (static), ``/pause`` (its entrypoint), and the directories
    and files the runtime mounts over (the sandbox's rootfs is read-only).
    """
    if not busybox.exists():
        raise FileNotFoundError(f"{busybox} is missing: apt-get install busybox-static")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("bin", "dev", "etc", "proc", "sys", "tmp", "dev/shm"):
            _tar_add(tar, name, tarfile.DIRTYPE, mode=0o755)
        _tar_add(tar, "bin/busybox", data=busybox.read_bytes(), mode=0o755)
        _tar_add(tar, "bin/sh", tarfile.SYMTYPE, link="busybox")
        _tar_add(tar, "pause", data=PAUSE_SCRIPT, mode=0o755)
        for name in ("etc/hostname", "etc/hosts", "etc/resolv.conf"):
            _tar_add(tar, name, data=b"", mode=0o644)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "qmpnet.testing.cri.pause_image"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":")[1] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [reference], "Layers": [layer_name]}]
    with tarfile.open(path, mode="w") as tar:
        _tar_add(tar, config_name, data=config_bytes)
        _tar_add(tar, layer_name.split("/")[0], tarfile.DIRTYPE, mode=0o755)
        _tar_add(tar, layer_name, data=layer_bytes)
        _tar_add(tar, "manifest.json", data=json.dumps(manifest).encode())
    return path


def _tar_add(
    tar: tarfile.TarFile,
    name: str,
    kind: bytes = tarfile.REGTYPE,
    *,
    data: bytes = b"",
    mode: int = 0o644,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.mtime = 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


# --- the client -----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SandboxStatus:
    """PodSandboxStatus, parsed: the netns path and pid come from containerd's verbose info."""

    id: str
    #: "SANDBOX_READY" or "SANDBOX_NOTREADY"
    state: str
    ip: str
    netns: str
    pid: int
    #: containerd's verbose ``info`` record (its JSON parsed), for a failing test's message
    info: Mapping[str, Any] = attrs.field(eq=False, repr=False)


@attrs.define(eq=False)
class CriClient:
    """RuntimeService over containerd's unix socket; every call has a deadline.

    A failed call raises :class:`CriError` (from gRPC's error). ``on_sandbox`` hears every
    sandbox id RunPodSandbox answered, so the node can clean up after its pods.
    """

    socket: Path
    _channel: Any
    _stub: Any
    _images: Any
    _pb: ModuleType
    on_sandbox: Callable[[str], None] | None = None

    @classmethod
    def connect(cls, socket: Path, on_sandbox: Callable[[str], None] | None = None) -> CriClient:
        import grpc.aio

        messages, services = stubs()
        channel = grpc.aio.insecure_channel(f"unix://{socket}")
        return cls(
            socket,
            channel,
            services.RuntimeServiceStub(channel),
            services.ImageServiceStub(channel),
            messages,
            on_sandbox,
        )

    @property
    def pb(self) -> ModuleType:
        """The message classes, to build requests a helper here does not cover."""
        return self._pb

    async def _call(self, method: str, request: Any, timeout: float, *, stub: Any = None) -> Any:
        import grpc

        try:
            return await getattr(stub or self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise CriError(method, err.code().name, err.details() or "") from err

    async def version(self, timeout: float = 30.0) -> Any:
        return await self._call("Version", self._pb.VersionRequest(version="v1"), timeout)

    async def image_id(self, ref: str, timeout: float = 30.0) -> str:
        """The id the CRI knows image ``ref`` by, "" while it does not know it."""
        request = self._pb.ImageStatusRequest(image=self._pb.ImageSpec(image=ref))
        reply = await self._call("ImageStatus", request, timeout, stub=self._images)
        return str(reply.image.id) if reply.HasField("image") else ""

    def sandbox_config(
        self,
        name: str,
        *,
        namespace: str = "default",
        uid: str = "",
        attempt: int = 0,
        cgroup_parent: str = "",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Any:
        """A PodSandboxConfig as kubelet sends one for a pod with the pod network."""
        pb = self._pb
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(
                name=name, uid=uid or name, namespace=namespace, attempt=attempt
            ),
            hostname=name,
            labels=dict(labels or {}),
            annotations=dict(annotations or {}),
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=cgroup_parent,
                security_context=pb.LinuxSandboxSecurityContext(
                    namespace_options=pb.NamespaceOption(
                        network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD
                    )
                ),
            ),
        )

    async def run_pod_sandbox(
        self, config: Any, runtime_handler: str = "", timeout: float = 300.0
    ) -> str:
        request = self._pb.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler)
        reply = await self._call("RunPodSandbox", request, timeout)
        if self.on_sandbox is not None:
            self.on_sandbox(reply.pod_sandbox_id)
        return str(reply.pod_sandbox_id)

    async def stop_pod_sandbox(self, sandbox_id: str, timeout: float = 300.0) -> None:
        request = self._pb.StopPodSandboxRequest(pod_sandbox_id=sandbox_id)
        await self._call("StopPodSandbox", request, timeout)

    async def remove_pod_sandbox(self, sandbox_id: str, timeout: float = 300.0) -> None:
        request = self._pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id)
        await self._call("RemovePodSandbox", request, timeout)

    async def pod_sandbox_status(self, sandbox_id: str, timeout: float = 60.0) -> SandboxStatus:
        request = self._pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True)
        reply = await self._call("PodSandboxStatus", request, timeout)
        info: dict[str, Any] = json.loads(reply.info.get("info", "{}") or "{}")
        namespaces = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
        netns = next((n.get("path", "") for n in namespaces if n.get("type") == "network"), "")
        status = reply.status
        return SandboxStatus(
            id=status.id,
            state=self._pb.PodSandboxState.Name(status.state),
            ip=status.network.ip,
            netns=netns,
            pid=int(info.get("pid", 0) or 0),
            info=info,
        )

    async def list_pod_sandbox(self, timeout: float = 60.0) -> list[Any]:
        """Every sandbox the runtime knows (``PodSandbox`` messages)."""
        reply = await self._call("ListPodSandbox", self._pb.ListPodSandboxRequest(), timeout)
        return list(reply.items)

    async def close(self) -> None:
        await self._channel.close()


# --- the node -------------------------------------------------------------------------------


def _toml(value: object) -> str:
    """A TOML value: JSON's strings, booleans, numbers and arrays are TOML's too."""
    return json.dumps(value)


def overlay_works(where: Path) -> bool:
    """Whether an overlay mount with its upper directory under ``where`` works here."""
    trial = Path(tempfile.mkdtemp(prefix=".overlay-", dir=where))
    try:
        dirs = {k: trial / k for k in ("lower", "upper", "work", "merged")}
        for d in dirs.values():
            d.mkdir()
        options = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        mounted = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", options, str(dirs["merged"])],
            capture_output=True,
            check=False,
        )
        if mounted.returncode != 0:
            return False
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True, check=False)
        return True
    finally:
        shutil.rmtree(trial, ignore_errors=True)


def mounts_under(top: Path) -> list[str]:
    """Mount points at or below ``top`` (from /proc/self/mountinfo), deepest first."""
    found = []
    prefix = str(top).rstrip("/") + "/"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point.startswith(prefix) or point == str(top):
            found.append(point)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape") if "\\" in field else field


def pids_with_argument(text: str) -> list[int]:
    """Processes whose command line has an argument containing ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(text.encode() in arg for arg in args):
            found.append(int(entry.name))
    return found


def shim_socket(address: Path, namespace: str, sandbox_id: str) -> Path:
    """Where containerd 1.6 puts the shim socket of a task (runtime/v2/shim SocketAddress)."""
    digest = hashlib.sha256(f"{address}/{namespace}/{sandbox_id}".encode()).hexdigest()
    return SHIM_SOCKETS / digest


@attrs.define(eq=False)
class Containerd:
    """A containerd with its CRI plugin, private to one test; see the module docstring.

    ``node = Containerd.prepare()``; write the conflist with :meth:`write_conflist` (the CRI
    plugin loads it when it starts); ``await node.start()``; ``node.client()``; always
    ``await node.close()``.
    """

    #: the per-run directory everything lives in (its name carries the run prefix)
    top: Path
    name: str
    snapshotter: str
    sandbox_image: str
    cgroup_parent: str
    namespace: str = "k8s.io"
    #: sandbox ids RunPodSandbox answered (their shims' sockets are removed on close)
    sandboxes: set[str] = attrs.field(factory=set)
    _proc: asyncio.subprocess.Process | None = None
    _log: Any = None
    _clients: list[CriClient] = attrs.field(factory=list)
    _made_run_containerd: bool = False

    @classmethod
    def prepare(
        cls,
        base: Path | None = None,
        *,
        plugins: Mapping[str, Path] = CNI_PLUGINS,
        snapshotter: str = "",
    ) -> Self:
        """Lay out the directory, the CNI bin_dir, the pause image and config.toml."""
        name = unique("cd")
        top = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base or "/tmp"))
        node = cls(
            top,
            name,
            snapshotter="",
            sandbox_image=f"localhost/{name}-pause:1",
            cgroup_parent=f"/{name}",
        )
        try:
            if len(os.fsencode(node.socket)) + len(".ttrpc") > _SUN_PATH_MAX:
                raise ValueError(f"{node.socket} is too long for a unix socket")
            for d in (node.root, node.state, node.cni_bin, node.cni_conf, node.ipam_dir):
                d.mkdir(parents=True)
            for plugin, target in plugins.items():
                if not target.exists():
                    raise FileNotFoundError(f"CNI plugin {plugin}: {target} is missing")
                (node.cni_bin / plugin).symlink_to(target)
            node.snapshotter = snapshotter or ("overlayfs" if overlay_works(node.top) else "native")
            pause_image(node.top / "pause.tar", node.sandbox_image)
            node.config_path.write_text(node.config_toml())
        except BaseException:
            shutil.rmtree(top, ignore_errors=True)
            raise
        return node

    # where things are
    @property
    def socket(self) -> Path:
        return self.top / "containerd.sock"

    @property
    def root(self) -> Path:
        return self.top / "root"

    @property
    def state(self) -> Path:
        return self.top / "state"

    @property
    def runc_root(self) -> Path:
        return self.state / "runc"

    @property
    def cni_bin(self) -> Path:
        return self.top / "cni-bin"

    @property
    def cni_conf(self) -> Path:
        return self.top / "cni-conf"

    @property
    def ipam_dir(self) -> Path:
        """A host-local ``dataDir`` for the test's conflist, removed with the node."""
        return self.top / "ipam"

    @property
    def netns_dir(self) -> Path:
        return self.state / "io.containerd.grpc.v1.cri" / "netns"

    @property
    def config_path(self) -> Path:
        return self.top / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.top / "containerd.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("containerd is not started")
        return self._proc.pid

    def config_toml(self) -> str:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        runc = f"{cri}.containerd.runtimes.runc"
        return "\n".join(
            [
                "version = 2",
                f"root = {_toml(str(self.root))}",
                f"state = {_toml(str(self.state))}",
                f"disabled_plugins = {_toml(list(DISABLED_PLUGINS))}",
                "[grpc]",
                f"address = {_toml(str(self.socket))}",
                "[ttrpc]",
                f"address = {_toml(str(self.socket) + '.ttrpc')}",
                "[debug]",
                'address = ""',
                'level = "debug"',
                "[metrics]",
                'address = ""',
                f"[{cri}]",
                f"sandbox_image = {_toml(self.sandbox_image)}",
                "restrict_oom_score_adj = true",
                "netns_mounts_under_state_dir = true",
                "disable_apparmor = true",
                "enable_selinux = false",
                'stream_server_address = "127.0.0.1"',
                'stream_server_port = "0"',
                f"[{cri}.containerd]",
                f"snapshotter = {_toml(self.snapshotter)}",
                'default_runtime_name = "runc"',
                f"[{runc}]",
                'runtime_type = "io.containerd.runc.v2"',
                f"[{runc}.options]",
                f"BinaryName = {_toml(shutil.which('runc') or '/usr/sbin/runc')}",
                f"Root = {_toml(str(self.runc_root))}",
                "SystemdCgroup = false",
                f"[{cri}.cni]",
                f"bin_dir = {_toml(str(self.cni_bin))}",
                f"conf_dir = {_toml(str(self.cni_conf))}",
                "max_conf_num = 1",
                "",
            ]
        )

    def write_conflist(self, conflist: Mapping[str, Any], name: str = "10-test") -> Path:
        path = self.cni_conf / f"{name}.conflist"
        path.write_text(json.dumps(conflist, indent=2))
        return path

    async def start(self, timeout: float = 60.0) -> None:
        """Start containerd, wait for its socket and CRI, import the pause image."""
        self._made_run_containerd = not SHIM_SOCKETS.parent.exists()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "QMPNET_"))}
        self._log = self.log_path.open("ab")
        self._proc = await asyncio.create_subprocess_exec(
            "containerd",
            "--config",
            str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
        )
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(f"containerd exited ({self._proc.returncode}): {self.tail()}")
            failed = [line for line in self.log_lines() if _CRI_FAILED in line]
            if failed:
                raise RuntimeError(f"containerd's CRI plugin did not load: {failed[0]}")
            if self.socket.exists():
                try:
                    await client.version(timeout=5.0)
                    break
                except CriError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"containerd's CRI did not answer in {timeout:g} s")
            await asyncio.sleep(0.1)
        await self.ctr(
            "images", "import", "--snapshotter", self.snapshotter, str(self.top / "pause.tar")
        )
        # the CRI learns of an imported image from containerd's events: a RunPodSandbox
        # before it did would look for the pause image in a registry
        while not await client.image_id(self.sandbox_image, timeout=5.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the CRI did not see {self.sandbox_image} in {timeout:g} s")
            await asyncio.sleep(0.1)

    async def ctr(self, *args: str, timeout: float = 120.0) -> str:
        proc = await asyncio.create_subprocess_exec(
            "ctr",
            "-a",
            str(self.socket),
            "-n",
            self.namespace,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed: {out.decode(errors='replace')}")
        return out.decode(errors="replace")

    def client(self) -> CriClient:
        client = CriClient.connect(self.socket, on_sandbox=self.sandboxes.add)
        self._clients.append(client)
        return client

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    async def close(self, timeout: float = 60.0) -> list[str]:
        """Remove every pod, stop containerd and its shims, unmount and delete; return what
        had to be cleaned up by force (pods left, shims alive after containerd stopped)."""
        forced: list[str] = []
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(CriError, TimeoutError):
                client = self.client()
                for pod in await client.list_pod_sandbox(timeout=10.0):
                    forced.append(f"pod {pod.id}")
                    self.sandboxes.add(pod.id)
                    with contextlib.suppress(CriError):
                        await client.stop_pod_sandbox(pod.id, timeout=120.0)
                    with contextlib.suppress(CriError):
                        await client.remove_pod_sandbox(pod.id, timeout=120.0)
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        await self._stop(timeout)
        for pid in pids_with_argument(str(self.socket)):
            forced.append(f"process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # a pod's processes outlive a shim killed with SIGKILL: they are in this node's cgroups
        pods = self.cgroup_pids()
        for pid in pods:
            forced.append(f"pod process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if pods:
            with contextlib.suppress(TimeoutError):  # what stays is reported by leftovers()
                await poll_until(
                    lambda: not self.cgroup_pids(),
                    error=lambda: TimeoutError("pod processes did not end"),
                    timeout=timeout,
                    interval=0.05,
                )
        for point in mounts_under(self.top):
            forced.append(f"mount {point}")
            umount = await asyncio.create_subprocess_exec(
                "umount",
                "-l",
                point,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            await umount.wait()
        for sandbox in self.sandboxes:
            shim = shim_socket(self.socket, self.namespace, sandbox)
            if shim.exists() or shim.is_symlink():
                forced.append(f"shim socket {shim}")
                shim.unlink()
        self._remove_cgroups()
        if self._made_run_containerd:
            for d in (SHIM_SOCKETS, SHIM_SOCKETS.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.top, ignore_errors=True)
        return forced

    async def _stop(self, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()

    def cgroups(self) -> list[Path]:
        """The cgroup directories named by this node's cgroup parent, in every hierarchy."""
        top = Path("/sys/fs/cgroup")
        name = self.cgroup_parent.strip("/")
        found = [top / name] if (top / name).is_dir() else []
        with contextlib.suppress(OSError):
            found += [d / name for d in top.iterdir() if (d / name).is_dir()]
        return found

    def cgroup_pids(self) -> list[int]:
        """The processes in this node's cgroups (the pods' processes)."""
        found: set[int] = set()
        for where in self.cgroups():
            for procs in where.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    found.update(int(line) for line in procs.read_text().split())
        return sorted(found)

    def _remove_cgroups(self) -> None:
        for where in self.cgroups():
            for sub in sorted(where.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                where.rmdir()

    def leftovers(self) -> list[str]:
        """What of this node is still on the host (empty after :meth:`close`)."""
        found = [f"directory {self.top}"] if self.top.exists() else []
        found += [f"process {pid}" for pid in pids_with_argument(str(self.socket))]
        found += [f"mount {m}" for m in mounts_under(self.top)]
        found += [f"pod process {pid}" for pid in self.cgroup_pids()]
        found += [f"cgroup {c}" for c in self.cgroups()]
        found += [
            f"shim socket {s}"
            for s in (shim_socket(self.socket, self.namespace, i) for i in self.sandboxes)
            if s.exists()
        ]
        return found

    def netns(self) -> list[str]:
        """The pod netns containerd has under its state directory now."""
        where = self.netns_dir
        return sorted(p.name for p in where.iterdir()) if where.exists() else []
