"""netns.run_in_netns and Links.open against real namespaces (kernel tier, root)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from qmpnet.errors import NetnsError
from qmpnet.links import Links
from qmpnet.netns import check_netns, netns_exists, run_in_netns

pytestmark = [pytest.mark.kernel]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _my_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.mark.asyncio
async def test_runs_inside_the_namespace(netns: str, host: Any) -> None:
    loop_ns = _my_netns()
    inside = await run_in_netns(netns, _my_netns)
    assert inside == os.stat(netns).st_ino
    assert inside != loop_ns
    assert _my_netns() == loop_ns  # the loop's thread never moved
    # what the callable sees is what `ip -n` sees in that namespace
    names = await run_in_netns(netns, lambda: sorted(n for _, n in socket.if_nameindex()))
    assert names == sorted(host.links(netns)) == ["lo"]


@pytest.mark.asyncio
async def test_empty_path_is_the_current_namespace() -> None:
    assert await run_in_netns("", _my_netns) == _my_netns()


@pytest.mark.asyncio
async def test_errors_of_the_callable_come_back_as_they_are(netns: str) -> None:
    err = KeyError("boom")

    def fail() -> None:
        raise err

    with pytest.raises(KeyError) as caught:
        await run_in_netns(netns, fail)
    assert caught.value is err


@pytest.mark.asyncio
async def test_the_event_loop_keeps_running_meanwhile(netns: str) -> None:
    released = threading.Event()

    def wait_for_loop() -> bool:
        return released.wait(timeout=30)

    async def release() -> None:
        released.set()

    async with asyncio.timeout(30):
        results = await asyncio.gather(run_in_netns(netns, wait_for_loop), release())
    assert results[0] is True


@pytest.mark.asyncio
async def test_missing_path_is_an_error_and_is_not_created(make_netns: Any, tmp_path: Path) -> None:
    existing = make_netns()
    missing = existing + "-absent"
    with pytest.raises(NetnsError) as caught:
        await run_in_netns(missing, _my_netns)
    assert caught.value.obj == missing
    assert not _exists(missing)
    # Links.open is where pyroute2 would silently create it
    with pytest.raises(NetnsError):
        async with Links.open(missing):
            pytest.fail("opened a netns that does not exist")
    assert not _exists(missing)
    assert not netns_exists(missing)
    assert netns_exists(existing)
    with pytest.raises(NetnsError):
        await run_in_netns(str(tmp_path / "nope" / "ns"), _my_netns)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc/hostname", "not a namespace file"),
        ("/proc/self/ns/uts", "not a network namespace"),
    ],
)
async def test_a_file_that_is_not_a_netns_is_refused(path: str, why: str) -> None:
    with pytest.raises(NetnsError, match=why):
        await run_in_netns(path, _my_netns)
    with pytest.raises(NetnsError, match=why):
        check_netns(path)


@pytest.mark.asyncio
async def test_links_open_lists_the_namespaces_links(netns: str, host: Any) -> None:
    async with Links.open(netns) as links:
        names = sorted(link.name for link in await links.list())
        lo = await links.get("lo")
    assert names == sorted(host.links(netns))
    assert lo.index == host.links(netns)["lo"]["ifindex"]
    assert lo.up  # the fixture set it up
