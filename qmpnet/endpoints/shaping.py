"""A NIC's bandwidth on the host: where each direction is shaped, and making it so.

What the guest receives leaves some host link toward QEMU, and what it sends arrives on one
from QEMU. A direction is shaped with an htb on the egress of the link the traffic leaves by
(:class:`Site` ``ifb=False``), or, where the traffic only *arrives* on a link (a tap's ingress
going into the host's stack or a bridge), by redirecting that link's ingress to an ifb of the
NIC's own and shaping the ifb's egress, which re-injects the frames where they were going.
This kernel has no ``police`` action and no ``matchall`` filter, so ingress cannot be shaped
in place. Each interworking model says where its two sites are (``PairModel.shape_sites``).

:func:`apply` makes the host's shaping what a :class:`~qmpnet.bandwidth.Bandwidth` says, from
any starting point, so one function serves the plug, a live change, clearing and teardown.
"""

from __future__ import annotations

import logging

import attrs

from qmpnet.bandwidth import Bandwidth, Rate
from qmpnet.errors import NotOursError
from qmpnet.lifecycle import Operation, Step
from qmpnet.links import Links, ours

log = logging.getLogger(__name__)

NONE = Bandwidth()


@attrs.frozen
class Site:
    """Where one direction is shaped: ``link``'s egress, or its ingress through the ifb."""

    link: str
    ifb: bool = False


@attrs.frozen(kw_only=True)
class Sites:
    """A NIC's two sites, in its host links' netns; ``owner`` (the NIC's id) marks the ifb."""

    netns: str
    owner: str
    inbound: Site
    outbound: Site

    @property
    def ifb(self) -> str:
        """The NIC's ifb: ``qi`` and the id's 10 hex digits (ids are ``qn`` + 10 hex)."""
        return "qi" + self.owner[2:]


async def apply(sites: Sites, bandwidth: Bandwidth | None) -> None:
    """Shape the NIC's traffic as ``bandwidth`` says (None or empty: not at all). Idempotent;
    a link that is gone has nothing to remove."""
    want = bandwidth or NONE
    async with Links.open(sites.netns) as links:
        for site, rate in ((sites.inbound, want.inbound), (sites.outbound, want.outbound)):
            if site.ifb:
                await _through_ifb(links, sites, site, rate)
            elif rate is not None:
                await links.shape_egress(site.link, **_htb(rate))
            else:
                await links.unshape_egress(site.link)


async def _through_ifb(links: Links, sites: Sites, site: Site, rate: Rate | None) -> None:
    ifb = await links.lookup(sites.ifb)
    if ifb is not None and not ours(ifb, sites.owner):
        raise NotOursError("shape through", sites.ifb)
    if rate is None:
        if await links.lookup(site.link) is not None and await links.redirected(site.link):
            await links.del_tc_ingress(site.link)
        if ifb is not None:
            await links.delete(sites.ifb, owner=sites.owner)
        return
    if ifb is None:
        await links.add_ifb(sites.ifb, sites.owner)
    await links.shape_egress(sites.ifb, **_htb(rate))
    if not await links.redirected(site.link):
        await links.redirect_ingress(site.link, sites.ifb)


def _htb(rate: Rate) -> dict[str, int]:
    return {"rate": rate.average, "ceil": rate.ceil, "burst": rate.buffer}


async def shape(op: Operation, sites: Sites, bandwidth: Bandwidth | None) -> None:
    """The plug's step: shape before QEMU gets the NIC, so no frame passes unshaped; its
    undo (registered first) takes every bit of it away."""
    if not bandwidth:
        return
    await op.step(Step.SHAPE, lambda: apply(sites, bandwidth), lambda _: apply(sites, None))


async def change(sites: Sites, old: Bandwidth | None, new: Bandwidth | None) -> None:
    """A live change from ``old`` to ``new``, all or nothing: on failure ``old`` is put back."""
    try:
        await apply(sites, new)
    except BaseException:
        try:
            await apply(sites, old)
        except Exception as err:  # the first error is the one to tell
            log.error("putting the bandwidth of %s back: %s", sites.owner, err)
        raise


async def residue(links: Links, sites: Sites) -> list[str]:
    """What shaping of the NIC stays on links that are not its own (the sandbox's link): the
    NIC's own links and ifb go with their marks."""
    problems = []
    for site in (sites.inbound, sites.outbound):
        info = await links.lookup(site.link)
        if info is None or ours(info, sites.owner):
            continue
        if await links.shaped(site.link):
            problems.append(f"{site.link} still has qmpnet's htb")
        if site.ifb and await links.redirected(site.link):
            problems.append(f"{site.link} still sends its ingress to {sites.ifb}")
    return problems
