"""A private libvirtd and a transient domain of the test guest, for the side-by-side bench.

The daemon is started by hand (there is no systemd here) inside its own mount namespace,
where empty directories of ours are bind-mounted over ``/etc/libvirt`` and
``/var/cache/libvirt``: it reads our ``qemu.conf`` and no persistent configuration of the
host, and neither the host's ``/etc`` nor its libvirt cache is touched. ``qemu.conf`` runs
QEMU as root, as the qmpnet side runs it: with the default ``libvirt-qemu`` user, libvirt
9.0 here finds ``/dev/kvm`` unusable for that user but usable for its probe, judges its
capability cache stale on every lookup and re-probes QEMU about fourteen times (~56 s) per
``virsh create``. ``stdio_handler = "file"`` avoids needing ``virtlogd``.

libvirt 9.0 refuses to start when the user ``libvirt-qemu`` does not exist (it resolves the
built-in default before reading ``qemu.conf``); :meth:`Libvirtd.start` creates that system
user when it is missing and :meth:`Libvirtd.stop` deletes it again.

Only processes started here are stopped, by pid: the daemon, and (if ``virsh destroy``
fails) the QEMU libvirt launched for our domain, found by its pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from xml.sax.saxutils import escape

import attrs

from bench.harness import Proc, name, spawn
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.vm import Machine

QEMU_USER = "libvirt-qemu"
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
stdio_handler = "file"
namespaces = []
"""
#: The domain's emulator: the same QEMU, with TCG on one host thread (libvirt 9.0 passes
#: ``-accel tcg[,tb-size=N]`` and has no setting for it), as qmpnet's test VMs run it, so
#: both sides of the bench run alike (see qmpnet.testing.vm for why one thread).
_TCG_ONE_THREAD = """\
#!/bin/sh
prev=
for arg do
    shift
    if [ "$prev" = -accel ]; then
        case "$arg" in tcg | tcg,*) arg="$arg,thread=single" ;; esac
    fi
    set -- "$@" "$arg"
    prev=$arg
done
exec /usr/bin/qemu-system-x86_64 "$@"
"""
#: Runs in the new mount namespace: our config dir over /etc/libvirt, our cache dir over
#: /var/cache/libvirt (or over /var/cache where libvirt has none yet, so that none is made),
#: then become libvirtd. libvirt caches what it probed of each emulator path; our paths are
#: new every run and the files would stay behind.
_MOUNT_AND_EXEC = (
    'mount --bind "$1" /etc/libvirt && '
    '{ mount --bind "$2" /var/cache/libvirt 2>/dev/null || '
    'mount --bind "$2" /var/cache; } && shift 2 && exec "$@"'
)
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _ensure_user() -> bool:
    """Create the system user libvirt insists on; True when this call created it."""
    if subprocess.run(["id", QEMU_USER], capture_output=True, check=False).returncode == 0:
        return False
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            QEMU_USER,
        ],
        capture_output=True,
        check=True,
    )
    return True


