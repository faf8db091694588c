"""Make the saved state, QEMU and the host agree again after a crash, a lost unplug or a dead VM.

Three views of one VM can drift apart: the saved state and journal (what qmpnet meant to do),
QEMU (devices in ``/machine/peripheral``, netdevs in ``info network``, named fds) and the host
(links marked ``qmpnet:<id>``, a tc ingress on a NetPair's link, a link MAC to give back).
:func:`reconcile` compares them and settles every difference by one policy:

- an interrupted hot-plug is rolled back completely, unless it had been persisted (the state
  file is the commit point), in which case it is complete;
- an interrupted unplug is rolled forward (completed);
- an ``unplug-pending`` entry is completed once QEMU no longer has the device (a new request
  waits for it up to the unplug deadline), else kept pending;
- a plugged entry whose device QEMU no longer has is cleaned and dropped;
- devices and netdevs in QEMU that carry qmpnet's id pattern but no record are reported,
  never touched (another state directory may own them);
- when QEMU is gone (socket missing, connection refused) the host side of every endpoint is
  cleaned and the entries are dropped.

Removal reuses the driver's own paths: the hypervisor's device_del/netdev_del, the endpoint's
``detach`` for its host plumbing. Afterwards the host is checked, and whatever still carries
the endpoint's mark is reported as an error instead of being hidden.
"""

from __future__ import annotations

import enum
import errno
import logging
import re
from typing import TYPE_CHECKING, Any

import attrs
from qemu.qmp import QMPClient

from qmpnet.codec import UnknownEntry
from qmpnet.endpoints import Endpoint, PlugContext
from qmpnet.endpoints.netpair import MAC_PARKING, parked_mac
from qmpnet.errors import (
    HostError,
    NetnsError,
    PlugError,
    QmpConnectError,
    QmpDisconnectedError,
    QmpnetError,
    UnplugTimeoutError,
    UnsupportedError,
)
from qmpnet.hypervisor import QemuHypervisor, device_id, fd_name, plugged_tap
from qmpnet.lifecycle import Operation
from qmpnet.links import Links
from qmpnet.model import QUEUES_MAX, InterworkingModel
from qmpnet.qmp import QmpSession
from qmpnet.store import Entry, JournalRecord, Snapshot, Status

if TYPE_CHECKING:
    from qmpnet.network import NetworkState

log = logging.getLogger(__name__)

#: QEMU ids qmpnet gives a NIC's device and netdev (``endpoint.id`` is ``qn`` + 10 hex digits).
OUR_QEMU_ID = re.compile(r"^(qn[0-9a-f]{10})-(dev|net)$")


class Outcome(enum.StrEnum):
    """What reconcile did with one endpoint (or found in QEMU)."""

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
    #: the interrupted operation and its last step begun, for journal records
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
            "qmp": self.qmp_path, "qemu": "running" if self.qemu_running else "gone",
            "actions": [a.to_json() for a in self.actions],
            "consistent": list(self.consistent), "errors": list(self.errors),
        }

    def lines(self) -> list[str]:
        """A human summary, one line per action."""
        state = "running" if self.qemu_running else "gone"
        out = [f"reconcile {self.qmp_path}: QEMU {state}, {len(self.actions)} action(s), "
               f"{len(self.consistent)} interface(s) consistent"]
        for a in self.actions:
            who = " ".join(x for x in (a.name, a.mac) if x)
            what = f" ({a.operation} at {a.step})" if a.operation else ""
            why = f": {a.detail}" if a.detail else ""
            out.append(f"  {a.outcome.value:<20} {a.endpoint_id} {who}{what}{why}".rstrip())
        out.extend(f"  error: {e}" for e in self.errors)
        return out


def qemu_gone(err: QmpConnectError) -> bool:
    """Whether a connect failure means no QEMU is there (not: busy or a wrong path type)."""
    return isinstance(err.__cause__, FileNotFoundError | ConnectionRefusedError |
                      ConnectionResetError | EOFError)


async def reconcile(state: NetworkState) -> ReconcileReport:
    """Compare journal, saved state, QEMU and host; finish or undo every difference."""
    async with state.store.locked():
        return await _run(state, journal_only=False)


async def recover_journal(state: NetworkState) -> ReconcileReport:
    """Settle only the interrupted operations in the journal. The caller holds the lock."""
    report = await _run(state, journal_only=True)
    for line in report.lines()[1:]:
        log.warning("recovered: %s", line.strip())
    return report


async def _run(state: NetworkState, journal_only: bool) -> ReconcileReport:
    for attempt in range(2):
        try:
            async with state.hypervisor() as hv:
                try:
                    present = await hv.peripheral_ids()
                except QmpDisconnectedError:
                    if attempt:
                        raise
                    await state.close()  # a kept session whose QEMU went: try a fresh one
                    continue
                job = _Reconciler(state, hv, qemu_running=True)
                await job.run(present, journal_only)
                return job.report()
        except QmpConnectError as err:
            if not qemu_gone(err):
                raise
            log.warning("QEMU of %s is gone (%s): cleaning the host side", state.qmp_path,
                        err.reason)
            job = _Reconciler(state, _offline(state), qemu_running=False)
            await job.run_without_qemu(journal_only, err.reason)
            return job.report()
    raise AssertionError("unreachable")


