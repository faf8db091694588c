"""Files that outlive the process: atomic writes and the lock of a state directory.

Used by every kind of record qmpnet keeps (the VM's state and journal, the CNI plugin's
attachments), so each is written the same way: a temp file in the same directory, fsynced,
made 0600, renamed over the old file, and the directory fsynced, so a crash leaves the old
file or the new one, never half of one. The lock is a ``flock`` polled with a deadline, so
no thread ever blocks on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from qmpnet.errors import StateError
from qmpnet.poll import poll_until


def private_dir(path: Path) -> None:
    """Make ``path`` (and its parents) a directory only its owner can enter."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as err:
        raise StateError(str(path), f"cannot create: {err.strerror}") from err
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(str(path), "not a directory")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably and all at once; the directory must exist."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as err:
        raise StateError(str(path), f"write: {err.strerror}") from err
    done = False
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        done = True
    except OSError as err:
        raise StateError(str(path), f"write: {err.strerror}") from err
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    try:
        _fsync_dir(path.parent)
    except OSError as err:
        raise StateError(str(path), f"sync directory: {err.strerror}") from err


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.asynccontextmanager
async def file_lock(
    path: Path,
    *,
    timeout: float,
    busy: Callable[[], BaseException] | None = None,
    interval: float = 0.002,
    cap: float | None = 0.05,
) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (made 0600 in a private directory).

    Polled from ``interval`` (doubling up to ``cap``; None: steady) until ``timeout``, then
    ``busy()`` is raised (by default a :class:`StateError` that says so). Whoever removes the
    lock file does so while holding it; a waiter that then gets the lock of the removed file
    starts over on the new one, so two holders never both think they hold "the" lock.
    ``flock`` is per open file: two tasks of one process exclude each other too, but poll to
    do it; serialize them with an ``asyncio.Lock`` around this.
    """

    def held() -> StateError:
        return StateError(str(path), f"held by another holder for more than {timeout:g} s")

    deadline = time.monotonic() + timeout
    while True:
        private_dir(path.parent)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(str(path.parent), f"cannot create: {err.strerror}") from err
        try:
            await poll_until(
                functools.partial(_try_lock, fd, path),
                deadline=deadline,
                interval=interval,
                cap=cap,
                error=busy or held,
            )
            if same_file(fd, path):
                yield
                return
        finally:
            os.close(fd)  # releases the flock


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise StateError(str(path.parent), f"lock: {err.strerror}") from err
    return True


def same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one removed or replaced meanwhile)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
