"""One VM's saved state and journal: files in a 0700 directory, written atomically, locked.

``state.json`` lists the VM's endpoints with their status; ``journal.json`` holds the intent of
each operation in flight (one record, written durably before its first host-visible step: the
endpoint names everything the operation makes), so a later process can finish or roll back
what a crashed one left. Files are written atomically (:mod:`qmpnet.files`) on a
worker thread, one write at a time, so the event loop never waits on a disk. A file lock
(``flock``, polled with a deadline) serializes processes on one VM. The directory is checked
and every file opened without following links (:mod:`qmpnet.files`). ``mark.key`` holds the
secret that proves the VM's host links are its own (:mod:`qmpnet.marks`); the lock's holder
marks and proves links with it, and first removes the temp files a killed write left.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs

from qmpnet.bandwidth import Bandwidth, load_saved, saved
from qmpnet.codec import UnknownEntry, dump_endpoint, load_endpoint
from qmpnet.endpoints import Endpoint
from qmpnet.errors import InvalidInputError, StateError, shown
from qmpnet.files import (
    Writer,
    atomic_write,
    file_lock,
    private_dir,
    read_text,
    remove_dir,
    remove_file,
    sweep_temps,
)
from qmpnet.marks import Mark, using
from qmpnet.model import LinkState, VmIdentity

STATE_VERSION = 1
STATE_FILE = "state.json"
JOURNAL_FILE = "journal.json"
LOCK_FILE = "lock"
MARK_FILE = "mark.key"
#: every file of the directory, for its removal and the sweep of interrupted writes
FILES = (STATE_FILE, JOURNAL_FILE, MARK_FILE, LOCK_FILE)


class Status(enum.StrEnum):
    PLUGGED = "plugged"
    #: device_del was sent but the guest has not released the device yet.
    UNPLUG_PENDING = "unplug-pending"
    #: shown, never saved: another QEMU serves the socket now, this entry's VM is gone
    VM_GONE = "vm-gone"


@attrs.frozen
class Entry:
    endpoint: Endpoint
    status: Status = Status.PLUGGED
    #: saved only when down; QEMU 7.2 cannot be asked for it, so reconcile sets it again
    link: LinkState = LinkState.UP
    #: the shaping in force (saved only when set)
    bandwidth: Bandwidth | None = None
    #: the guest's receive filter is mirrored onto the host link (saved only when set)
    trust_rx_filters: bool = False


@attrs.frozen
class JournalRecord:
    """An operation in flight: what it was doing to which endpoint, and the last step begun."""

    operation: str
    step: str
    endpoint: Endpoint | UnknownEntry
    started: float


@attrs.frozen
class Snapshot:
    entries: tuple[Entry, ...] = ()
    unknown: tuple[UnknownEntry, ...] = ()
    #: the QEMU process the entries belong to; None when not known (an older release)
    vm: VmIdentity | None = None
    #: the QMP socket the VM was reached on, so a service finds every VM's directory again
    qmp: str = ""


class Store:
    """The files of one VM's state directory."""

    def __init__(self, directory: str | Path, lock_timeout: float = 30.0) -> None:
        self.dir = Path(directory)
        self.lock_timeout = lock_timeout
        self._local = asyncio.Lock()
        self._writer = Writer()
        #: the state file's text last loaded, and the snapshot made from it
        self._last: tuple[str, Snapshot] | None = None
        #: id -> (endpoint, its JSON) of the endpoints last saved
        self._dumped: dict[int, tuple[object, Any]] = {}

    async def _off_loop(self, write: Callable[[], None]) -> None:
        """Run a file write on a thread, in order, to its end (see :class:`Writer`)."""
        await self._writer.run(write)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL_FILE

    def _ensure_dir(self) -> None:
        private_dir(self.dir)

    # --- locking ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the VM's lock: one operation at a time across tasks and processes."""

        def busy() -> StateError:
            return StateError(
                str(self.dir),
                f"another process holds the VM's lock for more than {self.lock_timeout:g} s",
            )

        # remove_all() may take the lock file away while we wait on it: file_lock then
        # starts again on the new file.
        async with (
            self._local,
            file_lock(self.dir / LOCK_FILE, timeout=self.lock_timeout, busy=busy),
        ):
            sweep_temps(self.dir, FILES)
            with using(self._mark(create=True)):
                yield

    # --- the ownership mark ----------------------------------------------------------------

    def mark(self) -> Mark:
        """The VM's mark, for a check made without the lock (nothing is created)."""
        return self._mark(create=False)

    def _mark(self, *, create: bool) -> Mark:
        path = self.dir / MARK_FILE
        data = self._read(path)
        if data is None and create:
            # Made once, under the lock. Endpoints already recorded here were plugged by a
            # release without the secret: their untagged marks are inherited (marks.py).
            data = {"version": 1, "secret": secrets.token_hex(32), "legacy": self._recorded()}
            self._write(path, data)
        if data is None:
            return Mark(secrets.token_bytes(32))  # proves nothing made before
        try:
            return Mark(
                bytes.fromhex(data["secret"]),
                frozenset(str(x) for x in data.get("legacy", ())),
            )
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            raise StateError(str(path), f"not a qmpnet mark key: {err}") from err

    def _recorded(self) -> list[str]:
        ids = set()
        with contextlib.suppress(StateError):
            ids |= {e.endpoint.id for e in self.load().entries}
        with contextlib.suppress(StateError):
            ids |= {
                r.endpoint.id
                for r in self.journal().values()
                if not isinstance(r.endpoint, UnknownEntry)
            }
        return sorted(ids)

    # --- files -----------------------------------------------------------------------------

    def _write(self, path: Path, data: Any) -> None:
        self._ensure_dir()
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))

    def _read(self, path: Path) -> Any:
        try:
            text = read_text(path)
        except UnicodeDecodeError as err:
            raise StateError(str(path), f"not valid JSON: {err}") from err
        return None if text is None else _parsed(path, text)

    def load(self) -> Snapshot:
        """The state as the file holds it now.

        An operation loads the state several times (the CLI's look, the lock's first look,
        after each change); each load structures every endpoint again, which grows with the
        VM's NICs (0.4 ms with one, 1.8 ms with 28 under a busy host). The file is read
        every time, so a write by any process is seen; only a text identical to the last
        one read reuses the snapshot made from it (frozen, shared safely).
        """
        try:
            text = read_text(self.state_path)
        except UnicodeDecodeError as err:
            raise StateError(str(self.state_path), f"not valid JSON: {err}") from err
        if text is None:
            return Snapshot()
        if self._last is not None and self._last[0] == text:
            return self._last[1]
        snapshot = self._structure(_parsed(self.state_path, text))
        self._last = (text, snapshot)
        return snapshot

    def _structure(self, data: Any) -> Snapshot:
        if not isinstance(data, dict) or not isinstance(data.get("endpoints"), list):
            raise StateError(str(self.state_path), "not a qmpnet state file")
        if data.get("version") != STATE_VERSION:
            raise StateError(
                str(self.state_path),
                f"state version {shown(data.get('version'))} is not {STATE_VERSION}",
            )
        entries: list[Entry] = []
        unknown: list[UnknownEntry] = []
        for item in data["endpoints"]:
            status_text = item.get("status") if isinstance(item, dict) else None
            link_text = item.get("link", "up") if isinstance(item, dict) else "up"
            loaded = load_endpoint(item.get("endpoint") if isinstance(item, dict) else item)
            if isinstance(loaded, UnknownEntry):
                unknown.append(UnknownEntry(item, loaded.reason))
            elif not isinstance(status_text, str) or status_text not in Status._value2member_map_:
                unknown.append(UnknownEntry(item, f"unknown status {shown(status_text)}"))
            elif not isinstance(link_text, str) or link_text not in LinkState._value2member_map_:
                unknown.append(UnknownEntry(item, f"unknown link state {shown(link_text)}"))
            else:
                try:
                    shaped = None if "bandwidth" not in item else load_saved(item["bandwidth"])
                except InvalidInputError as err:
                    unknown.append(UnknownEntry(item, f"unknown bandwidth: {err}"))
                    continue
                trust = item.get("trust_rx_filters", False)
                if not isinstance(trust, bool):
                    unknown.append(UnknownEntry(item, f"unknown trust_rx_filters {shown(trust)}"))
                    continue
                entry = Entry(loaded, Status(status_text), LinkState(link_text), shaped, trust)
                entries.append(entry)
        qmp = data.get("qmp")
        return Snapshot(
            tuple(entries),
            tuple(unknown),
            _identity(data.get("vm")),
            qmp if isinstance(qmp, str) else "",
        )

    async def save(self, snapshot: Snapshot) -> None:
        # an endpoint is frozen: the JSON of one saved before (the same object, as a reused
        # snapshot holds it) is reused; only the endpoints of this snapshot are kept
        dumped = {
            id(e.endpoint): hit
            if (hit := self._dumped.get(id(e.endpoint))) is not None and hit[0] is e.endpoint
            else (e.endpoint, dump_endpoint(e.endpoint))
            for e in snapshot.entries
        }
        self._dumped = dumped
        items: list[Any] = [
            {
                "status": e.status.value,
                **({"link": e.link.value} if e.link is not LinkState.UP else {}),
                **({"bandwidth": saved(e.bandwidth)} if e.bandwidth else {}),
                **({"trust_rx_filters": True} if e.trust_rx_filters else {}),
                "endpoint": dumped[id(e.endpoint)][1],
            }
            for e in snapshot.entries
        ]
        items.extend(u.raw for u in snapshot.unknown)
        data: dict[str, Any] = {"version": STATE_VERSION, "endpoints": items}
        if snapshot.vm is not None:
            data["vm"] = {"pid": snapshot.vm.pid, "start_time": snapshot.vm.start_time}
        if snapshot.qmp:
            data["qmp"] = snapshot.qmp
        await self._off_loop(lambda: self._write(self.state_path, data))

    # --- journal ---------------------------------------------------------------------------

    def journal(self) -> dict[str, JournalRecord]:
        data = self._read(self.journal_path)
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise StateError(str(self.journal_path), "not a qmpnet journal")
        out = {}
        for key, rec in data.items():
            if not isinstance(rec, dict):
                # kept and reported (a reconcile says it cannot read it), never dropped
                out[key] = JournalRecord("", "", UnknownEntry(rec, "not a JSON object"), 0.0)
                continue
            out[key] = JournalRecord(
                str(rec.get("operation")),
                str(rec.get("step")),
                load_endpoint(rec.get("endpoint")),
                _seconds(rec.get("started")),
            )
        return out

    async def journal_begin(
        self, key: str, operation: str, step: str, endpoint: Endpoint, started: float
    ) -> None:
        record = {
            "operation": str(operation),
            "step": step,
            "endpoint": dump_endpoint(endpoint),
            "started": started,
        }

        def write() -> None:
            data = self._read(self.journal_path) or {}
            data[key] = record
            self._write(self.journal_path, data)

        await self._off_loop(write)

    async def journal_end(self, key: str) -> None:
        def write() -> None:
            data = self._read(self.journal_path) or {}
            if data.pop(key, None) is not None:
                if data:
                    self._write(self.journal_path, data)
                else:
                    remove_file(self.journal_path)

        await self._off_loop(write)

    async def remove_all(self) -> None:
        """Delete the state directory's files (after the VM is gone and reconciled)."""

        def remove() -> None:
            remove_dir(self.dir, FILES)

        await self._off_loop(remove)


def _parsed(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise StateError(str(path), f"not valid JSON: {err}") from err


def _identity(value: object) -> VmIdentity | None:
    """The saved VM identity; anything else (absent, damaged) reads as unknown."""
    if not isinstance(value, dict):
        return None
    pid, start = value.get("pid"), value.get("start_time")
    if type(pid) is not int or type(start) is not int:
        return None
    return VmIdentity(pid, start)


def _seconds(value: object) -> float:
    """A journal timestamp; anything else (a damaged file) reads as 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    try:
        return float(value)
    except OverflowError:
        return 0.0
