"""Run a blocking callable inside a network namespace without blocking the event loop.

``setns`` changes only the calling thread, so each call gets a fresh thread that enters the
namespace, runs the callable and ends; the loop's own threads never change namespace. An empty
path means the current namespace. A path that is missing or is not a netns file is an error
here, before pyroute2 gets a chance to create a namespace of that name.
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

from qmpnet.errors import NetnsError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
#: ioctl(NS_GET_NSTYPE) answers CLONE_NEWNET for a netns file and ENOTTY for any other file.
NS_GET_NSTYPE = 0xB703

_libc = ctypes.CDLL(None, use_errno=True)


def check_netns(path: str) -> None:
    """Raise NetnsError unless ``path`` names a network namespace file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise NetnsError("open netns", path, err.errno) from err
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as err:
        raise NetnsError("open netns", path, err.errno, "not a namespace file") from err
    finally:
        os.close(fd)
    if kind != CLONE_NEWNET:
        raise NetnsError("open netns", path, None, "not a network namespace")


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

    threading.Thread(target=worker, name=f"qmpnet-netns:{path or 'host'}", daemon=True).start()
    return await future


def netns_exists(path: str) -> bool:
    try:
        check_netns(path)
    except NetnsError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return True
