"""An async QMP session on ``qemu.qmp`` with deadlines, fd passing and typed errors.

Nothing here knows what an endpoint is: it speaks QEMU's commands. Every call has a deadline
(``qemu.qmp`` has none of its own); QEMU's error replies become :class:`QmpCommandError` with
QEMU's class and description kept; a dropped connection becomes
:class:`QmpDisconnectedError`. Traffic is logged at debug level as ``-->``/``<--`` lines on a
per-VM child logger.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import socket
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, QMPClient
from qemu.qmp import ExecuteError as _ExecuteError
from qemu.qmp.error import QMPError as _QMPError
from qemu.qmp.message import Message
from qemu.qmp.protocol import ConnectError, Runstate, StateError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from qmpnet.errors import (
    ConnectFailure,
    QmpCommandError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpTimeoutError,
    UnplugRefusedError,
    UnplugTimeoutError,
)
from qmpnet.model import VmIdentity
from qmpnet.poll import poll_until

log = logging.getLogger(__name__)

#: Events one operation's listener keeps before it drops the rest: an operation waits for
#: one event, so a few are plenty; a flood of matching events cannot grow memory.
EVENT_QUEUE_MAX = 16


class BoundedListener(EventListener):
    """An :class:`EventListener` with a bounded queue and no history.

    qemu.qmp's own listener keeps every event it accepts twice over (a queue and a history
    list), without bound. This one keeps at most ``maxsize`` unread events and counts the
    ones it had to drop; QEMU's reader never waits on it.
    """

    def __init__(
        self,
        names: str | list[str],
        event_filter: Callable[[Message], bool] | None = None,
        maxsize: int = EVENT_QUEUE_MAX,
    ) -> None:
        super().__init__(names, event_filter)
        self._bounded: asyncio.Queue[Message] = asyncio.Queue(maxsize)
        #: accepted events that found the queue full
        self.dropped = 0

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        try:
            self._bounded.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def get(self) -> Message:
        return await self._bounded.get()

    def empty(self) -> bool:
        return self._bounded.empty()

    def qsize(self) -> int:
        return self._bounded.qsize()

    def clear(self) -> list[Message]:
        out = []
        while not self._bounded.empty():
            out.append(self._bounded.get_nowait())
        return out


def mute_default_listener(client: QMPClient) -> None:
    """Make qemu.qmp's default listener (``client.events``) accept nothing.

    It cannot be removed, and it queues every event QEMU sends for a reader nobody runs: a
    kept session grew by every DEVICE_DELETED and NIC_RX_FILTER_CHANGED, and a flooding peer
    took a process to a gigabyte. Each operation listens for what it waits for instead.
    """
    client.events.names = set()
    client.events.event_filter = _accept_nothing
    client.events.clear()


def _accept_nothing(_event: Message) -> bool:
    return False


def queued_events(client: QMPClient) -> int:
    """Events waiting in every listener of ``client`` (0 when nothing accumulates)."""
    total = 0
    for listener in client._listeners:  # qemu.qmp has no public view of them
        size = getattr(listener, "qsize", None)
        total += size() if size is not None else listener._queue.qsize()
    return total


#: QOM parent of every device given an id on the command line or by device_add.
PERIPHERAL = "/machine/peripheral"
#: the event that ends an unplug, and the one that refuses it (QEMU >= 6.2, qapi/qdev.json);
#: both carry ``device`` (the id, when it has one) and ``path`` (the QOM path).
DEVICE_DELETED = "DEVICE_DELETED"
#: seconds between looks at the object tree while an unplug waits for DEVICE_DELETED
UNPLUG_LOOK = 0.02
NIC_RX_FILTER_CHANGED = "NIC_RX_FILTER_CHANGED"
DEVICE_UNPLUG_GUEST_ERROR = "DEVICE_UNPLUG_GUEST_ERROR"

#: virtio status bit the guest driver sets once the device is ready (virtio spec 2.1).
VIRTIO_CONFIG_S_DRIVER_OK = 4


def check_socket_path(path: str) -> None:
    """Refuse anything that is not a unix socket before connecting (clear error, no hang)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError as err:
        raise QmpConnectError(
            path, "no such socket: QEMU is not running, or the path is wrong", ConnectFailure.ABSENT
        ) from err
    except OSError as err:
        raise QmpConnectError(path, f"cannot stat: {err.strerror}") from err
    if not stat.S_ISSOCK(mode):
        raise QmpConnectError(path, "not a unix socket", ConnectFailure.NOT_A_SOCKET)


