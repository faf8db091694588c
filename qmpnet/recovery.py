"""Settle what an interrupted operation left, from its journal record: below the front door.

Every operation of :class:`qmpnet.network.NetworkState` first settles the VM's journal, so an
operation a crashed process left in flight is finished or rolled back before anything new
starts; the ``reconcile`` audit (:mod:`qmpnet.reconcile`, a door of its own) builds on the same
:class:`Settler`. The policy:

- an interrupted hot-plug is rolled back completely, unless it had been persisted (the state
  file is the commit point), in which case it is complete;
- an interrupted unplug is rolled forward (completed);
- a device the guest has not released yet, or refused to release, keeps its entry
  ``unplug-pending``;
- when QEMU is gone (socket missing, connection refused) the host side of the endpoint is
  cleaned with its own ``teardown`` and the record dropped.

Removal reuses the driver's own paths: the hypervisor's device_del/netdev_del for the tap the
endpoint names, the endpoint's ``teardown`` for its host plumbing. Afterwards the host is
checked, and whatever still carries the endpoint's mark is reported as an error instead of
being hidden (the record stays, so the next run tries again).
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import attrs

from qmpnet.codec import UnknownEntry
from qmpnet.config import Config
from qmpnet.endpoints import Endpoint, shaping
from qmpnet.endpoints.netpair import pair_model
from qmpnet.errors import (
    HostError,
    NetnsError,
    PlugError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpnetError,
    UnplugRefusedError,
    UnplugTimeoutError,
    shown,
)
from qmpnet.hypervisor import QemuHypervisor
from qmpnet.lifecycle import Operation, OpKind
from qmpnet.links import Links, ours
from qmpnet.store import Entry, JournalRecord, Snapshot, Status, Store

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """What recovery or reconcile did with one endpoint (or found in QEMU)."""

    ROLLED_BACK = "rolled-back"
    COMPLETED = "completed"
    PENDING_KEPT = "pending-kept"
    PENDING_COMPLETED = "pending-completed"
    DROPPED_DEVICE_GONE = "dropped-device-gone"
    DROPPED_QEMU_GONE = "dropped-qemu-gone"
    ORPHAN = "orphan"
    UNREADABLE = "unreadable-kept"


@attrs.frozen(kw_only=True)
class Action:
    outcome: Outcome
    #: the endpoint's id (``qn…``), the QEMU id for an orphan
    endpoint_id: str
    name: str = ""
    mac: str = ""
    #: the interrupted operation and the step its record was written at (its first one that
    #: changes anything; later steps are not journaled), for journal records
    operation: str = ""
    step: str = ""
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in attrs.fields(Action)}


@attrs.frozen(kw_only=True)
class ReconcileReport:
    """Every action taken, in order; ``errors`` lists cleanups that failed (the rest went on)."""

    qmp_path: str
    qemu_running: bool
    actions: tuple[Action, ...] = ()
    #: plugged entries found whole in QEMU and left as they are
    consistent: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    def by_outcome(self, outcome: Outcome) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.outcome is outcome)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "qmp": self.qmp_path,
            "qemu": "running" if self.qemu_running else "gone",
            "actions": [a.to_json() for a in self.actions],
            "consistent": list(self.consistent),
            "errors": list(self.errors),
        }

    def lines(self) -> list[str]:
        """A human summary, one line per action."""
        state = "running" if self.qemu_running else "gone"
        out = [
            f"reconcile {self.qmp_path}: QEMU {state}, {len(self.actions)} action(s), "
            f"{len(self.consistent)} interface(s) consistent"
        ]
        for a in self.actions:
            who = " ".join(x for x in (a.name, a.mac) if x)
            what = f" ({a.operation}, journaled at {a.step})" if a.operation else ""
            why = f": {a.detail}" if a.detail else ""
            out.append(f"  {a.outcome.value:<20} {a.endpoint_id} {who}{what}{why}".rstrip())
        out.extend(f"  error: {e}" for e in self.errors)
        return out


class Vm(Protocol):
    """What recovery needs of one VM: its files, its settings, and a way to reach QEMU."""

    @property
    def store(self) -> Store: ...

    @property
    def config(self) -> Config: ...

    @property
    def qmp_path(self) -> str: ...

    def hypervisor(self) -> AbstractAsyncContextManager[QemuHypervisor]:
        """A session to the VM's QEMU (a kept one, or one for this use)."""
        ...

    async def close(self) -> None:
        """Drop a kept session (its QEMU went away: the next use connects afresh)."""
        ...


def qemu_gone(err: QmpConnectError) -> bool:
    """Whether a connect failure means no QEMU is there (not: busy or a wrong path type)."""
    return err.gone