def _offline(state: NetworkState) -> QemuHypervisor:
    """A hypervisor for a QEMU that is gone: the host-side detach paths need one, unused."""
    session = QmpSession(QMPClient("gone"), state.qmp_path, 0.1, log)
    return QemuHypervisor(session)


@attrs.define(eq=False)
class _Reconciler:
    state: NetworkState
    hv: QemuHypervisor
    qemu_running: bool
    actions: list[Action] = attrs.field(factory=list)
    consistent: list[str] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)

    def report(self) -> ReconcileReport:
        return ReconcileReport(qmp_path=self.state.qmp_path, qemu_running=self.qemu_running,
                               actions=tuple(self.actions), consistent=tuple(self.consistent),
                               errors=tuple(self.errors))

    def _act(self, outcome: Outcome, ep: Endpoint, rec: JournalRecord | None = None,
             detail: str = "") -> None:
        self.actions.append(Action(
            outcome=outcome, endpoint_id=ep.id, name=ep.name, mac=ep.hardware_addr,
            operation=rec.operation if rec else "", step=rec.step if rec else "",
            detail=detail))

    # --- the saved state, re-read and rewritten per endpoint (a crash here loses nothing) ----

    def _snapshot(self) -> Snapshot:
        return self.state.store.load()

    def _saved(self, endpoint_id: str) -> Entry | None:
        return next((e for e in self._snapshot().entries if e.endpoint.id == endpoint_id), None)

    def _put(self, endpoint_id: str, entry: Entry | None) -> None:
        """Replace (or drop, with ``None``) the saved entry of ``endpoint_id``."""
        snap = self._snapshot()
        rest = tuple(e for e in snap.entries if e.endpoint.id != endpoint_id)
        entries = rest if entry is None else (*rest, entry)
        if entries != snap.entries:
            self.state.store.save(attrs.evolve(snap, entries=entries))

    # --- with QEMU -------------------------------------------------------------------------

    async def run(self, present: set[str], journal_only: bool) -> None:
        journal: dict[str, JournalRecord] = self.state.store.journal()
        for key, rec in journal.items():
            try:
                await self._settle_record(key, rec)
            except QmpnetError as err:
                self.errors.append(f"{key}: {err}")
        if journal_only:
            return
        handled = set(journal)
        for entry in self._snapshot().entries:
            if entry.endpoint.id in handled:
                continue
            try:
                await self._settle_entry(entry, present)
            except QmpnetError as err:
                self.errors.append(f"{entry.endpoint.id}: {err}")
        await self._find_orphans()
        self._report_unreadable()

    def _report_unreadable(self) -> None:
        """A state entry this version cannot read may stand for a plugged NIC: an error."""
        for entry in self._snapshot().unknown:
            self.errors.append(f"unreadable state entry kept as is: {entry.reason}")

    def _readable(self, key: str, rec: JournalRecord) -> Endpoint | None:
        """The record's endpoint; one this version cannot read is reported, kept, and None."""
        if not isinstance(rec.endpoint, UnknownEntry):
            return rec.endpoint
        self.actions.append(Action(outcome=Outcome.UNREADABLE, endpoint_id=key,
                                   operation=rec.operation, step=rec.step,
                                   detail=rec.endpoint.reason))
        return None

    async def _settle_record(self, key: str, rec: JournalRecord) -> None:
        ep = self._readable(key, rec)
        if ep is None:
            return
        saved = self._saved(ep.id)
        if rec.operation == "hot-plug":
            if saved is not None:
                self._act(Outcome.COMPLETED, ep, rec, "the hot-plug had been persisted")
            elif await self._remove(ep):
                self._act(Outcome.ROLLED_BACK, ep, rec)
            else:
                self._put(ep.id, Entry(ep, Status.UNPLUG_PENDING))
                self._act(Outcome.PENDING_KEPT, ep, rec, "the guest has not released the "
                          "device added before the interruption")
        elif rec.operation == "unplug":
            target = saved.endpoint if saved is not None else ep
            if await self._remove(target):
                self._put(ep.id, None)
                self._act(Outcome.COMPLETED, ep, rec)
            else:
                self._put(ep.id, Entry(target, Status.UNPLUG_PENDING))
                self._act(Outcome.PENDING_KEPT, ep, rec, "the guest has not released the "
                          "device yet")
        else:
            self._act(Outcome.UNREADABLE, ep, rec, f"unknown operation {rec.operation!r}")
            return
        self.state.store.journal_end(key)

    async def _settle_entry(self, entry: Entry, present: set[str]) -> None:
        ep = entry.endpoint
        try:
            dev = device_id(plugged_tap(ep))
        except UnsupportedError:
            return  # a type that is never hot-plugged: nothing of it lives in QEMU
        if entry.status is Status.UNPLUG_PENDING:
            if await self._remove(ep):
                self._put(ep.id, None)
                self._act(Outcome.PENDING_COMPLETED, ep)
            else:
                self._act(Outcome.PENDING_KEPT, ep, detail="the guest still holds the device")
        elif dev not in present:
            await self._remove(ep)
            self._put(ep.id, None)
            self._act(Outcome.DROPPED_DEVICE_GONE, ep,
                      detail=f"QEMU has no device {dev} (unplugged by someone else)")
        else:
            self.consistent.append(ep.id)

    async def _remove(self, ep: Endpoint) -> bool:
        """Remove every part of ``ep`` from QEMU and the host; False if the guest holds on."""
        try:
            await self.hv.hotplug_remove_device(ep)
        except UnsupportedError:
            pass
        except PlugError as err:
            if isinstance(err.cause, UnplugTimeoutError):
                return False
            raise
        else:
            await self._close_fds(ep)
        await self._clean_host(ep)
        return True

    async def _close_fds(self, ep: Endpoint) -> None:
        """Release fds QEMU holds by name: a prefix ``fd0..`` then ``vhost0..`` was passed."""
        tap = plugged_tap(ep)
        for kind in ("fd", "vhost"):
            for i in range(QUEUES_MAX):
                if not await self.hv.qmp.close_fd(fd_name(tap, kind, i)):
                    break

    async def _find_orphans(self) -> None:
        known = {e.endpoint.id for e in self._snapshot().entries}
        known |= {r.endpoint.id for r in self.state.store.journal().values()
                  if not isinstance(r.endpoint, UnknownEntry)}
        found = [(qid, "device") for qid in await self.hv.peripheral_ids()]
        found += [(qid, "netdev") for qid in await self.hv.qmp.netdevs()]
        for qid, kind in sorted(found):
            match = OUR_QEMU_ID.match(qid)
            if match and match.group(1) not in known:
                self.actions.append(Action(
                    outcome=Outcome.ORPHAN, endpoint_id=qid,
                    detail=f"QEMU {kind} with qmpnet's id pattern but no record; left as is"))

    # --- without QEMU ----------------------------------------------------------------------

    async def run_without_qemu(self, journal_only: bool, reason: str) -> None:
        for key, rec in self.state.store.journal().items():
            ep = self._readable(key, rec)
            if ep is None:
                continue
            saved = self._saved(ep.id)
            if await self._drop_host_side(saved.endpoint if saved else ep, rec, reason):
                self.state.store.journal_end(key)
        if not journal_only:
            for entry in self._snapshot().entries:
                await self._drop_host_side(entry.endpoint, None, reason)
            self._report_unreadable()

    async def _drop_host_side(self, ep: Endpoint, rec: JournalRecord | None,
                              reason: str) -> bool:
        try:
            await self._clean_host(ep)
        except QmpnetError as err:
            self.errors.append(f"{ep.id}: {err}")
            return False
        self._put(ep.id, None)
        self._act(Outcome.DROPPED_QEMU_GONE, ep, rec, reason)
        return True

    # --- the host side ---------------------------------------------------------------------

    async def _clean_host(self, ep: Endpoint) -> None:
        """The endpoint's own detach, then a check; whatever is left is an error, and the
        record (journal or entry) stays, so the next reconcile tries again."""
        async with Operation("reconcile", ep.name) as op:
            await ep.detach(PlugContext(self.hv, self.state.config, op), netns_created=True)
            op.commit()
        left = await host_residue(ep)
        if left:
            raise HostError("clean up after", ep.name, None, "; ".join(left))