@attrs.define(eq=False)
class Libvirtd:
    """One libvirtd we started; ``virsh`` talks to it through its own socket."""

    workdir: Path
    uri: str
    pid: int
    created_user: bool
    #: seconds from spawn to the first successful ``virsh`` call
    startup: float
    _proc: asyncio.subprocess.Process = attrs.field(repr=False)

    @classmethod
    async def start(cls, workdir: Path, timeout: float = 300.0) -> Libvirtd:
        for tool in ("libvirtd", "virsh", "unshare", "useradd"):
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"{tool} not found: `make bench` installs libvirt-daemon, "
                    "libvirt-daemon-driver-qemu and libvirt-clients"
                )
        etc, sock, cache = workdir / "etc", workdir / "sock", workdir / "cache"
        etc.mkdir()
        sock.mkdir()
        cache.mkdir()
        (etc / "qemu.conf").write_text(QEMU_CONF)
        conf = workdir / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{sock}"\nauth_unix_rw = "none"\n'
            f'auth_unix_ro = "none"\nlog_outputs = "3:file:{workdir}/libvirtd.log"\n'
        )
        created = await asyncio.to_thread(_ensure_user)
        started = time.monotonic()
        try:
            with (workdir / "libvirtd.out").open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    _MOUNT_AND_EXEC,
                    "sh",
                    str(etc),
                    str(cache),
                    "libvirtd",
                    "-f",
                    str(conf),
                    "-p",
                    str(workdir / "libvirtd.pid"),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    preexec_fn=_die_with_parent,
                )
        except BaseException:
            if created:
                await asyncio.to_thread(_delete_user)
            raise
        daemon = cls(
            workdir, f"qemu:///system?socket={sock}/libvirt-sock", proc.pid, created, 0.0, proc
        )
        try:
            await daemon._wait_ready(timeout)
        except BaseException:
            await daemon.stop()
            raise
        daemon.startup = time.monotonic() - started
        return daemon

    async def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(
                    f"libvirtd exited with {self._proc.returncode}: {self.log_tail()}"
                )
            if (await self.virsh("uri")).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirtd not ready within {timeout:g} s: {self.log_tail()}")
            await asyncio.sleep(0.2)

    def log_tail(self, n: int = 10) -> str:
        text = ""
        for f in ("libvirtd.out", "libvirtd.log"):
            with contextlib.suppress(OSError):
                text += (self.workdir / f).read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-n:])

    async def virsh(self, *args: str) -> Proc:
        return await spawn(["virsh", "-q", "-c", self.uri, *args])

    async def stop(self) -> None:
        """SIGTERM our daemon (SIGKILL after 15 s), reap it, delete the user we created."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 15.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                await self._proc.wait()
        if self.created_user:
            await asyncio.to_thread(_delete_user)
            self.created_user = False


def _delete_user() -> None:
    subprocess.run(["userdel", QEMU_USER], capture_output=True, check=False)


class Console:
    """A guest serial console read from a unix socket; every line keeps its arrival time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._lines: deque[tuple[float, str]] = deque(maxlen=5000)
        self.total = 0
        self.closed = False
        self._changed = asyncio.Event()
        self._writer = writer
        self._task = asyncio.create_task(self._pump(reader))

    @classmethod
    async def open(cls, path: Path) -> Console:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
        return cls(reader, writer)

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while raw := await reader.readline():
                now = time.monotonic()
                self._lines.append((now, raw.decode(errors="replace").rstrip("\r\n")))
                self.total += 1
                self._wake()
        finally:
            self.closed = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def cursor(self) -> int:
        return self.total

    def tail(self, n: int = 20) -> list[str]:
        return [line for _, line in list(self._lines)[-n:]]

    async def wait_for(
        self, pattern: re.Pattern[str] | str, timeout: float, since: int = 0
    ) -> float:
        """Arrival time of the first line from ``since`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        cursor = since
        try:
            async with asyncio.timeout(timeout):
                while True:
                    first = self.total - len(self._lines)
                    for t, line in list(self._lines)[max(cursor - first, 0) :]:
                        if regex.search(line):
                            return t
                    cursor = self.total
                    if self.closed:
                        raise RuntimeError(f"console closed before {regex.pattern!r}")
                    await self._changed.wait()
        except TimeoutError as err:
            raise TimeoutError(
                f"no console line matched {regex.pattern!r} within "
                f"{timeout:g} s; last lines: {self.tail()}"
            ) from err

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


def domain_xml(
    dom_name: str,
    image: GuestImage,
    console: Path,
    emulator: Path,
    *,
    machine: Machine,
    root_ports: int,
    vcpus: int,
    memory_mb: int,
) -> str:
    """A TCG domain booting the test guest's kernel and initrd, like GuestVM's QEMU."""
    if machine == "q35":
        controllers = "<controller type='pci' model='pcie-root'/>" + "".join(
            "<controller type='pci' model='pcie-root-port'/>" for _ in range(root_ports)
        )
    else:
        controllers = "<controller type='pci' model='pci-root'/>"
    return f"""<domain type='qemu'>
  <name>{escape(dom_name)}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initrd))}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>{escape(str(emulator))}</emulator>
    <controller type='usb' model='none'/>
    {controllers}
    <serial type='unix'>
      <source mode='bind' path='{escape(str(console))}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def interface_xml(hw: str, tap: str, queues: int) -> str:
    """A tap NIC libvirt creates itself, virtio, no vhost-net, no option ROM."""
    return f"""<interface type='ethernet'>
  <mac address='{hw}'/>
  <target dev='{tap}'/>
  <model type='virtio'/>
  <driver name='qemu' queues='{queues}'/>
  <rom enabled='no'/>
</interface>
"""


@attrs.define(eq=False)
class Domain:
    """A transient domain of ours; :meth:`destroy` always ends its QEMU."""

    daemon: Libvirtd
    name: str
    workdir: Path
    console: Console | None = None

    @classmethod
    async def create(
        cls,
        daemon: Libvirtd,
        image: GuestImage,
        workdir: Path,
        *,
        machine: Machine = "q35",
        root_ports: int = 4,
        vcpus: int = 2,
        memory_mb: int = 256,
        ready_timeout: float = 180.0,
    ) -> Domain:
        dom = cls(daemon, name("d"), workdir)
        sock = workdir / "console.sock"
        xml = workdir / "domain.xml"
        emulator = workdir / "qemu-tcg-one-thread"
        emulator.write_text(_TCG_ONE_THREAD)
        emulator.chmod(0o755)
        xml.write_text(
            domain_xml(
                dom.name,
                image,
                sock,
                emulator,
                machine=machine,
                root_ports=root_ports,
                vcpus=vcpus,
                memory_mb=memory_mb,
            )
        )
        # Paused first, so the console is connected before the guest prints anything.
        (await daemon.virsh("create", str(xml), "--paused")).check()
        try:
            dom.console = await Console.open(sock)
            threads = await dom.vcpu_threads()
            if len(threads) != 1:
                raise RuntimeError(f"the domain's vCPUs run on threads {threads}, not one")
            (await daemon.virsh("resume", dom.name)).check()
            await dom.console.wait_for(r"^QMPNET READY\b", ready_timeout)
        except BaseException:
            await dom.destroy()
            raise
        return dom

    async def vcpu_threads(self) -> set[int]:
        """The host threads QEMU runs this domain's vCPUs on (its own query-cpus-fast)."""
        out = (
            await self.daemon.virsh(
                "qemu-monitor-command", self.name, '{"execute": "query-cpus-fast"}'
            )
        ).check()
        return {int(cpu["thread-id"]) for cpu in json.loads(out.stdout)["return"]}

    async def destroy(self) -> None:
        if self.console is not None:
            await self.console.close()
        pidfile = Path(f"/run/libvirt/qemu/{self.name}.pid")
        pid = None
        with contextlib.suppress(OSError, ValueError):
            pid = int((await asyncio.to_thread(pidfile.read_text)).strip())
        result = await self.daemon.virsh("destroy", self.name)
        if result.returncode != 0 and pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # qemu.conf's stdio_handler "file" leaves the domain's QEMU log behind.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(Path(f"/var/log/libvirt/qemu/{self.name}.log").unlink)