@attrs.define(eq=False)
class Settler:
    """Settles one VM's journal; :mod:`qmpnet.reconcile` extends it to the whole audit.

    ``hv`` is ``None`` when QEMU is gone: then only host sides are cleaned.
    """

    vm: Vm
    hv: QemuHypervisor | None
    actions: list[Action] = attrs.field(factory=list)
    consistent: list[str] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)

    @property
    def store(self) -> Store:
        return self.vm.store

    def report(self) -> ReconcileReport:
        return ReconcileReport(
            qmp_path=self.vm.qmp_path,
            qemu_running=self.hv is not None,
            actions=tuple(self.actions),
            consistent=tuple(self.consistent),
            errors=tuple(self.errors),
        )

    def act(
        self, outcome: Outcome, ep: Endpoint, rec: JournalRecord | None = None, detail: str = ""
    ) -> None:
        self.actions.append(
            Action(
                outcome=outcome,
                endpoint_id=ep.id,
                name=ep.name,
                mac=ep.hardware_addr,
                operation=rec.operation if rec else "",
                step=rec.step if rec else "",
                detail=detail,
            )
        )

    # --- what to do: overridden by the audit ---------------------------------------------

    async def online(self, present: set[str]) -> None:
        """With QEMU: settle every journal record (``present``: QEMU's device ids)."""
        del present
        await self.settle_journal()

    async def offline(self, reason: str) -> None:
        """Without QEMU: clean the host side of every journal record's endpoint."""
        await self.settle_journal_offline(reason)

    async def drop_all(self, reason: str) -> None:
        """The VM is gone: the host side of every record and entry goes, and the entries."""
        await self.settle_journal_offline(reason)
        for entry in self.snapshot().entries:
            await self.drop_host_side(entry.endpoint, None, reason)

    # --- the saved state, re-read and rewritten per endpoint (a crash here loses nothing) ----

    def snapshot(self) -> Snapshot:
        return self.store.load()

    def saved(self, endpoint_id: str) -> Entry | None:
        return next((e for e in self.snapshot().entries if e.endpoint.id == endpoint_id), None)

    async def put(self, endpoint_id: str, entry: Entry | None) -> None:
        """Replace (or drop, with ``None``) the saved entry of ``endpoint_id``."""
        snap = self.snapshot()
        rest = tuple(e for e in snap.entries if e.endpoint.id != endpoint_id)
        entries = rest if entry is None else (*rest, entry)
        if entries != snap.entries:
            await self.store.save(attrs.evolve(snap, entries=entries))

    def readable(self, key: str, rec: JournalRecord) -> Endpoint | None:
        """The record's endpoint; one this version cannot read is reported, kept, and None."""
        if not isinstance(rec.endpoint, UnknownEntry):
            return rec.endpoint
        self.actions.append(
            Action(
                outcome=Outcome.UNREADABLE,
                endpoint_id=key,
                operation=rec.operation,
                step=rec.step,
                detail=rec.endpoint.reason,
            )
        )
        return None

    # --- the journal, with QEMU -------------------------------------------------------------

    async def settle_journal(self) -> None:
        for key, rec in self.store.journal().items():
            try:
                await self._settle_record(key, rec)
            except QmpnetError as err:
                self.errors.append(f"{key}: {err}")

    async def _settle_record(self, key: str, rec: JournalRecord) -> None:
        ep = self.readable(key, rec)
        if ep is None:
            return
        saved = self.saved(ep.id)
        if rec.operation == OpKind.HOT_PLUG:
            if saved is not None:
                self.act(Outcome.COMPLETED, ep, rec, "the hot-plug had been persisted")
            elif await self.remove(ep):
                self.act(Outcome.ROLLED_BACK, ep, rec)
            else:
                await self.put(ep.id, Entry(ep, Status.UNPLUG_PENDING))
                self.act(
                    Outcome.PENDING_KEPT,
                    ep,
                    rec,
                    "the guest has not released the device added before the interruption",
                )
        elif rec.operation == OpKind.UNPLUG:
            target = saved.endpoint if saved is not None else ep
            if await self.remove(target):
                await self.put(ep.id, None)
                self.act(Outcome.COMPLETED, ep, rec)
            else:
                await self.put(ep.id, Entry(target, Status.UNPLUG_PENDING))
                self.act(Outcome.PENDING_KEPT, ep, rec, "the guest has not released the device yet")
        else:
            self.act(Outcome.UNREADABLE, ep, rec, f"unknown operation {shown(rec.operation)}")
            return
        await self.store.journal_end(key)

    async def remove(self, ep: Endpoint) -> bool:
        """Remove every part of ``ep`` from QEMU and the host; False if the guest holds on.

        The guest holds on when it has not released the device by the deadline, or when it
        refused to (DEVICE_UNPLUG_GUEST_ERROR): either way nothing past ``device_del`` ran.
        The caller keeps the entry ``unplug-pending`` for a later try; an error instead would
        keep the journal record, and every later operation would ask the guest again.
        """
        assert self.hv is not None
        tap = ep.tap
        if tap is not None:
            try:
                # No tap-gone guard here: a rollback's own undo may have closed the tap after
                # its netdev_del (QEMU then leaves the NIC's queues alone), which the guard
                # cannot tell from a tap deleted behind QEMU's back
                await self.hv.unplug_tap(tap)
            except PlugError as err:
                if isinstance(err.cause, UnplugTimeoutError | UnplugRefusedError):
                    log.info("%s: the guest holds on to its device: %s", ep.id, err.cause)
                    return False
                raise
            await self.hv.release_fds(tap)
        await self.clean_host(ep)
        return True

    # --- the journal, without QEMU ----------------------------------------------------------

    async def settle_journal_offline(self, reason: str) -> None:
        for key, rec in self.store.journal().items():
            ep = self.readable(key, rec)
            if ep is None:
                continue
            saved = self.saved(ep.id)
            if await self.drop_host_side(saved.endpoint if saved else ep, rec, reason):
                await self.store.journal_end(key)

    async def drop_host_side(self, ep: Endpoint, rec: JournalRecord | None, reason: str) -> bool:
        try:
            await self.clean_host(ep)
        except QmpnetError as err:
            self.errors.append(f"{ep.id}: {err}")
            return False
        await self.put(ep.id, None)
        self.act(Outcome.DROPPED_QEMU_GONE, ep, rec, reason)
        return True

    # --- the host side ---------------------------------------------------------------------

    async def clean_host(self, ep: Endpoint) -> None:
        """The endpoint's own teardown, then a check; whatever is left is an error, and the
        record (journal or entry) stays, so the next run tries again."""
        await teardown(ep)
        left = await host_residue(ep)
        if left:
            raise HostError("clean up after", ep.name, None, "; ".join(left))


