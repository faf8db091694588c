"""Run a blocking callable inside a network namespace without blocking the event loop.

``setns`` changes only the calling thread, so each call gets a fresh thread that enters the
namespace, runs the callable and ends; the loop's own threads never change namespace. An empty
path means the current namespace. A path that is missing or is not a netns file is an error
here, before pyroute2 gets a chance to create a namespace of that name.

qmpnet's own namespace (the host's, as a rule) is never a sandbox: :func:`check_sandbox_netns`
refuses every path that names it, by the namespace's device and inode, not by its spelling
(``/proc/self/ns/net``, ``/proc/1/ns/net``, a bind mount of either).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from qmpnet.errors import InvalidInputError, NetnsError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: ioctl(NS_GET_NSTYPE) answers CLONE_NEWNET for a netns file and ENOTTY for any other file.
NS_GET_NSTYPE = 0xB703
#: the network namespace this process runs in (of its main thread: setns is per thread).
OWN_NETNS = "/proc/self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)


def check_netns(path: str) -> tuple[int, int]:
    """The (st_dev, st_ino) of the network namespace at ``path``; NetnsError if it names none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise NetnsError("open netns", path, err.errno) from err
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        st = os.fstat(fd)
    except OSError as err:
        raise NetnsError("open netns", path, err.errno, "not a namespace file") from err
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise NetnsError("open netns", path, None, "not a network namespace")
    return st.st_dev, st.st_ino


def is_own_netns(path: str) -> bool:
    """Whether ``path`` (``""``: the current one) is qmpnet's own network namespace."""
    if not path:
        return True
    return check_netns(path) == check_netns(OWN_NETNS)


def check_sandbox_netns(path: str, field: str = "netns") -> tuple[int, int]:
    """The identity of the netns at ``path``, refused if it is qmpnet's own.

    An empty path is the own namespace too. :class:`InvalidInputError` names ``field`` (the
    option or variable that gave the path); a path that is no netns is :class:`NetnsError`.
    """
    identity = check_netns(path) if path else check_netns(OWN_NETNS)
    if identity == check_netns(OWN_NETNS):
        raise InvalidInputError(
            field,
            path,
            "this is qmpnet's own network namespace (the host's), not a sandbox's: "
            "its links belong to the host and to other programs",
        )
    return identity


def _enter(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError("setns", path, err)
    finally:
        os.close(fd)


async def run_in_netns(
    path: str, fn: Callable[[], T], on_abandon: Callable[[T], object] | None = None
) -> T:
    """Run ``fn`` in the netns at ``path`` (``""``: the current one) on a dedicated thread.

    If the caller is cancelled while ``fn`` runs, its result reaches nobody: ``on_abandon``
    releases it (closes the fds ``fn`` opened), so a cancelled plug leaks nothing.
    """
    if path:
        check_netns(path)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if future.cancelled():
            if ok and on_abandon is not None:
                on_abandon(value)  # type: ignore[arg-type]
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            future.set_exception(value)  # type: ignore[arg-type]

    def worker() -> None:
        try:
            if path:
                _enter(path)
            result: object = fn()
        except BaseException as err:  # delivered to the awaiting task, not swallowed
            loop.call_soon_threadsafe(deliver, False, err)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    if path:
        # setns() changes the calling thread for good: a thread of its own, used once
        threading.Thread(target=worker, name=f"qmpnet-netns:{path}", daemon=True).start()
    else:
        # this namespace: the loop's pooled worker threads (no thread, and no malloc arena
        # touched afresh, per call)
        loop.run_in_executor(None, worker)
    return await future


def netns_exists(path: str) -> bool:
    try:
        check_netns(path)
    except NetnsError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return True