async def host_residue(ep: Endpoint) -> list[str]:
    """What the host still holds of ``ep``: marked links, a tc ingress, a MAC not given back.

    Marked links left behind are deleted here (they are ours beyond doubt); the rest is
    reported. A netns that is gone holds nothing.
    """
    problems: list[str] = []
    try:
        async with Links.open(ep.netns_path) as links:
            if await links.delete_staged(ep.id):
                log.warning("deleted %s's link left under its staging name", ep.id)
            for link in await links.list():
                if link.owner == ep.id:
                    await links.delete(link.name, owner=ep.id)
                    log.warning("deleted leftover link %s of %s", link.name, ep.id)
            pair = ep.network_pair
            if pair is None:
                return problems
            virt = await links.lookup(pair.virt_iface.name)
            if virt is None:
                return problems
            if pair.model is InterworkingModel.TCFILTER and \
                    await links.has_tc_ingress(virt.name) and \
                    await links.tc_ingress_ours(virt.name):
                problems.append(f"{virt.name} still has qmpnet's ingress qdisc")
            if pair.model in MAC_PARKING and virt.mac == parked_mac(ep.id):
                problems.append(f"{virt.name} still has the MAC {virt.mac} qmpnet set, not "
                                f"its own {ep.hardware_addr}")
    except NetnsError as err:
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
    return problems


__all__ = ["OUR_QEMU_ID", "Action", "Outcome", "ReconcileReport", "host_residue", "qemu_gone",
           "recover_journal", "reconcile"]
