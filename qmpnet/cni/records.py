"""The attachment records a VM's state directory keeps, under the plugin's own lock.

Each attachment (network, container, ifname) is recorded before it is plugged, so DEL, CHECK
and GC find exactly what this network made, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
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
from qmpnet.files import Writer, atomic_write, file_lock, read_text, remove_file, sweep_temps
from qmpnet.network import NetworkState


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
    #: the MAC ADD's result gave CNI_IFNAME, when the plug came later (a pending attachment
    #: of a model that parks the pod's MAC reported the link's MAC as it was at ADD)
    reported_mac: str = ""

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
RECORDS.register(
    Attachment,
    {"container_id": "containerID", "qmp_socket": "qmpSocket", "reported_mac": "reportedMac"},
    forbid_extra_keys=False,
)


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
        self._writer = Writer()

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """One CNI invocation per VM at a time (another runtime thread may be on it).

        The last DEL removes the directory, lock file included, while holding the lock; a
        waiter that then gets the lock of the removed file starts over on a fresh one, so
        two invocations never both hold "the" lock.
        """

        def busy() -> CniError:
            return CniError(
                Code.TRY_AGAIN,
                f"another qmpnet-cni holds {self.dir} for more than {LOCK_TIMEOUT:g} s",
            )

        async with file_lock(
            self.dir / LOCK_FILE, timeout=LOCK_TIMEOUT, busy=busy, interval=0.02, cap=None
        ):
            sweep_temps(self.dir, (ATTACHMENTS_FILE,))
            yield

    def load(self) -> Records:
        try:
            text = read_text(self.path)
            if text is None:
                return Records()
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
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

    async def save(self, records: Records) -> None:
        """Write atomically, on a thread (it fsyncs); no records left: no file."""
        if not records.known and not records.unknown:
            await self._writer.run(lambda: remove_file(self.path))
            return
        text = json.dumps(
            {
                "version": 1,
                "attachments": [*(a.to_json() for a in records.known), *records.unknown],
            },
            indent=1,
        )
        await self._writer.run(lambda: atomic_write(self.path, text))

    async def remove_if_unused(self, state: NetworkState) -> None:
        """Remove the directory once nothing in it is in use: no record, entry or journal.

        When the VM's state lives elsewhere (the service keeps it under its root), only the
        records' own files and directory go; the VM's state is the service's to keep.
        """
        if self.load() != Records():
            return
        if not _same_dir(state.store.dir, self.dir):
            remove_file(self.dir / LOCK_FILE)
            with contextlib.suppress(OSError):
                self.dir.rmdir()
            return
        snap = state.store.load()
        if snap.entries or snap.unknown or state.store.journal():
            return
        remove_file(self.dir / LOCK_FILE)  # relative to the checked directory, never through a link
        await state.store.remove_all()


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
