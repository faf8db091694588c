"""Host-side steps shared by the endpoint types: open a tap's queues, open vhost fds, plug.

Each function runs one named step of the caller's operation and registers its undo, so an
endpoint module only states *which* steps it needs, in which order. :func:`plug_queues` is the
one hot-plug body every tap-backed endpoint shares.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from qmpnet import tuntap
from qmpnet.config import Config
from qmpnet.endpoints import shaping
from qmpnet.endpoints.base import PlugContext
from qmpnet.errors import NotOursError, QmpnetError
from qmpnet.lifecycle import Operation, Step
from qmpnet.links import Links, ours
from qmpnet.model import TapInterface
from qmpnet.netns import run_in_netns

log = logging.getLogger(__name__)

#: Opens the host side of a NIC with ``queues`` queue fds into ``fds`` (each step undoable).
OpenHost = Callable[[int, tuntap.QueueFds], Awaitable[None]]


async def plug_queues(  # noqa: PLR0917 - each is one thing a plug is made of
    ctx: PlugContext,
    tap: TapInterface,
    mac: str,
    requested: int,
    open_host: OpenHost,
    mtu: int,
    sites: shaping.Sites,
) -> tuple[str, int]:
    """Open the host side and its queues, shape it, add vhost fds, plug into QEMU:
    (PCI path, queues).

    ``mtu`` is the host link's: the NIC offers it to the guest (``host_mtu``), so the guest's
    driver takes it. ``sites`` are where the context's bandwidth is shaped. The fds are closed
    here in every case: QEMU holds its own copies once the plug is done, and an undone plug
    must not keep a tap alive.
    """
    queues = await ctx.queues(requested)
    fds = tuntap.QueueFds()
    try:
        await open_host(queues, fds)
        await shaping.shape(ctx.op, sites, ctx.bandwidth)
        await open_vhost(ctx.op, ctx.config, queues, fds)
        pci_path = await ctx.hypervisor.plug_tap(
            tap,
            fds,
            mac,
            ctx.op,
            wait_guest=ctx.wait_guest,
            link_up=ctx.link_up,
            announce=ctx.config.announce,
            mtu=mtu,
        )
    finally:
        fds.close()
    return pci_path, queues


async def set_links_mtu(netns: str, names: Sequence[str], owner: str, mtu: int) -> None:
    """Set the MTU of qmpnet's links ``names`` (in that order), all or nothing; each must
    carry ``owner``'s mark, and one that does not is refused before any is changed."""
    async with Links.open(netns) as links:
        before: dict[str, int] = {}
        for name in names:
            info = await links.get(name)
            if not ours(info, owner):
                raise NotOursError("set the MTU of", name)
            before[name] = info.mtu
        done: list[str] = []
        try:
            for name in names:
                await links.set_mtu(name, mtu)
                done.append(name)
        except BaseException:
            for name in reversed(done):  # what was changed goes back, in the reverse order
                try:
                    await links.set_mtu(name, before[name])
                except QmpnetError as err:
                    log.error("giving %s its MTU %d back: %s", name, before[name], err)
            raise


async def open_tap(op: Operation, netns: str, name: str, queues: int, fds: tuntap.QueueFds) -> None:
    """Create tap ``name`` with its queues in ``netns``; undo closes them (the tap goes too)."""

    async def action() -> None:
        fds.tap.extend(
            await run_in_netns(
                netns, lambda: tuntap.open_tap_queues(name, queues), on_abandon=tuntap.close_all
            )
        )

    async def undo(_: None) -> None:
        fds.close()

    await op.step(Step.OPEN_QUEUES, action, undo)


async def open_macvtap(
    op: Operation, netns: str, name: str, queues: int, fds: tuntap.QueueFds
) -> None:
    async def action() -> None:
        fds.tap.extend(
            await run_in_netns(
                netns, lambda: tuntap.open_macvtap_queues(name, queues), on_abandon=tuntap.close_all
            )
        )

    async def undo(_: None) -> None:
        fds.close()

    await op.step(Step.OPEN_QUEUES, action, undo)


async def open_vhost(op: Operation, config: Config, queues: int, fds: tuntap.QueueFds) -> None:
    """vhost-net fds when the host has the device and they are not disabled."""
    if not tuntap.vhost_available(config.disable_vhost_net):
        return

    async def action() -> None:
        fds.vhost.extend(tuntap.open_vhost_fds(queues))

    async def undo(_: None) -> None:
        fds.close()

    await op.step(Step.OPEN_VHOST, action, undo)


async def configure_tap(op: Operation, netns: str, name: str, owner: str, mtu: int) -> None:
    """Mark the new tap as ours, set its MTU and bring it up."""

    async def action() -> None:
        async with Links.open(netns) as links:
            await links.configure(name, mtu=mtu, owner=owner, up=True)

    await op.step(Step.PREPARE_LINKS, action)


async def unshape(sites: shaping.Sites | None) -> None:
    """Teardown's part: no shaping of the NIC left (its ifb, an htb on a link not its own)."""
    if sites is not None:
        await best_effort(
            f"removing the shaping of {sites.owner}", lambda: shaping.apply(sites, None)
        )


async def best_effort(what: str, action: Callable[[], Awaitable[object]]) -> None:
    """Run a cleanup whose failure must not stop an unplug: log it and go on."""
    try:
        await action()
    except QmpnetError as err:
        log.warning("%s failed (unplug goes on): %s", what, err)
