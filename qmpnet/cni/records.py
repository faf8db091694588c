"""The attachment records a VM's state directory keeps, under the plugin's own lock.

Each attachment (network, container, ifname) is recorded before it is plugged, so DEL, CHECK
and GC find exactly what this network made, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs

from qmpnet.boundary import Boundary
from qmpnet.cni.spec import ATTACHMENTS_FILE, LOCK_FILE, LOCK_TIMEOUT, CniError, Code
from qmpnet.errors import (
    InvalidInputError,
    StateError,
)
from qmpnet.network import NetworkState
from qmpnet.store import same_file


@attrs.frozen(kw_only=True)
class Attachment:
    """What one ADD plugged: enough for DEL, CHECK and GC to find it again, and only it."""

    network: str
    container_id: str
    ifname: str
    netns: str
    mac: str
    qmp_socket: str
    ipam: bool = False

    @property
    def key(self) -> tuple[str, str, str]:
        return self.network, self.container_id, self.ifname

    def to_json(self) -> dict[str, Any]:
        return RECORDS.unstructure(self)

    @classmethod
    def from_json(cls, data: object) -> Attachment | None:
        """The record, or None for one this version cannot read (the caller keeps it)."""
        try:
            return RECORDS.structure(data, cls)
        except InvalidInputError:
            return None


#: the attachment file's records; keys a later version adds are ignored, as before.
RECORDS = Boundary("attachment")
RECORDS.register(Attachment, {"container_id": "containerID", "qmp_socket": "qmpSocket"},
                 forbid_extra_keys=False)
@attrs.frozen
class Records:
    known: tuple[Attachment, ...] = ()
    #: entries this version cannot read: written back as they were, never dropped.
    unknown: tuple[Any, ...] = ()

    def find(self, key: tuple[str, str, str]) -> Attachment | None:
        return next((a for a in self.known if a.key == key), None)

    def without(self, attachment: Attachment) -> Records:
        return Records(tuple(a for a in self.known if a != attachment), self.unknown)
class Book:
    """The attachment records kept in a VM's state directory, under the plugin's own lock."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / ATTACHMENTS_FILE

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """One CNI invocation per VM at a time (another runtime thread may be on it).

        The last DEL removes the directory, lock file included, while holding the lock; a
        waiter that then gets the lock of the removed file starts over on a fresh one, so
        two invocations never both hold "the" lock.
        """
        deadline = time.monotonic() + LOCK_TIMEOUT
        lock = self.dir / LOCK_FILE
        while True:
            try:
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise StateError(str(self.dir), f"cannot create: {err.strerror}") from err
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise CniError(Code.TRY_AGAIN, f"another qmpnet-cni holds "
                                           f"{self.dir} for more than {LOCK_TIMEOUT:g} s"
                                           ) from None
                        await asyncio.sleep(0.02)
                if same_file(fd, lock):
                    yield
                    return
            finally:
                os.close(fd)

    def load(self) -> Records:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return Records()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StateError(str(self.path), f"unreadable: {err}") from err
        items = data.get("attachments") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise StateError(str(self.path), "not a qmpnet-cni attachment file")
        known, unknown = [], []
        for item in items:
            parsed = Attachment.from_json(item)
            if parsed is None:
                unknown.append(item)
            else:
                known.append(parsed)
        return Records(tuple(known), tuple(unknown))

    def save(self, records: Records) -> None:
        """Write atomically (temp file, fsync, rename); no records left: no file."""
        if not records.known and not records.unknown:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        text = json.dumps({"version": 1, "attachments": [
            *(a.to_json() for a in records.known), *records.unknown]}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{ATTACHMENTS_FILE}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateError(str(self.path), f"write: {err.strerror}") from err

    async def remove_if_unused(self, state: NetworkState) -> None:
        """Remove the directory once nothing in it is in use: no record, entry or journal."""
        if self.load() != Records():
            return
        snap = state.store.load()
        if snap.entries or snap.unknown or state.store.journal():
            return
        with contextlib.suppress(FileNotFoundError):
            (self.dir / LOCK_FILE).unlink()
        await state.store.remove_all()
