"""Boot the test guest in QEMU and follow its serial console.

:class:`GuestVM` is the fixture every integration test and benchmark shares: it launches
``qemu-system-x86_64`` with the guest from :mod:`.guest`, two QMP monitors (the first
stands for the VM manager that owns a real VM's monitor, the second is the one qmpnet is
meant to use) and hot-pluggable slots, then reads the console into a bounded buffer
that tests search for the ``QMPNET ...`` marker lines ``init.sh`` prints.

It owns exactly one QEMU process and one work directory, and :meth:`GuestVM.stop` always
kills and reaps that process (by its pid) and removes the directory. QEMU is also told
to die with the thread that started it (``PR_SET_PDEATHSIG``), so a crashed test run
leaves no guest behind.

The accelerator is a setting (``accel=`` or ``$QMPNET_ACCEL``): ``tcg`` (the default),
``kvm``, or ``auto``, which uses KVM only after a guest has really booted under it, since
a ``/dev/kvm`` that opens is no proof (nested virtualisers may hang the guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import re
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import attrs

from qmpnet.testing.guest import GuestImage

__all__ = ["Accel", "GuestVM", "GuestVMError", "Machine", "UNEXPECTED_EXITS", "marker_fields"]

_log = logging.getLogger(__name__)

Machine = Literal["q35", "pc"]
Accel = Literal["tcg", "kvm", "auto"]
_ACCELS = ("tcg", "kvm", "auto")
#: TCG runs every vCPU on one host thread. A CI run lost a guest to a segfault of a vCPU
#: thread in ``memory_region_dispatch_write`` on a NULL region (kernel log, QEMU 7.2.22).
#: The likely cause: multi-threaded TCG installs a new memory map for all vCPUs at once but
#: flushes another vCPU's TLB only later, on that vCPU's thread, and a PCI hot-(un)plug
#: changes the map. With one thread, a change the guest makes (the slot power-off or eject
#: write that completes an unplug, BAR programming) flushes every vCPU before any runs on.
#: KVM has no such TLB.
_ACCEL_ARGS = {"tcg": "tcg,thread=single"}
#: How long ``auto`` lets a KVM guest take to print READY before choosing TCG.
KVM_PROBE_TIMEOUT = 20.0
_MIN_MEMORY_MB = 64  # the kernel and the initramfs need about that much
_CONSOLE_LINES = 5000
_STDERR_LINES = 200
_TAIL = 40
_LINE_LIMIT = 1 << 20  # a longer console "line" is garbage, but must not stop the reader
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
_PR_SET_PDEATHSIG = 1
_MARKER_FIELD_RE = re.compile(r"([\w-]+)=(\S*)")

#: Every QEMU that exited by itself other than by SIGKILL (an abort, a fatal error), with
#: its evidence: the test run prints them at its end, since the tests that fail after
#: such a death only see a lost connection.
UNEXPECTED_EXITS: list[str] = []

#: What ``auto`` found, once per process: a boot probe costs seconds.
_auto_accel: str | None = None


class GuestVMError(Exception):
    """QEMU or the guest did not do what was expected; carries the evidence."""

    def __init__(
        self,
        message: str,
        *,
        console_tail: Sequence[str] = (),
        stderr_tail: Sequence[str] = (),
        returncode: int | None = None,
    ) -> None:
        text = message
        if returncode is not None:
            text += f"\nQEMU exit status: {returncode}"
        text += "\n--- console (last lines) ---\n" + "\n".join(console_tail)
        text += "\n--- QEMU stderr (last lines) ---\n" + "\n".join(stderr_tail)
        super().__init__(text)
        self.console_tail = list(console_tail)
        self.stderr_tail = list(stderr_tail)
        self.returncode = returncode


def marker_fields(line: str | re.Match[str]) -> dict[str, str]:
    """The ``key=value`` fields of a marker line (or of the line a match was found in).

    ``QMPNET NIC-ADD name=eth0 mac=52:54:00:00:00:07 rxq=2`` gives
    ``{"name": "eth0", "mac": "52:54:00:00:00:07", "rxq": "2"}``.
    """
    text = line.string if isinstance(line, re.Match) else line
    return dict(_MARKER_FIELD_RE.findall(text))


class _Lines:
    """The last lines of a stream, a cursor that counts every line, and a wake-up."""

    def __init__(self, maxlen: int) -> None:
        self._lines: deque[str] = deque(maxlen=maxlen)
        self.total = 0
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, line: str) -> None:
        self._lines.append(line)
        self.total += 1
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def since(self, cursor: int) -> Iterator[tuple[int, str]]:
        """(index, line) for the retained lines whose index is at least ``cursor``."""
        first = self.total - len(self._lines)
        start = max(cursor, first)
        return zip(itertools.count(start), itertools.islice(self._lines, start - first, None))

    def tail(self, n: int = _TAIL) -> list[str]:
        return list(self._lines)[-n:]


async def _pump(
    stream: asyncio.StreamReader, lines: _Lines, log: logging.Logger, label: str
) -> None:
    try:
        while raw := await stream.readline():
            line = raw.decode(errors="replace").rstrip("\r\n")
            log.debug("%s: %s", label, line)
            lines.append(line)
    finally:
        lines.close()


#: Looked up once here: the child of a fork must not dlopen (another thread may hold its lock).
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL QEMU when the launching thread dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _qemu_command(
    image: GuestImage,
    run_dir: Path,
    *,
    machine: Machine,
    accel: str,
    root_ports: int,
    vcpus: int,
    memory_mb: int,
    paused: bool,
    extra_args: Sequence[str],
) -> list[str]:
    cmd = [
        "qemu-system-x86_64",
        "-name", run_dir.name,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", machine, "-accel", _ACCEL_ARGS.get(accel, accel),
        "-m", str(memory_mb), "-smp", str(vcpus),
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        "-no-reboot",
        "-serial", "stdio",
        # ttyS1: the guest's command channel (init.sh's "DO" lines; see GuestVM.guest_ip)
        "-chardev", f"socket,id=cmd,path={run_dir / 'cmd.sock'},server=on,wait=off",
        "-serial", "chardev:cmd",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",
        "-qmp", f"unix:{run_dir / 'qmp2.sock'},server=on,wait=off",
    ]  # fmt: skip
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    if machine == "q35":
        # pcie.0 itself is not hot-pluggable: hot-plugged NICs go into these ports.
        for i in range(root_ports):
            cmd += ["-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
    if paused:
        cmd.append("-S")
    return [*cmd, *extra_args]


#: /proc/net/unix's flag of a listening socket (__SO_ACCEPTCON)
_ACCEPTCON = 0x10000


def _listening(paths: set[str]) -> bool:
    """Whether a unix socket bound to each of ``paths`` is listening (this netns's sockets)."""
    try:
        with open("/proc/net/unix") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return False
    found = set()
    for line in lines:
        # Num RefCount Protocol Flags Type St Inode Path
        fields = line.split(None, 7)
        if len(fields) == 8 and int(fields[3], 16) & _ACCEPTCON:
            found.add(fields[7])
    return paths <= found


@attrs.define(eq=False)
class GuestVM:
    """One running QEMU with the test guest; create it with :meth:`start`.

    ``async with await GuestVM.start(image) as vm:`` stops it on the way out.
    """

    image: GuestImage
    #: This VM's own directory (sockets live here); removed by :meth:`stop`.
    workdir: Path
    machine: Machine
    #: The accelerator QEMU runs with: "tcg" or "kvm" ("auto" is resolved before launch).
    accel: str
    pid: int
    #: The first QMP monitor, the one a VM manager would hold.
    qmp_path: Path
    #: The second QMP monitor, free for qmpnet.
    mgmt_qmp_path: Path
    _proc: asyncio.subprocess.Process = attrs.field(repr=False)
    _console: _Lines = attrs.field(repr=False)
    _stderr: _Lines = attrs.field(repr=False)
    _readers: list[asyncio.Task[None]] = attrs.field(repr=False)
    _log: logging.Logger = attrs.field(repr=False)
    _stopped: bool = attrs.field(default=False, repr=False)
    _commands: int = attrs.field(default=0, repr=False)

    @classmethod
    async def start(
        cls,
        image: GuestImage,
        workdir: Path | None = None,
        *,
        machine: Machine = "q35",
        root_ports: int = 8,
        vcpus: int = 2,
        memory_mb: int = 256,
        accel: Accel | None = None,
        extra_args: Sequence[str] = (),
        paused: bool = False,
        name: str = "qmpnet-guest",
        ready_timeout: float = 60.0,
    ) -> GuestVM:
        """Launch QEMU and wait for ``QMPNET READY`` (or, when ``paused``, for the monitors).

        ``workdir`` is the parent of the VM's own fresh directory (default: the system
        temp dir). ``root_ports`` only applies to q35; pc's ``pci.0`` takes hot-plugs
        itself. ``extra_args`` are appended to QEMU's command line, for cold-plugged
        devices. A paused VM (``-S``) is never continued, so no guest code runs.
        """
        if machine not in ("q35", "pc"):
            raise ValueError(f"machine must be 'q35' or 'pc', not {machine!r}")
        if root_ports < 0 or vcpus < 1 or memory_mb < _MIN_MEMORY_MB:
            raise ValueError(f"need root_ports >= 0, vcpus >= 1, memory_mb >= {_MIN_MEMORY_MB}")
        chosen = await _resolve_accel(accel, image, workdir, machine)
        return await cls._launch(
            image,
            workdir,
            machine=machine,
            accel=chosen,
            root_ports=root_ports,
            vcpus=vcpus,
            memory_mb=memory_mb,
            extra_args=extra_args,
            paused=paused,
            name=name,
            ready_timeout=ready_timeout,
        )

    @classmethod
    async def _launch(
        cls,
        image: GuestImage,
        workdir: Path | None,
        *,
        machine: Machine,
        accel: str,
        root_ports: int,
        vcpus: int,
        memory_mb: int,
        extra_args: Sequence[str],
        paused: bool,
        name: str,
        ready_timeout: float,
    ) -> GuestVM:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        qmp_path, mgmt_qmp_path = run_dir / "qmp.sock", run_dir / "qmp2.sock"
        if len(os.fsencode(mgmt_qmp_path)) > _SUN_PATH_MAX:
            shutil.rmtree(run_dir)
            raise ValueError(f"socket path too long for AF_UNIX, pick a shorter workdir: {run_dir}")
        cmd = _qemu_command(
            image,
            run_dir,
            machine=machine,
            accel=accel,
            root_ports=root_ports,
            vcpus=vcpus,
            memory_mb=memory_mb,
            paused=paused,
            extra_args=extra_args,
        )
        log = _log.getChild(run_dir.name)
        log.debug("launching %s", cmd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=_LINE_LIMIT,
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        assert proc.stdout is not None
        assert proc.stderr is not None
        console, stderr = _Lines(_CONSOLE_LINES), _Lines(_STDERR_LINES)
        vm = cls(
            image=image,
            workdir=run_dir,
            machine=machine,
            accel=accel,
            pid=proc.pid,
            qmp_path=qmp_path,
            mgmt_qmp_path=mgmt_qmp_path,
            proc=proc,
            console=console,
            stderr=stderr,
            readers=[
                asyncio.create_task(_pump(proc.stdout, console, log, "console")),
                asyncio.create_task(_pump(proc.stderr, stderr, log, "stderr")),
            ],
            log=log,
        )
        log.info("started QEMU pid %d (%s, %s, %d vCPUs)", proc.pid, machine, accel, vcpus)
        try:
            await vm._wait_for_monitors(ready_timeout)
            if not paused:
                await vm.wait_for(r"^QMPNET READY\b", ready_timeout)
                log.info("guest ready after %d console lines", console.total)
        except BaseException:
            await vm._stop(report=False)  # the caller gets the error (or the KVM probe falls back)
            raise
        return vm

    async def _wait_for_monitors(self, limit: float) -> None:
        try:
            async with asyncio.timeout(limit):
                # a socket file exists from QEMU's bind(); a connect before its listen() is
                # refused: both must be listening (seen under a loaded host)
                while not _listening({str(self.qmp_path), str(self.mgmt_qmp_path)}):
                    if self._proc.returncode is not None or self._stderr.closed:
                        raise await self._error("QEMU exited before opening its monitors")
                    await asyncio.sleep(0.01)
        except TimeoutError as err:
            raise await self._error(f"QEMU opened no monitors within {limit:g} s") from err

    async def guest_ip(self, mac: str, *args: str, timeout: float = 60.0) -> int:
        """Run ``ip ARGS`` in the guest (``{dev}``: the name of its NIC plugged with ``mac``),
        through the command channel; its exit status, once the console says it ran."""
        self._commands += 1
        seq, cursor = self._commands, self.console_cursor()
        line = " ".join(("DO", str(seq), mac, *args)) + "\n"
        _, writer = await asyncio.open_unix_connection(str(self.workdir / "cmd.sock"))
        try:
            writer.write(line.encode())
            await writer.drain()
            done = await self.wait_for(rf"^QMPNET DONE seq={seq} rc=(\d+)", timeout, since=cursor)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return int(done.group(1))

    def console_cursor(self) -> int:
        """A position in the console: pass it as ``since`` to see only later lines."""
        return self._console.total

    def console_tail(self, n: int = _TAIL) -> list[str]:
        """The last ``n`` console lines, for messages and debugging."""
        return self._console.tail(n)

    async def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float,
        *,
        since: int = 0,
    ) -> re.Match[str]:
        """The first console line from ``since`` on (default: all kept) matching ``pattern``.

        Raises :class:`GuestVMError` after ``timeout`` seconds, or at once if QEMU exits.
        """
        regex = re.compile(pattern)
        cursor = since
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for index, line in self._console.since(cursor):
                        cursor = index + 1
                        if match := regex.search(line):
                            return match
                    if self._console.closed:
                        raise await self._error(
                            "the console closed (QEMU exited) before a line"
                            f" matched {regex.pattern!r}"
                        )
                    await self._console.changed()
        except TimeoutError as err:
            raise await self._error(
                f"no console line matched {regex.pattern!r} within {timeout:g} s"
            ) from err

    async def _error(self, message: str) -> GuestVMError:
        # The console closes a moment before the process is reaped: give it that moment.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                if self._console.closed:
                    await self._proc.wait()
        return GuestVMError(
            message,
            console_tail=self._console.tail(),
            stderr_tail=self._stderr.tail(),
            returncode=self._proc.returncode,
        )

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status once it has exited and been reaped, else None."""
        return self._proc.returncode

    async def wait_exit(self) -> int:
        """Wait for QEMU to exit (it is not asked to) and reap it; its exit status."""
        return await self._proc.wait()

    async def died_by_itself(self) -> GuestVMError | None:
        """The evidence if QEMU has exited although nobody stopped it yet, else None.

        Any exit counts, SIGKILL too: for a VM that no test kills (a module's shared guest)
        even a SIGKILL is news, from the OOM killer say.
        """
        if self._stopped or self._proc.returncode is None:
            return None
        return await self._error(f"QEMU pid {self.pid} ({self.workdir.name}) exited by itself")

    async def stop(self) -> None:
        """Kill QEMU (SIGKILL to our pid only), reap it, stop the readers, remove workdir.

        Safe to call more than once and after QEMU has died by itself. A death by anything
        but SIGKILL (which tests send on purpose) is logged and kept in
        :data:`UNEXPECTED_EXITS`.
        """
        await self._stop(report=True)

    async def _stop(self, *, report: bool) -> None:
        first = not self._stopped
        self._stopped = True
        if first and self._proc.returncode is None:
            # os.kill, not Popen.kill: that one may reap the child under asyncio's watcher,
            # which would then report 255. A SIGKILL to a dead, unreaped QEMU changes nothing.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        status = await self._proc.wait()
        if first and report and status != -signal.SIGKILL:
            self._report_death(
                await self._error(f"QEMU pid {self.pid} ({self.workdir.name}) exited by itself")
            )
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if first:
            self._log.info("stopped QEMU pid %d (status %s)", self.pid, status)

    def _report_death(self, death: GuestVMError) -> None:
        self._log.error("%s", death)
        UNEXPECTED_EXITS.append(
            "\n".join(
                [
                    f"QEMU pid {self.pid} ({self.workdir.name}) exited by itself,"
                    f" status {death.returncode}",
                    "  stderr:",
                    *(f"    {line}" for line in death.stderr_tail[-20:]),
                    "  console:",
                    *(f"    {line}" for line in death.console_tail[-10:]),
                ]
            )
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _resolve_accel(
    requested: Accel | None, image: GuestImage, workdir: Path | None, machine: Machine
) -> str:
    accel = requested or os.environ.get("QMPNET_ACCEL") or "tcg"
    if accel not in _ACCELS:
        raise ValueError(f"accel must be one of {_ACCELS}, not {accel!r}")
    if accel != "auto":
        return accel
    global _auto_accel
    if _auto_accel is None:
        _auto_accel = await _probe_kvm(image, workdir, machine)
    return _auto_accel


async def _probe_kvm(image: GuestImage, workdir: Path | None, machine: Machine) -> str:
    """Return "kvm" if a guest boots to READY under KVM within the deadline, else "tcg"."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _log.info("accel auto: /dev/kvm is not usable, using TCG")
        return "tcg"
    try:
        probe = await GuestVM._launch(
            image,
            workdir,
            machine=machine,
            accel="kvm",
            root_ports=0,
            vcpus=1,
            memory_mb=256,
            extra_args=(),
            paused=False,
            name="qmpnet-kvm-probe",
            ready_timeout=KVM_PROBE_TIMEOUT,
        )
    except GuestVMError as err:
        _log.warning("accel auto: the guest did not boot under KVM, using TCG")
        _log.debug("KVM probe failure: %s", err)
        return "tcg"
    await probe.stop()
    _log.info("accel auto: the guest booted under KVM, using KVM")
    return "kvm"