def vm_identity(path: str) -> VmIdentity | None:
    """The identity of the process listening on the monitor ``path``, or None when unknown.

    Found without connecting (a connection, even one closed at once, disturbs a QEMU
    monitor that serves one client at a time): the listening socket's inode from
    ``/proc/net/unix``, then the process holding it. None when nothing listens there, or
    the listener is in another network namespace or not ours to read.
    """
    try:
        with open("/proc/net/unix", "rb") as fh:
            table = fh.read().decode(errors="replace").splitlines()[1:]
    except OSError:
        return None
    # the path as given or through its links: a VM manager may link a monitor elsewhere
    wanted = {os.path.abspath(path), os.path.realpath(path)}
    inodes = {
        fields[6]
        for fields in (line.split(None, 7) for line in table)
        if len(fields) == 8 and fields[5] == "01" and fields[7] in wanted
    }
    if len(inodes) != 1:
        return None
    target = f"socket:[{inodes.pop()}]"
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return _identity_of_pid(int(pid))
            except OSError:
                continue
    return None


def _identity_of(sock: Any) -> VmIdentity | None:
    """The identity of a connected unix socket's peer (SO_PEERCRED: pid, then start time)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    if pid <= 0:  # a listener in a pid namespace we cannot see
        return None
    return _identity_of_pid(pid)


def _identity_of_pid(pid: int) -> VmIdentity | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat_line = fh.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields count from the last ')'
    fields = stat_line[stat_line.rindex(b")") + 2 :].split()
    return VmIdentity(pid, int(fields[19]))


class _Client(QMPClient):
    """qemu.qmp's client, without its message hooks' eager pretty-print.

    The library's hooks call ``str(msg)`` (``json.dumps(..., indent=2)``) for every message
    before ``logger.debug`` looks at the level: with logging off, a plug into a VM with a few
    dozen devices spent most of its time (a ``query-pci`` or ``qom-list`` reply) formatting
    text nobody reads. Here it is formatted only when the debug level is on (``-vv``).
    """

    def _cb_outbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("--> %s", str(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("<-- %s", str(msg))
        return msg


class QmpSession:
    """One connection to one QEMU monitor. Fd passing is serialized on the connection."""

    def __init__(
        self, client: QMPClient, path: str, command_timeout: float, logger: logging.Logger
    ) -> None:
        self._client = client
        self.path = path
        self.command_timeout = command_timeout
        self.log = logger
        self._fd_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
        name: str | None = None,
    ) -> QmpSession:
        """Connect with a deadline. A monitor serves one client at a time: a hang means busy."""
        check_socket_path(path)
        label = name or path.rstrip("/").rsplit("/", 2)[-2 if path.count("/") > 1 else -1]
        client = _Client(label)
        mute_default_listener(client)
        try:
            await asyncio.wait_for(connect_clean(client, path), connect_timeout)
        except TimeoutError as err:
            await _quiet_disconnect(client)
            raise QmpConnectError(
                path,
                f"no QMP greeting within {connect_timeout:g} s: the "
                "monitor is busy with another client or QEMU is stuck",
                ConnectFailure.BUSY,
            ) from err
        except ConnectionRefusedError as err:
            await _quiet_disconnect(client)
            raise QmpConnectError(
                path, "connection refused: QEMU is not running", ConnectFailure.ABSENT
            ) from err
        except (OSError, _QMPError) as err:
            await _quiet_disconnect(client)
            # qemu.qmp wraps the socket error in ConnectError(.exc): a refusal means QEMU is gone.
            inner = getattr(err, "exc", None)
            if isinstance(inner, ConnectionRefusedError):
                raise QmpConnectError(
                    path, "connection refused: QEMU is not running", ConnectFailure.ABSENT
                ) from inner
            if isinstance(inner, ConnectionResetError | EOFError):
                # a QEMU being killed can still accept, then drops the connection
                raise QmpConnectError(
                    path,
                    "connection closed before the QMP greeting: QEMU is exiting or gone",
                    ConnectFailure.CLOSED,
                ) from inner
            raise QmpConnectError(path, f"cannot connect: {err}", _failure(inner or err)) from err
        return cls(client, path, command_timeout, log.getChild(label))

    async def close(self) -> None:
        await _quiet_disconnect(self._client)

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def queued_events(self) -> int:
        """Events waiting unread in this session's listeners: stays 0 between operations."""
        return queued_events(self._client)

    def peer(self) -> VmIdentity | None:
        """The QEMU this session talks to (SO_PEERCRED of its own connection)."""
        # qemu.qmp 0.0.x keeps its stream writer private; without it, ask the path
        writer = getattr(self._client, "_writer", None)
        sock = writer.get_extra_info("socket") if writer is not None else None
        if sock is None:
            return vm_identity(self.path)
        try:
            return _identity_of(sock)
        except OSError:
            return None

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    @contextlib.contextmanager
    def subscribe(
        self, names: list[str], maxsize: int = EVENT_QUEUE_MAX * 4
    ) -> Iterator[BoundedListener]:
        """Listen to ``names`` for as long as the block runs (a resident caller's events)."""
        listener = BoundedListener(names, maxsize=maxsize)
        with self._client.listen(listener):
            yield listener

    async def next_event(self, listener: BoundedListener) -> dict[str, Any] | None:
        """The next event of ``listener``, or None once the connection is gone."""
        while self.connected or not listener.empty():
            if not listener.empty():
                return dict(await listener.get())
            got = asyncio.ensure_future(listener.get())
            changed = asyncio.ensure_future(self._client.runstate_changed())
            try:
                await asyncio.wait({got, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                if not got.done():
                    got.cancel()
            if got.done() and not got.cancelled():
                return dict(got.result())
        return None

    # --- commands --------------------------------------------------------------------------

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        args = dict(arguments or {})
        deadline = self.command_timeout if timeout is None else timeout
        self.log.debug("--> %s %s", command, args)
        try:
            reply = await asyncio.wait_for(self._client.execute(command, args or None), deadline)
        except _ExecuteError as err:
            self.log.debug("<-- %s error %s: %s", command, err.error_class, err)
            raise QmpCommandError(command, args, err.error_class, str(err)) from err
        except TimeoutError as err:
            raise QmpTimeoutError(command, deadline) from err
        except (ExecInterruptedError, StateError, ConnectionError, EOFError) as err:
            raise QmpDisconnectedError(command, str(err) or type(err).__name__) from err
        self.log.debug("<-- %s %s", command, reply)
        return reply

    async def pass_fd(self, fd: int, name: str) -> None:
        """Send ``fd`` with SCM_RIGHTS and name it with ``getfd``.

        One fd in flight per connection: a second send before the ``getfd`` loses the fd.
        """
        async with self._fd_lock:
            self.log.debug("--> SCM_RIGHTS fd %d as %s", fd, name)
            try:
                self._client.send_fd_scm(fd)
            except (StateError, OSError, _QMPError) as err:
                raise QmpDisconnectedError("getfd", f"sending fd {fd}: {err}") from err
            await self.execute("getfd", {"fdname": name})

    async def close_fd(self, name: str) -> bool:
        """Release a named fd QEMU holds; False when QEMU holds no fd of that name."""
        try:
            await self.execute("closefd", {"fdname": name})
        except QmpCommandError as err:
            if "not found" in err.desc:
                return False
            raise
        return True

    async def netdev_add_tap(
        self, netdev_id: str, fd_names: list[str], vhost_fd_names: list[str]
    ) -> None:
        args: dict[str, Any] = {"type": "tap", "id": netdev_id}
        if len(fd_names) == 1:
            args["fd"] = fd_names[0]
        else:
            args["fds"] = ":".join(fd_names)
        if vhost_fd_names:
            # vhost settings only together with fds we opened: vhost without fds aborts QEMU
            # when /dev/vhost-net is missing.
            args["vhost"] = True
            if len(vhost_fd_names) == 1:
                args["vhostfd"] = vhost_fd_names[0]
            else:
                args["vhostfds"] = ":".join(vhost_fd_names)
        await self.execute("netdev_add", args)

    async def netdev_del(self, netdev_id: str) -> bool:
        """Remove a netdev; False when there is none of that id."""
        try:
            await self.execute("netdev_del", {"id": netdev_id})
        except QmpCommandError as err:
            if err.error_class == "DeviceNotFound" or "not found" in err.desc:
                return False
            raise
        return True

    async def device_add(self, args: Mapping[str, Any]) -> None:
        await self.execute("device_add", args)

    async def device_del(self, device_id: str, timeout: float) -> bool:
        """Ask the guest to release the device and wait for DEVICE_DELETED up to ``timeout``.

        Returns False when there was no such device. Raises :class:`UnplugTimeoutError` when
        the event does not come: the request stays with QEMU and may still complete later.
        Raises :class:`UnplugRefusedError` as soon as QEMU reports DEVICE_UNPLUG_GUEST_ERROR
        for the device (QEMU >= 6.2; ppc's spapr and ACPI memory unplug send it, PCI
        hot-plug on q35/pc does not): the guest said no, so waiting longer would not help.
        """
        path = f"{PERIPHERAL}/{device_id}"

        def ours(event: Mapping[str, Any]) -> bool:
            data = event.get("data")
            if not isinstance(data, Mapping):
                return False
            return bool(data.get("device") == device_id or data.get("path") == path)

        # One bounded listener for both events, registered before the request: it misses neither.
        listener = BoundedListener([DEVICE_DELETED, DEVICE_UNPLUG_GUEST_ERROR], ours)
        with self._client.listen(listener):
            try:
                await self.execute("device_del", {"id": device_id})
            except QmpCommandError as err:
                if err.error_class == "DeviceNotFound":
                    return False
                if "already in the process of unplug" not in err.desc:
                    raise
                # QEMU 7.2 refuses a repeated request while an earlier one is pending (a
                # later call completing a pending unplug): wait for that one instead.
                self.log.debug("%s: an unplug is already pending; waiting for it", device_id)
            await self._wait_deleted(listener, device_id, timeout)
        return True

    async def _wait_deleted(self, listener: EventListener, device_id: str, timeout: float) -> None:
        """Wait for DEVICE_DELETED, or for the device to be gone from QOM; fail at once on
        DEVICE_UNPLUG_GUEST_ERROR.

        An event QEMU sent while no client listened (a crashed driver, an earlier session)
        is lost, so the object tree is checked between waits, on a steady 20 ms: QEMU 7.2
        sends the event only when the device object is finalized, 20-30 ms after it left
        the tree, so the first look that finds it gone usually ends the wait before the event
        (a back-off would overshoot both).
        """
        event: Message | None = None

        async def wait_event(seconds: float) -> None:
            nonlocal event
            with contextlib.suppress(TimeoutError):
                event = await asyncio.wait_for(listener.get(), seconds)

        async def deleted() -> bool:
            if event is not None:
                data = event.get("data")
                self.log.debug("<-- %s %s", event["event"], data)
                if event["event"] == DEVICE_UNPLUG_GUEST_ERROR:
                    # the listener's filter let only a mapping through
                    path = data.get("path", "") if isinstance(data, Mapping) else ""
                    raise UnplugRefusedError(device_id, str(path))
                return True
            peripherals = await self.qom_list(PERIPHERAL)
            if not any(child["name"] == device_id for child in peripherals):
                self.log.debug("%s is gone from %s", device_id, PERIPHERAL)
                return True
            return False

        await poll_until(
            deleted,
            timeout=timeout,
            interval=UNPLUG_LOOK,
            pause=wait_event,
            pause_first=True,
            error=lambda: UnplugTimeoutError(device_id, timeout),
        )

    async def query_pci(self) -> list[dict[str, Any]]:
        reply = await self.execute("query-pci")
        return list(reply)

    async def qom_list(self, path: str) -> list[dict[str, Any]]:
        return list(await self.execute("qom-list", {"path": path}))

    async def qom_get(self, path: str, prop: str) -> Any:
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def netdevs(self) -> dict[str, str]:
        """Netdev id -> its ``info network`` description (QEMU 7.2 has no query-netdev)."""
        text = await self.execute("human-monitor-command", {"command-line": "info network"})
        out: dict[str, str] = {}
        for line in str(text).splitlines():
            match = re.fullmatch(r"[ \\_]*([^:\s]+): index=\d+,type=([^,]+),?(.*)", line.strip())
            if match and match.group(2) == "tap":
                out[match.group(1)] = match.group(3)
        return out

    async def virtio_status(self, device_id: str) -> int:
        reply = await self.execute(
            "x-query-virtio-status", {"path": f"/machine/peripheral/{device_id}/virtio-backend"}
        )
        status = reply.get("status", {})
        # 7.2 answers with decoded status bits.
        if isinstance(status, dict):
            names = status.get("statuses", [])
            return VIRTIO_CONFIG_S_DRIVER_OK if any("DRIVER_OK" in n for n in names) else 0
        return int(status)

    async def wait_driver_ok(self, device_id: str, timeout: float) -> None:
        """Poll virtio status until the guest driver has set DRIVER_OK.

        QEMU sends no event for it, so it is polled, on a fine steady interval: a back-off
        would overshoot the moment by up to its longest pause. One poll is one small QMP
        round trip, so a few hundred polls of a slow guest cost QEMU little.
        """

        async def driver_ok() -> bool:
            return bool(await self.virtio_status(device_id) & VIRTIO_CONFIG_S_DRIVER_OK)

        await poll_until(
            driver_ok,
            timeout=timeout,
            interval=DRIVER_OK_POLL,
            error=lambda: QmpTimeoutError(f"wait for guest driver of {device_id}", timeout),
        )


#: Seconds between two DRIVER_OK polls: the most a guest-ready wait returns late by.
DRIVER_OK_POLL = 0.002

#: Handshakes tried before an event-broken handshake is reported (the race is rare).
_HANDSHAKE_ATTEMPTS = 5


async def connect_clean(client: QMPClient, path: str) -> None:
    """Connect, trying again when a QMP event broke the handshake.

    QEMU 7.2 can deliver an event (NIC_RX_FILTER_CHANGED as a guest brings a NIC up,
    DEVICE_DELETED) before the greeting or between ``qmp_capabilities`` and its reply;
    qemu.qmp then fails the handshake. The failed attempt is back in IDLE and a new
    connection starts clean.
    """
    for attempt in range(1, _HANDSHAKE_ATTEMPTS + 1):
        last = attempt == _HANDSHAKE_ATTEMPTS
        try:
            with contextlib.nullcontext() if last else _demoted(client.logger):
                await client.connect(path)
            return
        except ConnectError as err:
            if last or not isinstance(err.exc, GreetingError | NegotiationError):
                raise
            log.debug("QMP handshake on %s broken by an event, retrying: %s", path, err)


#: Handshakes in flight per qemu.qmp logger (clients with one name share a logger).
_demoting: collections.Counter[str] = collections.Counter()


@contextlib.contextmanager
def _demoted(logger: logging.Logger) -> Iterator[None]:
    """qemu.qmp logs a failed handshake as ERROR; while a retry may follow it is no error.

    What is not retried reaches the caller as a QmpConnectError that says why.
    """
    if not _demoting[logger.name]:
        logger.addFilter(_demote_to_debug)
    _demoting[logger.name] += 1
    try:
        yield
    finally:
        _demoting[logger.name] -= 1
        if not _demoting[logger.name]:
            del _demoting[logger.name]
            logger.removeFilter(_demote_to_debug)


def _demote_to_debug(record: logging.LogRecord) -> bool:
    """Let a record through as DEBUG, if its logger lets DEBUG through at all."""
    if record.levelno <= logging.DEBUG:
        return True
    if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
        return False
    record.levelno, record.levelname = logging.DEBUG, "DEBUG"
    return True


def _failure(err: BaseException) -> ConnectFailure:
    """The kind of any other connect error (qemu.qmp's ``exc`` when it wrapped one)."""
    if isinstance(err, FileNotFoundError | ConnectionRefusedError):
        return ConnectFailure.ABSENT  # the socket went between the stat and the connect
    if isinstance(err, ConnectionResetError | EOFError):
        return ConnectFailure.CLOSED
    return ConnectFailure.OTHER


async def _quiet_disconnect(client: QMPClient) -> None:
    with contextlib.suppress(Exception):
        await client.disconnect()
