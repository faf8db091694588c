"""Open the queue fds QEMU reads a NIC through: tap and macvtap queues, vhost-net.

These calls are blocking syscalls that act in the calling thread's netns, so callers run them
through :func:`qmpnet.netns.run_in_netns`. Every fd is ``O_CLOEXEC`` and owned by a
:class:`QueueFds`, whose ``close`` is idempotent: whatever path a hot-plug takes, the fds are
closed exactly once here, after QEMU holds its copies or when the plug is undone.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Iterable

import attrs

from qmpnet.errors import HostError, LinkExistsError
from qmpnet.model import check_ifname, check_queues

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
VHOST_NET_PATH = "/dev/vhost-net"

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


@attrs.define(eq=False)
class QueueFds:
    """The fds of one NIC: one tap (or macvtap) fd and optionally one vhost fd per queue."""

    tap: list[int] = attrs.field(factory=list)
    vhost: list[int] = attrs.field(factory=list)

    def close(self) -> None:
        """Close every fd still held; safe to call again."""
        while self.tap:
            os.close(self.tap.pop())
        while self.vhost:
            os.close(self.vhost.pop())


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def tap_flags(queues: int) -> int:
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    return flags | IFF_MULTI_QUEUE if queues > 1 else flags


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def open_tap_queues(name: str, queues: int) -> list[int]:
    """Create tap ``name`` with ``queues`` queues; refuse a name that already exists.

    The tap is not persistent: it lives exactly as long as someone (QEMU, once it holds the
    fds) keeps a queue open, so a crash of this process before the hand-over leaves no tap.
    """
    check_ifname("tap name", name)
    check_queues("queues", queues)
    try:
        socket.if_nametoindex(name)
    except OSError:
        pass
    else:
        raise LinkExistsError(name)
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, tap_flags(queues)))
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise HostError("open tap queue", name, err.errno) from err
    return fds


def open_macvtap_queues(name: str, queues: int) -> list[int]:
    """Open ``queues`` queues of the macvtap ``name`` through its character device.

    Without udev there is no ``/dev/tapN``: the node is made in a private directory from the
    major:minor sysfs gives, opened, and removed again.
    """
    check_queues("queues", queues)
    index = socket.if_nametoindex(name)
    try:
        major, minor = (
            int(x) for x in _read_sysfs_net(f"{name}/macvtap/tap{index}/dev").split(":")
        )
    except OSError as err:
        raise HostError("find macvtap device", name, err.errno) from err
    fds: list[int] = []
    with tempfile.TemporaryDirectory(prefix="qmpnet-mvt-") as tmp:
        node = os.path.join(tmp, f"tap{index}")
        try:
            os.mknod(node, 0o600 | 0o020000, os.makedev(major, minor))
            for _ in range(queues):
                fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
                fds.append(fd)
                fcntl.ioctl(fd, TUNSETIFF, _ifreq("", tap_flags(queues)))
        except OSError as err:
            for fd in fds:
                os.close(fd)
            raise HostError("open macvtap queue", name, err.errno) from err
    return fds


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _read_sysfs_net(rel: str) -> str:
    """Read ``/sys/class/net/<rel>`` as the calling thread's netns sees it.

    sysfs shows the links of the netns it was mounted in, not the reader's. A thread that
    entered another netns (a :func:`qmpnet.netns.run_in_netns` worker, which ends after the
    call) mounts a sysfs of its own in a private mount namespace of that thread only.
    """
    if os.stat("/proc/thread-self/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
        with open(f"/sys/class/net/{rel}") as fh:
            return fh.read()
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    with tempfile.TemporaryDirectory(prefix="qmpnet-sys-") as tmp:
        _check(_libc.mount(b"sysfs", tmp.encode(), b"sysfs", 0, None), "mount sysfs")
        try:
            with open(f"{tmp}/class/net/{rel}") as fh:
                return fh.read()
        finally:
            _libc.umount2(tmp.encode(), MNT_DETACH)


_warned_vhost = False


def vhost_available(disabled: bool) -> bool:
    """Whether to use vhost-net: asked for and the host has the device node.

    A missing node is said once per process, not once per NIC.
    """
    global _warned_vhost
    if disabled:
        return False
    if not os.path.exists(VHOST_NET_PATH):
        if not _warned_vhost:
            log.warning("%s is missing: using userspace virtio-net (slower)", VHOST_NET_PATH)
            _warned_vhost = True
        return False
    return True


def open_vhost_fds(queues: int) -> list[int]:
    """One vhost-net fd per queue. Never ask QEMU for vhost without them: it aborts."""
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(os.open(VHOST_NET_PATH, os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        for fd in fds:
            os.close(fd)
        raise HostError("open", VHOST_NET_PATH, err.errno) from err
    return fds


def taps_held_by(pid: int) -> frozenset[str] | None:
    """The taps a process's tun fds are attached to (the ``iff:`` of each fd's fdinfo), or
    None when its fds cannot be read.

    A queue QEMU disabled (TUNSETQUEUE detach) shows no name, but queue 0 of a NIC is never
    disabled, so a live tap QEMU reads is always listed; a tap deleted behind QEMU's back is
    not, though QEMU still holds its fds. (A deleted netns keeps its taps: each tun fd holds
    the netns it was opened in.)
    """
    held: set[str] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return None
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as fh:
                info = fh.read(4096)
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            if line.startswith(b"iff:"):
                name = line[4:].strip().decode(errors="replace")
                if name:
                    held.add(name)
    return frozenset(held)
