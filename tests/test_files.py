"""The persistence kit: atomic writes and the state directory's lock.

Files in a temp directory only. ``flock`` is per open file, so two holders in one process
contend for it as two processes would.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

import pytest

from qmpnet import files
from qmpnet.errors import StateError
from qmpnet.files import atomic_write, file_lock, private_dir, same_file


def _leftovers(directory: Path, name: str) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(f".{name}.")]


def test_atomic_write_replaces_the_content_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old and longer than the new content")
    path.chmod(0o644)
    before = os.stat(path).st_ino
    old = os.umask(0)
    try:
        atomic_write(path, "new")
    finally:
        os.umask(old)
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.stat(path).st_ino != before  # a new file renamed over, never rewritten in place
    assert _leftovers(tmp_path, "state.json") == []


def test_atomic_write_syncs_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(files, "_fsync_dir", lambda fd: synced.append(os.fstat(fd).st_ino))
    atomic_write(tmp_path / "f", "x")
    assert synced == [os.stat(tmp_path).st_ino]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.json"
    path.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StateError, match="No space left on device") as info:
        atomic_write(path, "new")
    assert info.value.path == str(path)
    assert isinstance(info.value.__cause__, OSError)
    assert path.read_text() == "old"
    assert _leftovers(tmp_path, "journal.json") == []


def test_a_failed_rename_removes_the_temp(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()  # a directory in the way: the rename fails
    (tmp_path / "d" / "keep").write_text("")
    with pytest.raises(StateError, match="write"):
        atomic_write(tmp_path / "d", "x")
    assert _leftovers(tmp_path, "d") == []


def test_a_missing_directory_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="No such file or directory"):
        atomic_write(tmp_path / "none" / "f", "x")


def test_private_dir_tightens_and_refuses_a_non_directory(tmp_path: Path) -> None:
    loose = tmp_path / "a" / "b"
    loose.mkdir(parents=True, mode=0o755)
    loose.chmod(0o755)
    private_dir(loose)
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="exists and is not a directory"):
        private_dir(tmp_path / "file")
    (tmp_path / "link").symlink_to(loose)  # never followed: it may point anywhere
    with pytest.raises(StateError, match="is a symbolic link, not a directory"):
        private_dir(tmp_path / "link")


@pytest.mark.asyncio
async def test_the_lock_excludes_a_second_holder_and_times_out(tmp_path: Path) -> None:
    lock = tmp_path / "vm" / "lock"
    async with file_lock(lock, timeout=1):
        assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(lock.parent).st_mode) == 0o700
        with pytest.raises(StateError, match=r"held by another holder for more than 0\.1 s"):
            async with file_lock(lock, timeout=0.1):
                pytest.fail("two holders of one lock")

        class Busy(Exception):
            pass

        with pytest.raises(Busy):
            async with file_lock(lock, timeout=0.05, busy=Busy, interval=0.01, cap=None):
                pass
    async with file_lock(lock, timeout=0.1):  # released on leaving
        pass


@pytest.mark.asyncio
async def test_the_lock_waits_for_its_holder(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    order: list[str] = []

    async def hold(name: str) -> None:
        async with file_lock(lock, timeout=5):
            order.append(f"{name}+")
            await asyncio.sleep(0.05)
            order.append(f"{name}-")

    await asyncio.gather(hold("a"), hold("b"))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])


@pytest.mark.asyncio
async def test_a_lock_file_removed_by_its_holder_is_taken_anew(tmp_path: Path) -> None:
    """The last user removes the lock file while holding it; a waiter that then gets the
    removed file's lock must start over on the path's new file, not think it holds it."""
    lock = tmp_path / "lock"
    inside: list[bool] = []

    async def waiter() -> None:
        async with file_lock(lock, timeout=5):
            fd = os.open(lock, os.O_RDONLY)
            try:
                inside.append(same_file(fd, lock))
            finally:
                os.close(fd)
            inside.append(lock.exists())

    async with file_lock(lock, timeout=1):
        task = asyncio.create_task(waiter())
        await asyncio.sleep(0.05)  # the waiter polls the old file
        lock.unlink()
    await asyncio.wait_for(task, 5)
    assert inside == [True, True]


@pytest.mark.asyncio
async def test_a_lock_in_an_unmakeable_directory_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="not a directory"):
        async with file_lock(tmp_path / "file" / "lock", timeout=1):
            pass


@pytest.mark.asyncio
async def test_a_write_runs_off_the_loop_and_a_cancel_waits_for_its_end(tmp_path: Path) -> None:
    """The loop keeps running while a durable write is on its thread; a caller cancelled
    meanwhile sees the write finish first (the file is there), and the cancellation only at
    its next await: "returned" means "on disk"."""
    import threading

    gate = threading.Event()
    target = tmp_path / "f.json"

    def slow_write() -> None:
        gate.wait(10)
        atomic_write(target, "{}")

    writer = files.Writer()
    after_write: list[bool] = []

    async def caller() -> None:
        await writer.run(slow_write)
        after_write.append(target.exists())  # runs although the cancel came during the write
        await asyncio.sleep(0)  # the held-back cancellation lands here

    task = asyncio.create_task(caller())
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0.01)
        ticks += 1  # the loop is not blocked by the write
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done(), "a cancel must not cut a write short"
    assert not target.exists()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ticks == 5
    assert after_write == [True]


@pytest.mark.asyncio
async def test_a_failed_write_raises_its_error_to_the_caller(tmp_path: Path) -> None:
    def broken() -> None:
        raise StateError(str(tmp_path), "write: disk on fire")

    with pytest.raises(StateError, match="disk on fire"):
        await files.Writer().run(broken)
