"""Two processes hot-plugging into one VM at the same moment are serialized by the file lock.

Each driver process connects per operation (the QMP monitor serves one client at a time) and
holds the VM's lock from reading the state to writing it. Both are released by one file at
once. Both must succeed, on different slots, with different tap names, and the state must list
both; their operations must not overlap in time; the guest must see both NICs. The same for
two concurrent removals.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crash_driver import command

from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.probe import has_ingress, qemu_view, saved_ids
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.scene import make_sandbox
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

MACS = ("52:54:00:00:06:61", "52:54:00:00:06:62")


vm = module_vm("cc")


async def _both(go: Path, runs: list[list[str]]) -> list[dict[str, Any]]:
    """Start the drivers, release them at once with ``go``, and return their results."""
    procs = [
        await asyncio.create_subprocess_exec(
            *command(*args, "--go", str(go)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for args in runs
    ]
    await asyncio.sleep(1.0)  # both are waiting for the file now (imports done)
    await asyncio.to_thread(go.write_text, "go")
    results = []
    for proc in procs:
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    await asyncio.to_thread(go.unlink)
    return results


def _disjoint(results: list[dict[str, Any]]) -> None:
    (a0, a1), (b0, b1) = (r["span"] for r in results)
    assert a1 < b0 or b1 < a0, f"operations overlapped: {results}"


async def test_two_processes_plug_and_unplug_at_once(
    vm: GuestVM, make_netns: Callable[[], str], tmp_path: Path
) -> None:
    netns = make_netns()
    for i, mac in enumerate(MACS, start=1):
        make_sandbox(netns, f"eth{i}", mac)
    state_dir = tmp_path / "state"
    base = [
        "--qmp",
        str(vm.mgmt_qmp_path),
        "--state",
        str(state_dir),
        "--netns",
        netns,
        "--queues",
        "2",
    ]
    cursor = vm.console_cursor()

    added = await _both(
        tmp_path / "go",
        [
            ["add", *base, "--name", f"eth{i}", "--mac", mac, "--wait-guest"]
            for i, mac in enumerate(MACS, start=1)
        ],
    )
    assert all(r["ok"] for r in added), added
    _disjoint(added)
    ids = {r["id"] for r in added}
    assert len(ids) == 2
    assert len({r["pci_path"] for r in added}) == 2, "no slot collision"
    assert saved_ids(state_dir) == dict.fromkeys(ids, "plugged"), "state lists both"
    view = await qemu_view(vm.qmp_path)
    assert {f"{i}-dev" for i in ids} <= view.devices
    assert {f"{i}-net" for i in ids} <= view.netdevs
    inside = ip_links(netns)
    taps = {n for n, v in inside.items() if str(v.get("ifalias", "")).startswith("qmpnet:")}
    assert len(taps) == 2, f"one tap each, different names: {taps}"
    assert has_ingress(netns, "eth1")
    assert has_ingress(netns, "eth2")
    for mac in MACS:
        await vm.wait_for(rf"QMPNET NIC-ADD .*mac={mac}", 60, since=cursor)

    cursor = vm.console_cursor()
    removed = await _both(tmp_path / "go", [["remove", *base, "--mac", mac] for mac in MACS])
    assert all(r["ok"] for r in removed), removed
    _disjoint(removed)
    assert saved_ids(state_dir) == {}
    view = await qemu_view(vm.qmp_path)
    assert not any(view.has_any_of(i) for i in ids)
    assert set(ip_links(netns)) == {"lo", "eth1", "eth1p", "eth2", "eth2p"}
    for mac in MACS:
        await vm.wait_for(rf"QMPNET NIC-DEL .*mac={mac}", 60, since=cursor)
