"""Host links through netlink: the only module that speaks pyroute2.

The rest of qmpnet calls typed methods (``links.set_mtu(name, mtu)``), never pyroute2's
string-keyed API. A :class:`Links` is bound to one netns: its netlink socket is made inside
that namespace on a dedicated thread (pyroute2 would otherwise fork a helper, and would create
a missing namespace silently).

Ownership: every link qmpnet creates gets the interface alias the current
:class:`qmpnet.marks.Mark` makes for its owner and name (``qmpnet:<owner>:<tag>``). ``delete``
refuses a link whose alias does not prove it ours (:func:`ours`); a copied alias proves
nothing.

Errors: no pyroute2 exception leaves this module. Every failed netlink call (a kernel error or
a broken socket) is a :class:`HostError` naming the operation, the link and the errno, raised
``from`` the netlink error.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import attrs

from qmpnet import marks, pyroute
from qmpnet.errors import HostError, LinkExistsError, NotOursError, UnsupportedError
from qmpnet.netns import run_in_netns
from qmpnet.poll import poll_until

pyroute.package()  # before the first pyroute2 import: its package __init__ is not needed
from pyroute2.iproute.linux import AsyncIPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

log = logging.getLogger(__name__)

MARK_PREFIX = marks.PREFIX
ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000
#: The preference of qmpnet's mirred filters: how an ingress qdisc is told to be its own.
MIRROR_PRIO = 0x7171
#: The preference of the filter that sends a link's ingress to its shaping ifb.
SHAPE_PRIO = 0x7172
OUR_PRIOS = frozenset({MIRROR_PRIO, SHAPE_PRIO})
#: The handle of qmpnet's root htb (``7171:``), its one class (``7171:1``), and tc's root.
SHAPE_HANDLE = 0x71710000
SHAPE_CLASS = 0x71710001
TC_H_ROOT = 0xFFFFFFFF
NETLINK_ROUTE = 0
#: rtnetlink multicast group of link announcements, and the two message types it carries.
RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
RTM_DELLINK = 17
EVENTS_RCVBUF = 1 << 20


@attrs.frozen(kw_only=True)
class LinkInfo:
    """What netlink says of one link."""

    index: int
    name: str
    mac: str
    mtu: int
    up: bool
    alias: str
    kind: str
    master: int

    @property
    def owner(self) -> str | None:
        """The owner id the alias *claims* (anyone can copy it), or None: no mark at all.

        Good for leaving a link alone; to act on it as ours, :func:`ours` must prove it.
        """
        return marks.claimed_owner(self.alias)


@attrs.frozen(kw_only=True)
class LinkCounters:
    """A link's own counters (IFLA_STATS64), from the host's side: on a tap QEMU reads, ``rx``
    is what the guest sent and ``tx`` what it was given."""

    rx_packets: int
    rx_bytes: int
    rx_dropped: int
    rx_errors: int
    tx_packets: int
    tx_bytes: int
    tx_dropped: int
    tx_errors: int


def _counters(msg: Any) -> LinkCounters:
    stats = msg.get("stats64")
    fields = [f.name for f in attrs.fields(LinkCounters)]
    return LinkCounters(**{f: int(stats.get(f) or 0) if stats else 0 for f in fields})


@attrs.frozen(kw_only=True)
class LinkEvent:
    """A link appeared or changed (``present``) or went away, as netlink announced it."""

    present: bool
    link: LinkInfo


#: What a failed netlink call raises: the kernel's answer, or the socket's own error.
_FAILURES = (NetlinkError, OSError)


def _errno(err: NetlinkError | OSError) -> int | None:
    return err.code if isinstance(err, NetlinkError) else err.errno


def mark(owner: str, name: str) -> str:
    """The alias of ``owner``'s link ``name`` under the current mark."""
    return marks.current().of(owner, name)


def ours(link: LinkInfo, owner: str | None = None, *, by_name: bool = False) -> bool:
    """Whether ``link`` is proven ``owner``'s (None: the owner its alias claims).

    The one check of ownership: ``by_name`` when the link was looked up by the name the
    owner's record gives (an inherited untagged mark counts then, see :mod:`qmpnet.marks`).
    """
    who = owner if owner is not None else link.owner
    return who is not None and marks.current().proves(link.alias, link.name, who, by_name=by_name)


