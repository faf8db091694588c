"""Make the saved state, QEMU and the host agree again after a crash, a lost unplug or a dead VM.

Three views of one VM can drift apart: the saved state and journal (what qmpnet meant to do),
QEMU (devices in ``/machine/peripheral``, netdevs in ``info network``, named fds) and the host
(links marked ``qmpnet:<id>``, a tc ingress on a NetPair's link, a link MAC to give back).
:func:`reconcile` is the audit that compares them, a door of its own above the front door. It
settles the journal as every operation does (:mod:`qmpnet.recovery`, whose policy it shares),
then every saved entry:

- an ``unplug-pending`` entry is completed once QEMU no longer has the device (a new request
  waits for it up to the unplug deadline), else kept pending;
- a plugged entry whose device QEMU no longer has is cleaned and dropped; one it has gets its
  saved link state set again (QEMU 7.2 has no command that reads it) and its host shaping
  made what the state says (:mod:`qmpnet.endpoints.shaping`);
- devices and netdevs in QEMU that carry qmpnet's id pattern but no record are reported,
  never touched (another state directory may own them);
- when QEMU is gone (socket missing, connection refused) the host side of every endpoint is
  cleaned and the entries are dropped.
"""

from __future__ import annotations

import re

import attrs

from qmpnet.codec import UnknownEntry
from qmpnet.endpoints import shaping
from qmpnet.errors import QmpnetError, shown
from qmpnet.hypervisor import device_id
from qmpnet.model import LinkState
from qmpnet.network import NetworkState
from qmpnet.recovery import (
    Action,
    Outcome,
    ReconcileReport,
    Settler,
    host_residue,
    qemu_gone,
    recover_journal,
    settle,
)
from qmpnet.store import Entry, Status

#: QEMU ids qmpnet gives a NIC's device and netdev (``endpoint.id`` is ``qn`` + 10 hex digits).
OUR_QEMU_ID = re.compile(r"(qn[0-9a-f]{10})-(dev|net)")


async def reconcile(state: NetworkState) -> ReconcileReport:
    """Compare journal, saved state, QEMU and host; finish or undo every difference.

    A new QEMU on the socket path first has the old VM's endpoints dropped (their host side
    cleaned), as for a QEMU that is gone; then the new VM is audited.
    """
    async with state.store.locked():
        replaced = await state.settle_vm_change()
        report = await settle(state, _Auditor)
    if replaced is None:
        return report
    return attrs.evolve(
        report,
        actions=(*replaced.actions, *report.actions),
        errors=(*replaced.errors, *report.errors),
    )


class _Auditor(Settler):
    """The journal as recovery settles it, then every saved entry and QEMU's own ids."""

    async def online(self, present: set[str]) -> None:
        handled = set(self.store.journal())
        await self.settle_journal()
        for entry in self.snapshot().entries:
            if entry.endpoint.id in handled:
                continue
            try:
                await self._settle_entry(entry, present)
            except QmpnetError as err:
                self.errors.append(f"{entry.endpoint.id}: {err}")
        await self._find_orphans()
        self._report_unreadable()

    async def offline(self, reason: str) -> None:
        await self.drop_all(reason)
        self._report_unreadable()

    def _report_unreadable(self) -> None:
        """A state entry or journal record this version cannot read may stand for a plugged
        NIC or an operation left half done: an error (the audit is incomplete, exit 9)."""
        for entry in self.snapshot().unknown:
            self.errors.append(f"unreadable state entry kept as is: {entry.reason}")
        for key, rec in self.store.journal().items():
            if isinstance(rec.endpoint, UnknownEntry):
                self.errors.append(
                    f"unreadable journal record {shown(key, 40)} kept as is: {rec.endpoint.reason}"
                )

    async def _settle_entry(self, entry: Entry, present: set[str]) -> None:
        ep = entry.endpoint
        if ep.tap is None:
            return  # a type that is never hot-plugged: nothing of it lives in QEMU
        dev = device_id(ep.tap)
        if entry.status is Status.UNPLUG_PENDING:
            if await self.remove(ep):
                await self.put(ep.id, None)
                self.act(Outcome.PENDING_COMPLETED, ep)
            else:
                self.act(Outcome.PENDING_KEPT, ep, detail="the guest still holds the device")
        elif dev not in present:
            await self.remove(ep)
            await self.put(ep.id, None)
            self.act(
                Outcome.DROPPED_DEVICE_GONE,
                ep,
                detail=f"QEMU has no device {dev} (unplugged by someone else)",
            )
        else:
            # QEMU 7.2 cannot be asked for a NIC's link, so the saved one is set again (QEMU
            # tells the guest only of a change): a set_link through another monitor is undone
            assert self.hv is not None
            await self.hv.set_link(ep.tap, entry.link is LinkState.UP)
            # and its shaping made what the state says (a live change a crash cut short)
            if ep.shaping is not None:
                try:
                    await shaping.apply(ep.shaping, entry.bandwidth)
                except QmpnetError as err:
                    self.errors.append(f"{ep.id}: shaping as saved: {err}")
                    return
            self.consistent.append(ep.id)

    async def _find_orphans(self) -> None:
        assert self.hv is not None
        known = {e.endpoint.id for e in self.snapshot().entries}
        known |= {
            r.endpoint.id
            for r in self.store.journal().values()
            if not isinstance(r.endpoint, UnknownEntry)
        }
        found = [(qid, "device") for qid in await self.hv.peripheral_ids()]
        found += [(qid, "netdev") for qid in await self.hv.qmp.netdevs()]
        for qid, kind in sorted(found):
            match = OUR_QEMU_ID.fullmatch(qid)
            if match and match.group(1) not in known:
                self.actions.append(
                    Action(
                        outcome=Outcome.ORPHAN,
                        endpoint_id=qid,
                        detail=f"QEMU {kind} with qmpnet's id pattern but no record; left as is",
                    )
                )


__all__ = [
    "OUR_QEMU_ID",
    "Action",
    "Outcome",
    "ReconcileReport",
    "host_residue",
    "qemu_gone",
    "reconcile",
    "recover_journal",
]
