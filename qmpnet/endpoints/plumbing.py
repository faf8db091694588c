"""Host-side steps shared by the endpoint types: open a tap's queues, open vhost fds, plug.

Each function runs one named step of the caller's operation and registers its undo, so an
endpoint module only states *which* steps it needs, in which order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from qmpnet import tuntap
from qmpnet.endpoints.base import PlugContext
from qmpnet.errors import QmpnetError
from qmpnet.lifecycle import Step
from qmpnet.links import Links
from qmpnet.netns import run_in_netns

log = logging.getLogger(__name__)


async def open_tap(ctx: PlugContext, netns: str, name: str, queues: int,
                   fds: tuntap.QueueFds) -> None:
    """Create tap ``name`` with its queues in ``netns``; undo closes them (the tap goes too)."""
    async def action() -> None:
        fds.tap.extend(await run_in_netns(netns, lambda: tuntap.open_tap_queues(name, queues),
                                          on_abandon=tuntap.close_all))

    async def undo(_: None) -> None:
        fds.close()

    await ctx.op.step(Step.OPEN_QUEUES, action, undo)


async def open_macvtap(ctx: PlugContext, netns: str, name: str, queues: int,
                       fds: tuntap.QueueFds) -> None:
    async def action() -> None:
        fds.tap.extend(await run_in_netns(
            netns, lambda: tuntap.open_macvtap_queues(name, queues), on_abandon=tuntap.close_all))

    async def undo(_: None) -> None:
        fds.close()

    await ctx.op.step(Step.OPEN_QUEUES, action, undo)


async def open_vhost(ctx: PlugContext, queues: int, fds: tuntap.QueueFds) -> None:
    """vhost-net fds when the host has the device and they are not disabled."""
    if not tuntap.vhost_available(ctx.config.disable_vhost_net):
        return

    async def action() -> None:
        fds.vhost.extend(tuntap.open_vhost_fds(queues))

    async def undo(_: None) -> None:
        fds.close()

    await ctx.op.step(Step.OPEN_VHOST, action, undo)


async def configure_tap(ctx: PlugContext, netns: str, name: str, owner: str, mtu: int) -> None:
    """Mark the new tap as ours, set its MTU and bring it up."""
    async def action() -> None:
        async with Links.open(netns) as links:
            await links.configure(name, mtu=mtu, owner=owner, up=True)

    await ctx.op.step(Step.PREPARE_LINKS, action)


async def best_effort(what: str, action: Callable[[], Awaitable[object]]) -> None:
    """Run a cleanup whose failure must not stop an unplug: log it and go on."""
    try:
        await action()
    except QmpnetError as err:
        log.warning("%s failed (unplug goes on): %s", what, err)