async def teardown(ep: Endpoint) -> None:
    """Remove ``ep``'s host side alone, as its own operation (QEMU is not touched)."""
    async with Operation(OpKind.TEARDOWN, ep.name, subject=ep) as op:
        await ep.teardown(op)
        op.commit()


async def host_residue(ep: Endpoint) -> list[str]:
    """What the host still holds of ``ep``: marked links, and what its model left behind.

    Links left behind whose mark proves them ``ep``'s are deleted here (ours beyond doubt);
    a link that only claims to be (an alias copied, or an untagged mark found by scanning)
    is left alone. The rest is reported. A netns that is gone holds nothing.
    """
    problems: list[str] = []
    try:
        async with Links.open(ep.netns_path) as links:
            if await links.delete_staged(ep.id):
                log.warning("deleted %s's link left under its staging name", ep.id)
            for link in await links.list():
                if ours(link, ep.id):
                    await links.delete(link.name, owner=ep.id)
                    log.warning("deleted leftover link %s of %s", link.name, ep.id)
            pair = ep.network_pair
            virt = None if pair is None else await links.lookup(pair.virt_iface.name)
            if pair is not None and virt is not None:
                problems += await pair_model(pair.model).residue(pair, links, virt)
            if ep.shaping is not None:
                problems += await shaping.residue(links, ep.shaping)
    except NetnsError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
    return problems


async def settle(
    vm: Vm,
    make: Callable[[Vm, QemuHypervisor | None], Settler] = Settler,
) -> ReconcileReport:
    """Run a settler against the VM's QEMU, or without it when QEMU is gone.

    A kept session whose QEMU went away is dropped and one fresh connection is tried.
    """
    for attempt in range(2):
        try:
            async with vm.hypervisor() as hv:
                try:
                    present = await hv.peripheral_ids()
                except QmpDisconnectedError:
                    if attempt:
                        raise
                    await vm.close()
                    continue
                job = make(vm, hv)
                await job.online(present)
                return job.report()
        except QmpConnectError as err:
            if not qemu_gone(err):
                raise
            log.warning("QEMU of %s is gone (%s): cleaning the host side", vm.qmp_path, err.reason)
            job = make(vm, None)
            await job.offline(err.reason)
            return job.report()
    raise AssertionError("unreachable")


async def recover_journal(vm: Vm) -> ReconcileReport:
    """Settle only the interrupted operations in the journal. The caller holds the lock."""
    report = await settle(vm)
    for line in report.lines()[1:]:
        log.warning("recovered: %s", line.strip())
    return report


__all__ = [
    "Action",
    "Outcome",
    "ReconcileReport",
    "Settler",
    "Vm",
    "host_residue",
    "qemu_gone",
    "recover_journal",
    "settle",
    "teardown",
]
