"""The one error tree of qmpnet.

Every error carries typed fields so a caller (or the CLI's exit code table) can act on it
without parsing messages, and each is raised ``from`` its cause::

    QmpnetError
    ├── InvalidInputError        field + value + reason: bad description, config, state, CLI input
    │   └── UnknownValueError    a value outside a closed vocabulary (endpoint type, model)
    ├── UnsupportedError         a valid request qmpnet cannot do (tap cold plug, physical hot-plug)
    ├── HostError                a syscall or netlink call failed (operation, object, errno)
    │   ├── LinkExistsError      the requested host link name is taken: refused, left untouched
    │   ├── NotOursError         a link qmpnet did not create: never changed or deleted
    │   ├── TapGoneError         a multiqueue NIC's tap was deleted: not unplugged (QEMU 7.2)
    │   └── NetnsError           a netns path that does not exist or is not a netns
    ├── QmpError                 anything between us and QEMU
    │   ├── QmpConnectError      socket missing, not a socket, monitor busy: kind says which
    │   │   └── MonitorHeldError qmpnetd holds the monitor: a direct call fails at once
    │   ├── QmpCommandError      QEMU answered a command with an error (class + desc kept)
    │   ├── QmpDisconnectedError QEMU went away mid-command
    │   ├── UnplugRefusedError   the guest refused a device_del (DEVICE_UNPLUG_GUEST_ERROR)
    │   └── QmpTimeoutError      no answer within the deadline
    │       └── UnplugTimeoutError  DEVICE_DELETED did not come in time (the unplug is pending)
    ├── PlugError                a hot-plug or unplug step failed: step + endpoint; cause chained
    ├── QemuHoldsError           an undo left a plug's host links: QEMU may still hold the NIC
    ├── DeniedError              qmpnetd refuses the caller or a group member's request
    └── StateError               the saved state or journal cannot be read or written

Every error pickles with its message and fields (as qemu.qmp's do), so it can cross a process
or socket boundary intact; the cause chain (``__cause__``) does not travel, a field that must
(``PlugError.cause``) is a field.
"""

from __future__ import annotations

import enum
import errno as errno_mod
import reprlib
from collections.abc import Sized
from typing import Any


class QmpnetError(Exception):
    """Root of every error qmpnet raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its message and fields, not by calling __init__ again: each subclass's
        # constructor takes its fields, not the message that BaseException keeps in args.
        return _rebuild, (type(self), self.args), self.__dict__ or None


def _rebuild(cls: type[QmpnetError], args: tuple[Any, ...]) -> QmpnetError:
    return cls.__new__(cls, *args)  # BaseException.__new__ sets args; __dict__ follows


#: The most characters of an outside value or message an error repeats.
SHOWN_MAX = 200


def shown(value: object, limit: int = SHOWN_MAX, *, bare: bool = False) -> str:
    """``value`` as an error message may repeat it: on one line, cut, its size stated.

    The one place an outside value is rendered: its ``repr`` (control characters escaped),
    built only as far as it is shown and cut to ``limit`` characters. ``bare`` leaves a
    string's quotes off.
    """
    if isinstance(value, str):
        head = repr(value[: limit + 1])
        rendered = head[1:-1] if bare else head
        size = f"{len(value)} characters"
    else:
        try:
            rendered = _REPR.repr(value)
        except (ValueError, RecursionError):  # an int of more than 4300 digits, say
            rendered = f"<{type(value).__name__}>"
        size = f"{len(value)} items" if isinstance(value, Sized) else ""
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 640:
            rendered, size = f"<an integer of {value.bit_length()} bits>", ""
    cut = len(rendered) > limit
    if cut:
        rendered = rendered[:limit] + "..."
    elif isinstance(value, str) or not (isinstance(value, Sized) and len(value) > _REPR.maxlist):
        return rendered
    return rendered + (f" ({size} in all)" if size else "")


def one_line(text: str, limit: int = SHOWN_MAX * 2) -> str:
    """An outside message (QEMU's, the kernel's) on one line, control characters escaped, cut."""
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    if len(text) <= limit and len(flat) <= limit:
        return flat
    return f"{flat[:limit]}... ({len(text)} characters in all)"


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 8, 8, 8, 8
    r.maxstring, r.maxother, r.maxlong = 80, 80, 40
    return r


_REPR = _bounded_repr()


class InvalidInputError(QmpnetError, ValueError):
    """A value from outside (description, config, state, command line) is not acceptable.

    The message shows the value cut to :data:`SHOWN_MAX` characters; ``value`` keeps it whole.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {shown(field, 80, bare=True)} {shown(value)}: {reason}")


