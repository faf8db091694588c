"""Files that outlive the process: checked directories, atomic writes and the lock.

Used by every kind of record qmpnet keeps (the VM's state and journal, the CNI plugin's
attachments), so each is written the same way: a temp file in the same directory, fsynced,
made 0600, renamed over the old file, and the directory fsynced, so a crash leaves the old
file or the new one, never half of one. The lock is a ``flock`` polled with a deadline, so
no thread ever blocks on it.

Trust: a state directory decides what qmpnet deletes, so it must be qmpnet's alone. Every
file is opened relative to a descriptor of its directory, and no symbolic link is followed
from the top of the path down (``O_NOFOLLOW`` at each step), so a link planted anywhere is
refused, never followed. The directory itself, and every directory qmpnet creates on the way
to it, must be owned by the running user and not writable by group or others; the existing
directories above it may be owned by root or by the running user and may be writable by
others only if sticky (``/tmp``), as OpenSSH's ``StrictModes`` checks them. Symbolic links
above the directory are resolved first (``/var/run`` is root's link to ``/run``). A state
directory of ours that others may only read is tightened to 0700; one that others may write
to is refused (they may already have planted something in it): :class:`StateError`, and
nothing is changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import secrets
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

from qmpnet.errors import StateError
from qmpnet.poll import poll_until

_DIR = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: The bits that let someone other than the owner plant or replace a file.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _denied(path: Path | str, err: OSError, what: str) -> StateError:
    if err.errno in (errno.EACCES, errno.EPERM):
        return StateError(
            str(path),
            f"{what}: permission denied (a state directory of another user? run qmpnet as "
            "the user that owns it)",
        )
    return StateError(str(path), f"{what}: {err.strerror}")


def _not_a_dir(parent: int, name: str, path: Path) -> StateError:
    try:
        info = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except OSError:
        return StateError(str(path), "not a directory")
    if stat.S_ISLNK(info.st_mode):
        return StateError(str(path), "is a symbolic link, not a directory: never followed")
    return StateError(str(path), "exists and is not a directory")


def _check_ancestor(path: Path, info: os.stat_result) -> None:
    if info.st_uid not in (0, os.geteuid()):
        raise StateError(
            str(path), f"a directory above the state directory is owned by uid {info.st_uid}"
        )
    if info.st_mode & _WRITABLE_BY_OTHERS and not info.st_mode & stat.S_ISVTX:
        raise StateError(
            str(path),
            f"a directory above the state directory is writable by others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}) and not sticky",
        )


def _check_own(path: Path, fd: int) -> None:
    """The state directory and those qmpnet made: the running user's, writable by no one else."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid():
        raise StateError(
            str(path),
            f"owned by uid {info.st_uid}, not by the running user (uid {os.geteuid()}): "
            "refused, its owner controls what is in it",
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & _WRITABLE_BY_OTHERS:
        raise StateError(
            str(path),
            f"writable by group or others (mode {mode:04o}): refused, someone else may have "
            "put files in it; remove it or make it 0700",
        )
    if mode & 0o077:
        os.fchmod(fd, 0o700)


def _open_at(parent: int, name: str, path: Path, *, create: bool, own: bool) -> int | None:
    """Open directory ``name`` under ``parent`` without following a link; None if missing."""
    flags = _DIR | (os.O_RDONLY if own else os.O_PATH)
    made = False
    while True:
        try:
            fd = os.open(name, flags, dir_fd=parent)
            break
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
                made = True
            except FileExistsError:
                pass
            except OSError as err:
                raise _denied(path, err, "cannot create") from err
        except (NotADirectoryError, OSError) as err:
            if err.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _not_a_dir(parent, name, path) from err
            raise _denied(path, err, "cannot open") from err
    try:
        if own or made:
            _check_own(path, fd)
        else:
            _check_ancestor(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_tree(path: Path, *, create: bool) -> tuple[int, int] | None:
    """(fd of the parent, fd of the checked directory ``path``); None if it does not exist."""
    path = Path(os.path.abspath(path))
    if path == path.parent:
        raise StateError(str(path), "the root directory is not a state directory")
    top = Path(os.path.realpath(path.parent))
    fd = os.open("/", _DIR | os.O_PATH)
    try:
        _check_ancestor(Path("/"), os.fstat(fd))
        where = Path("/")
        for part in top.parts[1:]:
            where = where / part
            child = _open_at(fd, part, where, create=create, own=False)
            if child is None:
                os.close(fd)
                return None
            os.close(fd)
            fd = child
        own = _open_at(fd, path.name, path, create=create, own=True)
    except BaseException:
        os.close(fd)
        raise
    if own is None:
        os.close(fd)
        return None
    return fd, own


@contextlib.contextmanager
def opened_dir(path: Path, *, create: bool) -> Iterator[int | None]:
    """A descriptor of the checked directory ``path`` (None: it does not exist, no ``create``)."""
    found = _open_tree(path, create=create)
    if found is None:
        yield None
        return
    parent, fd = found
    os.close(parent)
    try:
        yield fd
    finally:
        os.close(fd)


def private_dir(path: Path) -> None:
    """Make ``path`` (and the directories up to it) a directory only its owner can enter."""
    with opened_dir(path, create=True):
        pass


def _open_file(dfd: int, path: Path, flags: int, mode: int = 0o600) -> int:
    try:
        fd = os.open(path.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise StateError(str(path), "is a symbolic link: never followed") from err
        raise _denied(path, err, "open") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateError(str(path), "not a regular file")
    return fd


def read_text(path: Path) -> str | None:
    """The text of ``path`` (UTF-8), or None when it or its directory does not exist."""
    with opened_dir(path.parent, create=False) as dfd:
        if dfd is None:
            return None
        try:
            fd = _open_file(dfd, path, os.O_RDONLY | os.O_NONBLOCK)
        except StateError as err:
            if isinstance(err.__cause__, FileNotFoundError):
                return None
            raise
        try:
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise StateError(str(path), f"read: {err.strerror}") from err
    return data.decode()


def temp_name(name: str) -> str:
    return f".{name}.{secrets.token_hex(4)}"


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` durably and all at once; the directory must exist."""
    with opened_dir(path.parent, create=False) as dfd:
        if dfd is None:
            raise StateError(str(path), f"write: {os.strerror(errno.ENOENT)}")
        _write_at(dfd, path, text)


def _write_at(dfd: int, path: Path, text: str) -> None:
    tmp = temp_name(path.name)
    try:
        fd = os.open(
            tmp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dfd,
        )
    except OSError as err:
        raise StateError(str(path), f"write: {err.strerror}") from err
    done = False
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o600)
            os.fsync(fh.fileno())
        os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        done = True
    except OSError as err:
        raise StateError(str(path), f"write: {err.strerror}") from err
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
    try:
        _fsync_dir(dfd)
    except OSError as err:
        raise StateError(str(path), f"sync directory: {err.strerror}") from err


def _fsync_dir(dfd: int) -> None:
    os.fsync(dfd)


def remove_file(path: Path) -> None:
    """Delete ``path`` from its checked directory; a missing file or directory is fine."""
    with opened_dir(path.parent, create=False) as dfd:
        if dfd is None:
            return
        try:
            os.unlink(path.name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise _denied(path, err, "remove") from err


def remove_dir(path: Path, names: Iterable[str]) -> None:
    """Delete the files ``names`` of the checked directory ``path``, then it if it is empty."""
    found = _open_tree(path, create=False)
    if found is None:
        return
    parent, dfd = found
    try:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dfd)
        with contextlib.suppress(OSError):
            os.rmdir(path.name, dir_fd=parent)
    except OSError as err:
        raise _denied(path, err, "remove") from err
    finally:
        os.close(dfd)
        os.close(parent)


def sweep_temps(directory: Path, names: Iterable[str]) -> list[str]:
    """Remove the temp files of interrupted writes of ``names`` (call it holding the lock)."""
    prefixes = tuple(f".{name}." for name in names)
    removed = []
    with opened_dir(directory, create=False) as dfd:
        if dfd is None:
            return []
        for entry in os.listdir(dfd):
            if entry.startswith(prefixes):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry, dir_fd=dfd)
                    removed.append(entry)
    return removed


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
        with opened_dir(path.parent, create=True) as dfd:
            assert dfd is not None
            fd = _open_file(dfd, path, os.O_RDWR | os.O_CREAT)
            try:
                await poll_until(
                    functools.partial(_try_lock, fd, path),
                    deadline=deadline,
                    interval=interval,
                    cap=cap,
                    error=busy or held,
                )
                if _same_at(fd, dfd, path.name):
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


def _same_at(fd: int, dfd: int, name: str) -> bool:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (not one removed or replaced meanwhile)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class Writer:
    """Runs one directory's file writes on a thread, one at a time, to their end.

    A durable write (two fsyncs) must not stall the event loop, and must not be cut off by a
    cancellation either: the thread would go on writing after its caller gave up, so the
    caller could undo a plug whose state file then says it is plugged. A cancellation that
    arrives during a write is therefore held back until the write is done, then delivered
    at the caller's next ``await``; "returned" always means "on disk".
    """

    def __init__(self) -> None:
        self._serial = threading.Lock()

    async def run(self, write: Callable[[], None]) -> None:
        def serial() -> None:
            with self._serial:
                write()

        job = asyncio.ensure_future(asyncio.to_thread(serial))
        cancelled = False
        while not job.done():
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                cancelled = True  # the write goes on; so do we, until it is done
        if cancelled:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # delivered at the caller's next await
        job.result()
