"""Follow a network namespace and keep a VM's NICs in step with the links that live there.

A container runtime or a CNI plugin makes links in the sandbox netns; :func:`watch` hot-plugs
each one as a NetPair endpoint and unplugs it when the link goes, so nobody has to call
``add-iface`` by hand. The netns is the source of truth: on start the watcher plugs the links
already there and unplugs saved NICs whose link is gone.

Netlink announces every step of a link's setup (created, MAC set, moved, up), so decisions
are made per link name only after its events have been quiet for the debounce window, from a
fresh look at the link, not from the events: a link that comes and goes within the window is
never plugged, and a burst of events is one action. Actions run one at a time through
:class:`~qmpnet.network.NetworkState`, so each is all or nothing; a stop request lets the
action in flight finish (or undo itself) and never cuts it in half.

Which links are plugged: veth, macvlan and tun/tap links that are up, have a MAC and are
nobody's port. Ignored: ``lo``, links qmpnet made (ifalias ``qmpnet:<id>``: taps, macvtaps,
bridges) and links enslaved to any master. Once plugged, a link stays plugged while it
exists and is still joined to its tap, even when it goes down or (bridged model) becomes a
port of qmpnet's bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

import attrs

from qmpnet import marks
from qmpnet.endpoints import Endpoint
from qmpnet.endpoints.netpair import MODELS, pair_model
from qmpnet.errors import HostError, InvalidInputError, QmpnetError
from qmpnet.links import LinkInfo, Links, ours
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.netns import check_sandbox_netns
from qmpnet.network import NetworkState, NoSuchInterfaceError
from qmpnet.store import Entry, Status

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

#: netlink link kind -> the linkType a plugged link is described with.
PLUGGED_KINDS: Mapping[str, str] = {"veth": "veth", "macvlan": "macvlan", "tun": "tuntap"}
#: Pauses before retrying a failed action on a link; a new event for it always retries.
RETRY_DELAYS: tuple[float, ...] = (1.0, 5.0, 30.0)
#: Pause before reopening the event socket after it broke (events were lost).
REOPEN_DELAY = 1.0
#: How often the netns path is checked: our sockets would keep a deleted netns alive.
NETNS_CHECK = 1.0


# --- debouncing (pure) -------------------------------------------------------------------------


@attrs.define
class Debouncer(Generic[K]):
    """Keys that have been quiet for ``window`` seconds since their last touch.

    Trailing edge: every touch moves the key's deadline to ``now + window``; a key that keeps
    being touched is still released ``max_wait`` seconds after its first touch, so a link that
    flaps forever is looked at anyway. Time is passed in, so the logic is testable without a
    clock.
    """

    window: float
    #: the longest a key waits from its first touch; default ten windows.
    max_wait: float | None = None
    _due: dict[K, float] = attrs.field(factory=dict, init=False)
    _first: dict[K, float] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        if self.window < 0:
            raise InvalidInputError("debounce", self.window, "must be >= 0 seconds")
        if self.max_wait is None:
            self.max_wait = 10 * self.window

    def touch(self, key: K, now: float, delay: float | None = None) -> None:
        """Something happened to ``key``: look at it once it is quiet (or after ``delay``)."""
        first = self._first.setdefault(key, now)
        assert self.max_wait is not None
        if delay is None:
            self._due[key] = min(now + self.window, first + self.max_wait)
        else:  # a scheduled retry never postpones a look already due sooner
            self._due[key] = min(self._due.get(key, now + delay), now + delay)

    def pop_due(self, now: float) -> list[K]:
        """The keys whose deadline has passed, earliest first; they are forgotten."""
        ready = sorted(
            (due, n, key) for n, (key, due) in enumerate(self._due.items()) if due <= now
        )
        for _, _, key in ready:
            del self._due[key]
            del self._first[key]
        return [key for _, _, key in ready]

    def next_due(self) -> float | None:
        return min(self._due.values(), default=None)

    def discard(self, key: K) -> None:
        self._due.pop(key, None)
        self._first.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __len__(self) -> int:
        return len(self._due)


# --- deciding (pure) ---------------------------------------------------------------------------


class Action(enum.StrEnum):
    NOTHING = "nothing"
    KEEP = "keep"
    PLUG = "plug"
    UNPLUG = "unplug"
    #: the saved NIC's link was replaced by another of the same name: unplug, then plug.
    REPLUG = "replug"


def ignore_reason(link: LinkInfo, by_index: Mapping[int, LinkInfo]) -> str | None:
    """Why ``link`` is not to be plugged, or None if it is."""
    if link.name == "lo":
        return "loopback"
    if link.owner is not None:
        return "made by qmpnet"
    if link.master:
        master = by_index.get(link.master)
        if master is not None and master.owner is not None:
            return f"port of qmpnet's bridge {master.name}"
        return f"port of {master.name if master else link.master}"
    if link.kind not in PLUGGED_KINDS:
        return f"kind {link.kind or 'device'} is not plugged"
    if not link.mac:
        return "no MAC address"
    if not link.up:
        return "down"
    return None


def plan(link: LinkInfo | None, ignored: str | None, entry: Entry | None, attached: bool) -> Action:
    """What to do with one link name, given the link now, and the NIC saved under that name.

    ``attached``: the saved NIC is plugged and its tap is still joined to this very link.
    """
    wanted = link is not None and ignored is None
    if entry is None:
        return Action.PLUG if wanted else Action.NOTHING
    if link is not None and attached:
        return Action.KEEP
    return Action.REPLUG if wanted else Action.UNPLUG


# --- what the watcher reports ------------------------------------------------------------------


class WatchEventKind(enum.StrEnum):
    #: the links present at start (or after a reopen) have all been dealt with.
    SYNCED = "synced"
    PLUGGING = "plugging"
    PLUGGED = "plugged"
    UNPLUGGING = "unplugging"
    UNPLUGGED = "unplugged"
    #: a saved NIC whose link is still there and still joined to its tap.
    KEPT = "kept"
    #: a link that is not plugged (``detail`` says why; ``absent`` when it is gone).
    IGNORED = "ignored"
    FAILED = "failed"
    #: the event socket broke (events lost); it is reopened and every link looked at again.
    RESYNC = "resync"
    STOPPED = "stopped"


@attrs.frozen(kw_only=True)
class WatchEvent:
    """One thing the watcher did or decided, for ``on_event`` callbacks and logs."""

    kind: WatchEventKind
    #: the link name (empty for events about the whole watcher).
    link: str = ""
    mac: str = ""
    #: the NIC's id (QEMU device ``<id>-dev``) when one is involved.
    endpoint_id: str = ""
    pci_path: str = ""
    #: why (IGNORED), the error (FAILED, RESYNC), or a summary (SYNCED).
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v != "" or k == "kind"}


OnEvent = Callable[[WatchEvent], None]


def _same_netns(a: str, b: str) -> bool:
    """Whether two netns paths name one namespace (``/run/netns/x`` vs a bind mount of it)."""
    if not a or not b:
        return a == b
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# --- the watcher ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Watcher:
    state: NetworkState
    netns: str
    model: InterworkingModel
    stop: asyncio.Event
    on_event: OnEvent | None
    debouncer: Debouncer[str]
    #: (st_dev, st_ino) of the netns file when the watch began.
    identity: tuple[int, int]
    #: set when the netns was deleted (or replaced by another of the same name).
    gone: bool = False
    _failures: dict[str, int] = attrs.field(factory=dict)
    #: ifindex -> name, to notice renames (the old name is looked at too).
    _names: dict[int, str] = attrs.field(factory=dict)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event)

    def emit(self, kind: WatchEventKind, link: str = "", **fields: str) -> None:
        if self.on_event is not None:
            self.on_event(WatchEvent(kind=kind, link=link, **fields))

    def _managed(self, entry: Entry) -> bool:
        """A NetPair NIC of this netns: the watcher's to keep or unplug."""
        ep = entry.endpoint
        return ep.network_pair is not None and _same_netns(ep.netns_path, self.netns)

    def _netns_gone(self) -> bool:
        try:
            st = os.stat(self.netns)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.identity

    async def _entries(self) -> list[Entry]:
        return [e for e in await self.state.list_interfaces() if self._managed(e)]

    # --- the session: one event socket, one query socket ----------------------------------

    async def run(self) -> None:
        while not self.stop.is_set():
            async with (
                Links.open(self.netns, link_events=True) as events,
                Links.open(self.netns) as links,
            ):
                # Subscribed before the first look: nothing between the two is missed.
                reader = asyncio.create_task(self._read(events))
                try:
                    await self._sync(links)
                    lost = await self._serve(links, reader)
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError, HostError):
                        await reader
            if lost is None:
                return
            if self._netns_gone():
                self.gone = True
                return
            log.error("watch %s: %s; reopening and looking at every link again", self.netns, lost)
            self.emit(WatchEventKind.RESYNC, detail=str(lost))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), REOPEN_DELAY)

    async def _read(self, events: Links) -> None:
        loop = asyncio.get_running_loop()
        async for event in events.events():
            info = event.link
            old = self._names.get(info.index)
            if event.present:
                self._names[info.index] = info.name
            else:
                self._names.pop(info.index, None)
            if old is not None and old != info.name:
                self.debouncer.touch(old, loop.time())
            self.debouncer.touch(info.name, loop.time())
            self._wake.set()

    async def _sync(self, links: Links) -> None:
        """Look at every link and every saved NIC of the netns at once, without debouncing."""
        await self._recover()
        present = await links.list()
        self._names = {link.index: link.name for link in present}
        names = {link.name for link in present}
        names.update(e.endpoint.name for e in await self._entries())
        for name in sorted(names):
            if self.stop.is_set():
                return
            self.debouncer.discard(name)
            await self._settle(links, name)
        count = len(await self._entries())
        log.info("watch %s: in step, %d NIC(s) plugged from this netns", self.netns, count)
        self.emit(WatchEventKind.SYNCED, detail=f"{count} plugged")

    async def _serve(self, links: Links, reader: asyncio.Task[None]) -> HostError | None:
        """Settle links as they fall due until stopped (None) or the event stream breaks."""
        loop = asyncio.get_running_loop()
        stopping = asyncio.create_task(self.stop.wait())
        try:
            while not self.stop.is_set():
                for name in self.debouncer.pop_due(loop.time()):
                    if self.stop.is_set():
                        return None
                    await self._settle(links, name)
                if reader.done():
                    err = reader.exception()
                    if isinstance(err, HostError):
                        return err
                    if err is not None:
                        raise err
                    return HostError("read link events of", self.netns, None, "stream ended")
                due = self.debouncer.next_due()
                timeout = (
                    NETNS_CHECK if due is None else min(NETNS_CHECK, max(0.0, due - loop.time()))
                )
                self._wake.clear()
                woken = asyncio.create_task(self._wake.wait())
                try:
                    await asyncio.wait(
                        {woken, stopping, reader},
                        timeout=timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    woken.cancel()
                if self._netns_gone():
                    # Holding its sockets would keep a deleted netns (and its links) alive.
                    self.gone = True
                    return None
            return None
        finally:
            stopping.cancel()

    async def _recover(self) -> None:
        """Settle what an interrupted operation (a killed watcher's, say) left in the journal.

        Each operation would do it first anyway; doing it now means the first look at the
        saved NICs sees them as they really are.
        """
        if not self.state.store.journal():
            return
        try:
            await _finish(self.state.recover())
        except (QmpnetError, OSError) as err:
            log.error(
                "watch %s: recovering interrupted operations failed: %s (the next "
                "operation tries again)",
                self.netns,
                err,
            )
            self.emit(WatchEventKind.FAILED, detail=str(err))

    # --- one link ------------------------------------------------------------------------

    async def _settle(self, links: Links, name: str) -> None:
        """Bring one link name in step: plug, unplug, replug or leave it. Errors are reported."""
        try:
            await self._settle_one(links, name)
        except (QmpnetError, OSError) as err:
            self._failed(name, err)
        else:
            self._failures.pop(name, None)

    async def _settle_one(self, links: Links, name: str) -> None:
        present = await links.list()
        by_index = {link.index: link for link in present}
        link = next((x for x in present if x.name == name), None)
        entry = next((e for e in await self._entries() if e.endpoint.name == name), None)
        ignored = None if link is None else ignore_reason(link, by_index)
        attached = (
            entry is not None
            and link is not None
            and await self._attached(links, entry, link, by_index)
        )
        action = plan(link, ignored, entry, attached)
        if action is Action.KEEP:
            assert entry is not None
            self.emit(
                WatchEventKind.KEPT,
                name,
                mac=entry.endpoint.hardware_addr,
                endpoint_id=entry.endpoint.id,
                pci_path=entry.endpoint.pci_path,
            )
        elif action is Action.NOTHING:
            why = "absent" if link is None else ignored or ""
            log.debug("watch %s: %s ignored: %s", self.netns, name, why)
            self.emit(WatchEventKind.IGNORED, name, mac=link.mac if link else "", detail=why)
        if action in (Action.UNPLUG, Action.REPLUG):
            assert entry is not None
            await self._unplug(entry)
        if action in (Action.PLUG, Action.REPLUG):
            assert link is not None
            await self._plug(link)

    async def _attached(
        self, links: Links, entry: Entry, link: LinkInfo, by_index: Mapping[int, LinkInfo]
    ) -> bool:
        pair = entry.endpoint.network_pair
        if entry.status is not Status.PLUGGED or pair is None:
            return False
        with marks.using(self.state.store.mark()):
            tap = await links.lookup(pair.tap_interface.tap_iface.name)
            if tap is None or not ours(tap, pair.tap_interface.id, by_name=True):
                return False
            return await pair_model(pair.model).attached(pair, links, link, by_index)

    async def _plug(self, link: LinkInfo) -> None:
        desc = InterfaceDescription(
            name=link.name, hw_addr=link.mac, mtu=link.mtu, link_type=PLUGGED_KINDS[link.kind]
        )
        log.info("watch %s: plugging %s (mac %s)", self.netns, link.name, link.mac)
        self.emit(WatchEventKind.PLUGGING, link.name, mac=link.mac)
        ep: Endpoint = await _finish(
            self.state.add_interface(
                desc, model=self.model, netns_path=self.netns, queues=self._queues()
            )
        )
        log.info(
            "watch %s: plugged %s as %s at guest PCI path %s",
            self.netns,
            link.name,
            ep.id,
            ep.pci_path,
        )
        self.emit(
            WatchEventKind.PLUGGED,
            link.name,
            mac=ep.hardware_addr,
            endpoint_id=ep.id,
            pci_path=ep.pci_path,
        )

    def _queues(self) -> int:
        """Queue pairs for a new NIC: as configured, except one for the macvtap model.

        A watched link usually goes before its NIC is unplugged, and the kernel then deletes
        the macvtap on it under QEMU's feet; QEMU 7.2 aborts (virtio_net_set_queue_pairs)
        when the guest later resets a multiqueue NIC whose macvtap is gone.
        """
        model = MODELS.get(self.model.resolved())
        return 1 if model is not None and model.dies_with_link else 0

    async def _unplug(self, entry: Entry) -> None:
        ep = entry.endpoint
        log.info(
            "watch %s: unplugging %s (%s, mac %s)", self.netns, ep.name, ep.id, ep.hardware_addr
        )
        self.emit(WatchEventKind.UNPLUGGING, ep.name, mac=ep.hardware_addr, endpoint_id=ep.id)
        # A recovered journal (or another process) may have finished this unplug meanwhile.
        with contextlib.suppress(NoSuchInterfaceError):
            await _finish(self.state.remove_interface(ep.hardware_addr))
        log.info("watch %s: unplugged %s (%s)", self.netns, ep.name, ep.id)
        self.emit(
            WatchEventKind.UNPLUGGED,
            ep.name,
            mac=ep.hardware_addr,
            endpoint_id=ep.id,
            pci_path=ep.pci_path,
        )

    def _failed(self, name: str, err: BaseException) -> None:
        tries = self._failures.get(name, 0) + 1
        self._failures[name] = tries
        again = ""
        if tries <= len(RETRY_DELAYS) and not self.stop.is_set():
            delay = RETRY_DELAYS[tries - 1]
            self.debouncer.touch(name, asyncio.get_running_loop().time(), delay=delay)
            again = f" (retry in {delay:g} s)"
        log.error("watch %s: %s: %s%s", self.netns, name, err, again)
        log.debug("traceback", exc_info=err)
        self.emit(WatchEventKind.FAILED, name, detail=str(err))

    async def unplug_all(self) -> None:
        """Unplug every NIC of this netns (``--unplug-on-exit``); each failure is reported."""
        for entry in await self._entries():
            try:
                await self._unplug(entry)
            except (QmpnetError, OSError) as err:
                self._failed(entry.endpoint.name, err)


async def _finish(coro: Awaitable[T]) -> T:
    """Await one plug or unplug to its end even if the caller is cancelled meanwhile.

    Cutting an operation between two QMP commands would leave its undo to a later
    reconcile; finishing it (or letting it undo itself) keeps the state consistent now.
    The cancellation is delivered once the operation is over.
    """
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


async def watch(
    state: NetworkState,
    netns_path: str,
    *,
    model: InterworkingModel | None = None,
    debounce: float = 0.5,
    stop: asyncio.Event | None = None,
    on_event: OnEvent | None = None,
    unplug_on_exit: bool = False,
) -> None:
    """Keep the VM's NICs in step with the links of ``netns_path`` until ``stop`` is set.

    ``model`` (default: the state's configured model, ``tcfilter`` by default) joins each
    link to its tap; queues and vhost follow the state's config. On stop the action in
    flight is finished and the NICs stay plugged, unless ``unplug_on_exit``. Failures on
    one link are logged, reported as FAILED events and retried a few times; the watcher
    goes on. Raises :class:`InvalidInputError` for a bad model or debounce and
    :class:`~qmpnet.errors.NetnsError` for a netns path that is not one, and
    :class:`InvalidInputError` for qmpnet's own namespace, whatever path names it.
    """
    resolved = (model or state.config.internetworking_model).resolved()
    pair_model(resolved)  # model none (a bare tap) cannot join a link: refuse before watching
    if not netns_path:
        raise InvalidInputError(
            "netns",
            netns_path,
            "give the netns to follow; the host's own namespace is never watched",
        )
    # Before any connection: the host's own namespace holds every other program's links.
    identity = check_sandbox_netns(netns_path)
    watcher = _Watcher(
        state=state,
        netns=netns_path,
        model=resolved,
        stop=stop or asyncio.Event(),
        on_event=on_event,
        debouncer=Debouncer(debounce),
        identity=identity,
    )
    log.info("watch %s: following links (model %s, debounce %g s)", netns_path, resolved, debounce)
    await watcher.run()
    if watcher.gone:
        log.warning(
            "watch %s: the netns was deleted; stopping (its NICs stay plugged until unplugged)",
            netns_path,
        )
    if unplug_on_exit:
        await watcher.unplug_all()
    log.info("watch %s: stopped", netns_path)
    watcher.emit(WatchEventKind.STOPPED, detail="netns gone" if watcher.gone else "")