class UnknownValueError(InvalidInputError):
    """A value that is not in a closed vocabulary; names the valid ones."""

    def __init__(self, field: str, value: object, valid: tuple[str, ...]) -> None:
        super().__init__(field, value, "valid values are " + ", ".join(valid))
        self.valid = valid
        Exception.__init__(
            self, f"Unknown {field} {shown(value, bare=True)}: valid values are {', '.join(valid)}"
        )


class UnsupportedError(QmpnetError):
    """The request is well formed, but this endpoint type or model cannot do it."""

    def __init__(self, what: str, operation: str, reason: str) -> None:
        self.what = what
        self.operation = operation
        self.reason = reason
        super().__init__(f"{operation} of {what}: {reason}")


class HostError(QmpnetError):
    """A kernel call on the host failed."""

    def __init__(self, operation: str, obj: str, err: int | None, detail: str = "") -> None:
        self.operation = operation
        self.obj = obj
        self.errno = err
        self.detail = detail
        why = detail or (
            errno_mod.errorcode.get(err, str(err)) + ": " + _strerror(err)
            if err is not None
            else "failed"
        )
        super().__init__(f"{operation} {obj}: {why}")


class LinkExistsError(HostError):
    """A link with the requested name already exists; qmpnet refuses to reuse it."""

    def __init__(self, obj: str) -> None:
        super().__init__(
            "create link",
            obj,
            errno_mod.EEXIST,
            "a link with this name already exists and was left untouched",
        )


class NotOursError(HostError):
    """The link was not created by qmpnet (no marker), so qmpnet will not change it."""

    def __init__(self, operation: str, obj: str) -> None:
        super().__init__(operation, obj, None, "link was not created by qmpnet; left untouched")


class TapGoneError(HostError):
    """A multiqueue NIC's tap was deleted behind qmpnet's back: it is not unplugged.

    QEMU 7.2 aborts (``virtio_net_set_queue_pairs: Assertion '!r' failed``) when the guest
    resets a virtio-net NIC whose multiqueue tap is gone, and an unplug makes the guest reset
    it; so the NIC is left plugged, without a backend, until the VM stops. A deleted netns is
    not this: QEMU's queue fds keep it, and its tap, alive until the unplug closes them.
    """

    def __init__(self, device: str, tap: str) -> None:
        self.device = device
        self.tap = tap
        super().__init__(
            "unplug",
            device,
            None,
            f"its multiqueue tap {tap} was deleted behind qmpnet's back, and QEMU 7.2 aborts "
            "when the guest resets such a NIC (an unplug does); the NIC is left plugged, "
            "without a backend, until the VM stops",
        )


class NetnsError(HostError):
    """A network namespace path is missing or is not a netns file."""


class QmpError(QmpnetError):
    """A failure talking to QEMU."""


class ConnectFailure(enum.Enum):
    """Why the QMP monitor could not be reached, for callers that act on it."""

    #: no socket file, or nothing listens on it: QEMU is not running.
    ABSENT = "absent"
    #: accepted, then closed before the greeting: QEMU is exiting (or gone).
    CLOSED = "closed"
    #: no greeting in time: another client holds the monitor (it serves one), or QEMU is stuck.
    BUSY = "busy"
    #: the path exists but is not a unix socket.
    NOT_A_SOCKET = "not-a-socket"
    OTHER = "other"