def _info(msg: Any) -> LinkInfo:
    return LinkInfo(
        index=msg["index"],
        name=msg.get("ifname"),
        mac=msg.get("address") or "",
        mtu=msg.get("mtu") or 0,
        up=bool(msg["flags"] & 1),
        alias=msg.get("ifalias") or "",
        kind=msg.get(("linkinfo", "kind")) or "",
        master=msg.get("master") or 0,
    )


def staging_name(owner: str) -> str | None:
    """The name a link of ``owner`` carries until it is marked (None: no such name)."""
    return owner if re.fullmatch(r"qn[0-9a-f]{10}", owner) else None


class Links:
    """Typed netlink operations in one network namespace; use :meth:`open`."""

    def __init__(self, ipr: AsyncIPRoute, netns: str) -> None:
        self._ipr = ipr
        self.netns = netns

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        netns: str = "",
        *,
        link_events: bool = False,
    ) -> AsyncIterator[Links]:
        """Links of ``netns``; ``link_events`` also subscribes to :meth:`events`."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
            if link_events:
                # A burst (a pod with many links) must not overrun the default buffer.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENTS_RCVBUF)
                sock.bind((0, RTMGRP_LINK))  # port 0: the kernel picks a free one
            return sock

        where = netns or "the host netns"
        try:
            # A socket of this namespace needs no thread: socket() does not block.
            sock = await run_in_netns(netns, make) if netns else make()
        except OSError as err:
            raise HostError("open a netlink socket in", where, err.errno) from err
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(sock.close)
            try:
                ipr = await stack.enter_async_context(AsyncIPRoute(use_socket=sock))
            except _FAILURES as err:
                raise HostError("open netlink in", where, _errno(err)) from err
            yield cls(ipr, netns)

    def _where(self, name: str) -> str:
        return f"{name} (netns {self.netns})" if self.netns else name

    async def _call(self, operation: str, name: str, coro: Any) -> Any:
        try:
            return await coro
        except _FAILURES as err:
            raise HostError(operation, self._where(name), _errno(err)) from err

    async def _dump(self, operation: str, name: str, request: Any) -> list[Any]:
        """All messages of a dump request; drained, or the socket's next request fails."""
        try:
            return [msg async for msg in await request]
        except _FAILURES as err:
            raise HostError(operation, self._where(name), _errno(err)) from err

    # --- reading ---------------------------------------------------------------------------

    async def lookup(self, name: str) -> LinkInfo | None:
        msg = await self._get(name)
        return _info(msg) if msg is not None else None

    async def counters(self, name: str) -> LinkCounters | None:
        """The link's counters, None when there is no such link."""
        msg = await self._get(name)
        return _counters(msg) if msg is not None else None

    async def _get(self, name: str) -> Any:
        try:
            # One RTM_GETLINK by name, not a filtered dump of every link (4x faster). The
            # reply is drained: a half-read one makes the socket's next request fail with
            # EBUSY (pyroute2 0.9).
            reply = await self._ipr.link("get", ifname=name)
            found = [msg async for msg in reply] if hasattr(reply, "__aiter__") else list(reply)
        except _FAILURES as err:
            if _errno(err) in (errno.ENODEV, errno.ENOENT):
                return None
            raise HostError("look up link", self._where(name), _errno(err)) from err
        return found[0] if found else None

    async def get(self, name: str) -> LinkInfo:
        info = await self.lookup(name)
        if info is None:
            raise HostError("look up link", self._where(name), errno.ENODEV)
        return info

    async def list(self) -> list[LinkInfo]:
        return [_info(msg) for msg in await self._dump("list", "links", self._ipr.get_links())]

    async def events(self) -> AsyncIterator[LinkEvent]:
        """Link announcements as the kernel sends them; needs ``open(link_events=True)``.

        Endless. An overrun socket buffer (events lost) or a broken socket raises
        :class:`HostError`: reopen and re-read the links, the stream cannot resume.
        """
        while True:
            try:
                async for msg in self._ipr.get():
                    kind = msg["header"]["type"]
                    if kind in (RTM_NEWLINK, RTM_DELLINK):
                        yield LinkEvent(present=kind == RTM_NEWLINK, link=_info(msg))
            except _FAILURES as err:
                raise HostError(
                    "read link events of", self.netns or "the host netns", _errno(err)
                ) from err

    async def wait_for(self, name: str, present: bool = True, timeout: float = 5.0) -> None:
        """Poll until the link is (or is no longer) visible; a netlink change may lag a syscall."""

        async def settled() -> bool:
            return (await self.lookup(name) is not None) == present

        def still() -> HostError:
            return HostError(
                "wait for link",
                self._where(name),
                None,
                f"still {'missing' if present else 'present'} after {timeout} s",
            )

        await poll_until(settled, timeout=timeout, interval=0.001, cap=0.05, error=still)

    # --- changing a link -------------------------------------------------------------------

    async def configure(
        self,
        name: str,
        *,
        mtu: int | None = None,
        mac: str | None = None,
        up: bool | None = None,
        owner: str | None = None,
        marked_as: str | None = None,
    ) -> None:
        """Set MTU, MAC, alias mark and state, in that order, in one place.

        ``marked_as``: the name the mark is made for, when the link is renamed to it later.
        """
        index = (await self.get(name)).index
        attrs_: dict[str, Any] = {}
        if mtu is not None:
            attrs_["mtu"] = mtu
        if mac:
            attrs_["address"] = mac
        if owner is not None:
            attrs_["ifalias"] = mark(owner, marked_as or name)
        if up is not None:
            # One message: the kernel applies the flags after MTU, MAC and alias.
            attrs_["state"] = "up" if up else "down"
        if attrs_:
            await self._call("configure link", name, self._ipr.link("set", index=index, **attrs_))

    async def set_mtu(self, name: str, mtu: int) -> None:
        await self.configure(name, mtu=mtu)

    async def set_mac(self, name: str, mac: str) -> None:
        await self.configure(name, mac=mac)

    async def set_up(self, name: str, up: bool = True) -> None:
        await self.configure(name, up=up)

    async def mark_ours(self, name: str, owner: str, marked_as: str | None = None) -> None:
        await self.configure(name, owner=owner, marked_as=marked_as)

    async def set_master(self, name: str, master: str | None) -> None:
        index = (await self.get(name)).index
        master_index = (await self.get(master)).index if master else 0
        await self._call(
            "set master of", name, self._ipr.link("set", index=index, master=master_index)
        )

    # --- creating and deleting -------------------------------------------------------------

    async def _refuse_existing(self, name: str) -> None:
        if await self.lookup(name) is not None:
            raise LinkExistsError(self._where(name))

    async def add_macvtap(self, name: str, parent: str, mac: str, owner: str) -> LinkInfo:
        """A bridge-mode macvtap on ``parent`` carrying ``mac``, marked as ours."""
        parent_index = (await self.get(parent)).index
        return await self._create(
            "macvtap",
            name,
            owner,
            kind="macvtap",
            link=parent_index,
            macvtap_mode="bridge",
            address=mac,
        )

    async def add_bridge(self, name: str, owner: str, mtu: int | None = None) -> LinkInfo:
        extra: dict[str, Any] = {"mtu": mtu} if mtu else {}
        return await self._create("bridge", name, owner, kind="bridge", **extra)

    async def add_veth(self, name: str, peer: str, owner: str) -> LinkInfo:
        return await self._create("veth", name, owner, kind="veth", peer={"ifname": peer})

    async def _create(self, what: str, name: str, owner: str, **spec: Any) -> LinkInfo:
        """Create a link that outlives this process, never unmarked under its own name.

        The kernel ignores an alias in the create request, so marking takes a second call;
        a crash between the two would leave an unmarked link nobody may delete. The link is
        therefore made under a staging name (the owner's id when it is a valid link name:
        ``qn`` + 10 hex digits, which no one else uses), marked, then renamed while down.
        A reconcile deletes a link that still carries the staging name.
        """
        await self._refuse_existing(name)
        staging = staging_name(owner) or name
        await self._call(f"create {what}", name, self._ipr.link("add", ifname=staging, **spec))
        info = await self._mark_new(staging, owner, name)
        if staging != name:
            try:
                await self._call(
                    f"rename {what}", name, self._ipr.link("set", index=info.index, ifname=name)
                )
            except HostError:
                with contextlib.suppress(*_FAILURES):
                    await self._ipr.link("del", index=info.index)
                raise
        return await self.get(name)

    async def delete_staged(self, owner: str) -> bool:
        """Delete ``owner``'s link left under its staging name (a crash before the mark)."""
        name = staging_name(owner)
        info = await self.lookup(name) if name else None
        if info is None:
            return False
        try:
            await self._ipr.link("del", index=info.index)
        except _FAILURES as err:
            if _errno(err) == errno.ENODEV:
                return False
            raise HostError("delete link", self._where(info.name), _errno(err)) from err
        return True

    async def _mark_new(self, name: str, owner: str, final: str) -> LinkInfo:
        """Mark a link just created (for its ``final`` name); one that cannot be is deleted."""
        try:
            await self.mark_ours(name, owner, final)
        except HostError:
            info = await self.lookup(name)
            if info is not None:
                with contextlib.suppress(*_FAILURES):
                    await self._ipr.link("del", index=info.index)
            raise
        return await self.get(name)

    async def delete(self, name: str, owner: str | None = None) -> bool:
        """Delete a link qmpnet made (optionally: made for ``owner``); False if already gone."""
        info = await self.lookup(name)
        if info is None:
            return False
        if not ours(info, owner, by_name=owner is not None):
            raise NotOursError("delete link", self._where(name))
        try:
            await self._ipr.link("del", index=info.index)
        except _FAILURES as err:
            if _errno(err) == errno.ENODEV:
                return False
            raise HostError("delete link", self._where(name), _errno(err)) from err
        return True

    # --- tc mirroring (the tcfilter model) -------------------------------------------------

    async def add_tc_mirror(self, a: str, b: str) -> None:
        """Redirect everything arriving on ``a`` out of ``b`` and the reverse."""
        ia, ib = (await self.get(a)).index, (await self.get(b)).index
        added: list[int] = []
        try:
            for src, dst, name in ((ia, ib, a), (ib, ia, b)):
                await self._call(
                    "add ingress qdisc on", name, self._ipr.tc("add", "ingress", src, INGRESS)
                )
                added.append(src)
                await self._redirect(name, src, dst, MIRROR_PRIO)
        except HostError:
            # Half a mirror is worse than none: take back the qdiscs made here (and only them).
            for index in added:
                with contextlib.suppress(*_FAILURES):
                    await self._ipr.tc("del", "ingress", index, INGRESS)
            raise

    async def _redirect(self, name: str, src: int, dst: int, prio: int) -> None:
        """A u32 match-all filter on ``src``'s ingress sending every frame out of ``dst``
        (this kernel has no ``matchall``); ``prio`` says which of qmpnet's it is."""
        await self._call(
            "add mirred filter on",
            name,
            self._ipr.tc(
                "add-filter",
                "u32",
                src,
                ":1",
                parent=INGRESS,
                protocol=ETH_P_ALL,
                prio=prio,
                target=0x10000,
                keys=["0x0/0x0+0"],
                action={
                    "kind": "mirred",
                    "direction": "egress",
                    "action": "redirect",
                    "ifindex": dst,
                },
            ),
        )

    async def del_tc_ingress(self, name: str) -> None:
        """Remove our ingress qdisc (and with it our filters); absent link or qdisc is fine.

        An ingress qdisc with a filter qmpnet did not make, or none at all, is someone
        else's: it is left as it is.
        """
        info = await self.lookup(name)
        if info is None or not await self.has_tc_ingress(name):
            return
        if not await self.tc_ingress_ours(name):
            log.warning(
                "%s: the ingress qdisc holds filters qmpnet did not make; left as is",
                self._where(name),
            )
            return
        try:
            await self._ipr.tc("del", "ingress", info.index, INGRESS)
        except _FAILURES as err:
            if _errno(err) not in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                raise HostError("delete ingress qdisc on", self._where(name), _errno(err)) from err

    async def tc_ingress_ours(self, name: str) -> bool:
        """Whether the ingress qdisc of ``name`` holds qmpnet's mirred filters and only those."""
        info = await self.get(name)
        filters = await self._dump(
            "list filters of", name, self._ipr.get_filters(index=info.index, parent=INGRESS)
        )
        return bool(filters) and all(f["info"] >> 16 in OUR_PRIOS for f in filters)

    async def has_tc_ingress(self, name: str) -> bool:
        info = await self.get(name)
        qdiscs = await self._dump("list qdiscs of", name, self._ipr.get_qdiscs(index=info.index))
        return any(q.get("kind") == "ingress" for q in qdiscs)

    # --- shaping (a NIC's bandwidth) -------------------------------------------------------

    async def root_qdisc(self, name: str) -> tuple[str, int]:
        """The kind and handle of ``name``'s root qdisc; handle 0 is the kernel's default."""
        info = await self.get(name)
        qdiscs = await self._dump("list qdiscs of", name, self._ipr.get_qdiscs(index=info.index))
        for q in qdiscs:
            if q["parent"] == TC_H_ROOT:
                return str(q.get("kind")), int(q["handle"])
        return "", 0

    async def shaped(self, name: str) -> bool:
        """Whether ``name``'s egress is shaped by qmpnet (its root is our htb)."""
        return (await self.root_qdisc(name)) == ("htb", SHAPE_HANDLE)

    async def shape_egress(self, name: str, *, rate: int, ceil: int, burst: int) -> None:
        """Shape what leaves ``name`` to ``rate`` bytes/s (bursts of ``burst`` bytes up to
        ``ceil``): an htb root ``7171:`` whose one class takes everything.

        Our htb already there is changed in place (no unshaped moment); the kernel's default
        root is replaced; any other root qdisc is someone else's, and is left as it is.
        """
        info = await self.get(name)
        kind, handle = await self.root_qdisc(name)
        spec: dict[str, Any] = {
            "parent": SHAPE_HANDLE,
            "rate": rate,
            "ceil": ceil,
            "burst": burst,
            "cburst": burst,
            # htb's default (rate / 10) warns past 200000 bytes; one class needs no fairness
            "quantum": min(max(rate // 10, 2 * 1514), 200_000),
        }
        if (kind, handle) == ("htb", SHAPE_HANDLE):
            await self._call(
                "change htb class on",
                name,
                self._ipr.tc("change-class", "htb", info.index, SHAPE_CLASS, **spec),
            )
            return
        if handle:
            raise UnsupportedError(
                self._where(name),
                "shape",
                f"the link has a root qdisc qmpnet did not make ({kind} {handle >> 16:x}:): "
                "it is left as it is",
            )
        await self._call(
            "add htb qdisc on",
            name,
            self._ipr.tc("add", "htb", info.index, SHAPE_HANDLE, default=1),
        )
        try:
            await self._call(
                "add htb class on",
                name,
                self._ipr.tc("add-class", "htb", info.index, SHAPE_CLASS, **spec),
            )
        except HostError:
            with contextlib.suppress(*_FAILURES):
                await self._ipr.tc("del", "htb", info.index, SHAPE_HANDLE)
            raise

    async def unshape_egress(self, name: str) -> bool:
        """Remove our htb from ``name`` (the kernel's default comes back); False if none."""
        info = await self.lookup(name)
        if info is None or not await self.shaped(name):
            return False
        try:
            await self._ipr.tc("del", "htb", info.index, SHAPE_HANDLE)
        except _FAILURES as err:
            if _errno(err) in (errno.EINVAL, errno.ENOENT, errno.ENODEV):
                return False
            raise HostError("delete htb qdisc on", self._where(name), _errno(err)) from err
        return True

    async def add_ifb(self, name: str, owner: str) -> LinkInfo:
        """An ifb of ours, up: what a link's ingress is redirected to, to be shaped there."""
        await self._create("ifb", name, owner, kind="ifb")
        await self.set_up(name)
        return await self.get(name)

    async def redirect_ingress(self, name: str, to: str) -> None:
        """Send everything arriving on ``name`` out of ``to`` (an ifb, which re-injects it
        into ``name``'s receive path past the filter once shaped)."""
        src, dst = (await self.get(name)).index, (await self.get(to)).index
        if await self.has_tc_ingress(name):
            raise UnsupportedError(
                self._where(name),
                "shape",
                "the link already has an ingress qdisc: it is left as it is",
            )
        await self._call("add ingress qdisc on", name, self._ipr.tc("add", "ingress", src, INGRESS))
        try:
            await self._redirect(name, src, dst, SHAPE_PRIO)
        except HostError:
            with contextlib.suppress(*_FAILURES):
                await self._ipr.tc("del", "ingress", src, INGRESS)
            raise

    async def redirected(self, name: str) -> bool:
        """Whether ``name``'s ingress goes to a shaping ifb of qmpnet's."""
        info = await self.get(name)
        if not await self.has_tc_ingress(name):
            return False
        filters = await self._dump(
            "list filters of", name, self._ipr.get_filters(index=info.index, parent=INGRESS)
        )
        return any(f["info"] >> 16 == SHAPE_PRIO for f in filters)

    # --- a guest's receive filter (trusted, on a macvtap) -----------------------------------

    async def mirror_rx_filter(
        self, name: str, *, promisc: bool, allmulti: bool, multicast: Collection[str]
    ) -> None:
        """Make ``name`` pass what a guest's filter asks: promiscuity, all multicast, and
        exactly ``multicast`` among the link-layer groups added from user space (the kernel's
        own, for its addresses, are left alone). A macvtap passes a group's frames only when
        the group is on its list."""
        await self.get(name)  # a missing link is a HostError naming it
        try:
            await run_in_netns(
                self.netns, lambda: _mirror(name, promisc, allmulti, {m.lower() for m in multicast})
            )
        except OSError as err:
            raise HostError("set the receive filter of", self._where(name), err.errno) from err

    async def rx_view(self, name: str) -> tuple[bool, bool, frozenset[str]]:
        """(promiscuous, all multicast, the user-added groups) of ``name``, as set."""
        await self.get(name)
        try:
            return await run_in_netns(self.netns, lambda: _rx_view(name))
        except OSError as err:
            raise HostError("read the receive filter of", self._where(name), err.errno) from err


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCADDMULTI = 0x8931
SIOCDELMULTI = 0x8932
IFF_PROMISC = 0x100
IFF_ALLMULTI = 0x200
_IFREQ = 40  # sizeof(struct ifreq) on 64-bit Linux


def _ifreq(name: str, tail: bytes) -> bytes:
    return struct.pack("16s", name.encode()) + tail.ljust(_IFREQ - 16, b"\0")


def _groups(name: str) -> frozenset[str]:
    """The groups added from user space (``global`` use > 0), from this thread's netns."""
    found = set()
    with open("/proc/thread-self/net/dev_mcast", encoding="ascii") as fh:
        for line in fh:
            _, ifname, _, user, addr = line.split()
            if ifname == name and int(user) > 0:
                found.add(":".join(addr[i : i + 2] for i in range(0, 12, 2)))
    return frozenset(found)


def _rx_view(name: str) -> tuple[bool, bool, frozenset[str]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        (flags,) = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name, b"")), 16)
    return bool(flags & IFF_PROMISC), bool(flags & IFF_ALLMULTI), _groups(name)


def _mirror(name: str, promisc: bool, allmulti: bool, multicast: set[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        (flags,) = struct.unpack_from("H", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name, b"")), 16)
        want = flags & ~(IFF_PROMISC | IFF_ALLMULTI)
        want |= (IFF_PROMISC if promisc else 0) | (IFF_ALLMULTI if allmulti else 0)
        if want != flags:
            fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", want)))
        have = _groups(name)
        for group, request in [(g, SIOCADDMULTI) for g in sorted(multicast - have)] + [
            (g, SIOCDELMULTI) for g in sorted(have - multicast)
        ]:
            hwaddr = struct.pack("H", 0) + bytes.fromhex(group.replace(":", ""))
            fcntl.ioctl(s, request, _ifreq(name, hwaddr))
