"""What systemd hands a service, without libsystemd: the listening socket and sd_notify.

Socket activation (``sd_listen_fds(3)``): systemd forks, sets ``LISTEN_PID`` to the child's
pid, ``LISTEN_FDS`` to the count of sockets passed from fd 3 on and ``LISTEN_FDNAMES`` to
their names, then execs the service. The variables are honoured only when ``LISTEN_PID`` is
this process (a parent's leftovers are not ours) and are unset once read, so nothing the
service starts inherits them. qmpnetd takes exactly one AF_UNIX stream socket that already
listens; anything else is refused with a message naming what was found.

Notification (``sd_notify(3)``): one datagram of ``KEY=value`` lines to the AF_UNIX socket
named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Without the
variable every call is a no-op, so the daemon calls it unconditionally.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: the first fd systemd passes (``SD_LISTEN_FDS_START``)
LISTEN_FDS_START = 3


class ActivationError(Exception):
    """What systemd passed cannot be the service's listening socket."""


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The fds passed to this process with their names; the variables are unset either way."""
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not count:
        return []
    if not pid.isdigit() or int(pid) != os.getpid():
        log.debug("LISTEN_PID %r is not this process (%d): ignored", pid, os.getpid())
        return []
    if not count.isdigit() or int(count) < 1:
        raise ActivationError(f"LISTEN_FDS={count!r} is not a positive count")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    labels = names.split(":") if names else []
    return [(fd, labels[i] if i < len(labels) else "unknown") for i, fd in enumerate(fds)]


def activated_socket(environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The one listening unix stream socket systemd passed, or None when not activated."""
    passed = listen_fds(environ)
    if not passed:
        return None
    if len(passed) != 1:
        raise ActivationError(
            f"systemd passed {len(passed)} sockets ({', '.join(n for _, n in passed)}); "
            "qmpnetd takes one: give its .socket unit one ListenStream="
        )
    fd, name = passed[0]
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        raise ActivationError(f"fd {fd} ({name}) passed by systemd is not open: {err}") from err
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"fd {fd} ({name}) passed by systemd is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        family, kind = sock.family, sock.type
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as err:
        sock.detach()
        raise ActivationError(f"fd {fd} ({name}): {err}") from err
    if family != socket.AF_UNIX or kind != socket.SOCK_STREAM or not listening:
        sock.detach()  # not ours to close: the error says what it is
        raise ActivationError(
            f"fd {fd} ({name}) passed by systemd is {family.name}/{kind.name}"
            f"{'' if listening else ', not listening'}: qmpnetd needs a listening "
            "AF_UNIX stream socket (ListenStream=/path in its .socket unit)"
        )
    os.set_inheritable(fd, False)
    return sock


def socket_path(sock: socket.socket) -> str:
    """The path a unix socket is bound to ("" for an unnamed or abstract one)."""
    name = sock.getsockname()
    return name if isinstance(name, str) and not name.startswith("\0") else ""


class Notifier:
    """``sd_notify``: a datagram to ``NOTIFY_SOCKET``; a no-op when it is not set."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address if address.startswith(("/", "\0")) else ""
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keys upper-cased); False when not sent."""
        if not self.address:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as err:
            log.warning("sd_notify to %r failed: %s", self.address.replace("\0", "@"), err)
            return False
        return True

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def ready(self, text: str) -> bool:
        return self.notify(ready=1, status=text)

    def stopping(self, text: str = "stopping") -> bool:
        return self.notify(stopping=1, status=text)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