class QmpConnectError(QmpError):
    """The QMP monitor could not be reached; ``kind`` says why."""

    def __init__(self, path: str, reason: str, kind: ConnectFailure = ConnectFailure.OTHER) -> None:
        self.path = path
        self.reason = reason
        self.kind = kind
        super().__init__(f"QMP monitor {path}: {reason}")

    @property
    def gone(self) -> bool:
        """No QEMU serves this monitor (not: busy, or a path that is not a socket)."""
        return self.kind in (ConnectFailure.ABSENT, ConnectFailure.CLOSED)


class MonitorHeldError(QmpConnectError):
    """qmpnetd holds the VM's QMP monitor: a direct call would wait for a greeting forever."""

    def __init__(self, path: str, holder: int) -> None:
        super().__init__(
            path,
            f"monitor held by qmpnetd (pid {holder}): go through the service (drop --direct, "
            "or give its --socket)",
            ConnectFailure.BUSY,
        )
        self.holder = holder


class QmpCommandError(QmpError):
    """QEMU answered a command with an error; its class and description are kept verbatim."""

    def __init__(
        self, command: str, arguments: dict[str, Any], error_class: str, desc: str
    ) -> None:
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc
        # QEMU's text is kept whole in ``desc``; the message shows it on one line, capped.
        super().__init__(f"{command} failed: {one_line(error_class, 80)}: {one_line(desc)}")


class QmpDisconnectedError(QmpError):
    """The connection to QEMU dropped while a command was in flight."""

    def __init__(self, command: str, detail: str) -> None:
        self.command = command
        super().__init__(f"{command}: connection to QEMU lost: {detail}")


class UnplugRefusedError(QmpError):
    """The guest refused to release the device: QEMU sent DEVICE_UNPLUG_GUEST_ERROR for it.

    QEMU (6.2 and later) withdraws the request when the guest reports the error, and the
    device stays, in use by the guest: nothing is pending, and a new ``device_del`` asks the
    guest again. ``device`` is the device's id, ``path`` its QOM path as the event gave it.
    """

    def __init__(self, device: str, path: str) -> None:
        self.device = device
        self.path = path
        super().__init__(
            f"device_del {device}: the guest refused to release the device "
            f"(DEVICE_UNPLUG_GUEST_ERROR for {one_line(path, 120)}); it stays plugged"
        )


class QmpTimeoutError(QmpError):
    """QEMU did not answer within the deadline."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command = command
        self.timeout = timeout
        super().__init__(f"{command}: no answer from QEMU within {timeout:g} s")


class UnplugTimeoutError(QmpTimeoutError):
    """The guest did not release the device in time; the unplug stays pending."""

    def __init__(self, device_id: str, timeout: float) -> None:
        self.device_id = device_id
        QmpError.__init__(
            self,
            f"device_del {device_id}: no DEVICE_DELETED within {timeout:g} s "
            "(guest paused, busy or without hot-plug support); the unplug is pending",
        )
        self.command = "device_del"
        self.timeout = timeout


class PlugError(QmpnetError):
    """A named step of a hot-plug or unplug failed; everything done before it was undone."""

    def __init__(self, operation: str, step: str, endpoint: str, cause: BaseException) -> None:
        self.operation = operation
        self.step = step
        self.endpoint = endpoint
        self.cause = cause
        super().__init__(f"{operation} {endpoint}: step {step} failed: {cause}")


class QemuHoldsError(QmpnetError):
    """A plug's host links were left for the journal's rollback: QEMU may still hold its NIC."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        super().__init__(
            f"host links of {endpoint} left in place: QEMU may still hold the NIC (its undo "
            "failed); the journal's rollback removes them after the device and netdev"
        )


class DeniedError(QmpnetError):
    """qmpnetd refuses this caller, or this request of a member of its group."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"refused by qmpnetd: {what}: {reason}")


class StateError(QmpnetError):
    """The persisted state or journal is unreadable or cannot be written."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"state {path}: {reason}")


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)
