"""Crash safety of qmpnetd: the service killed mid-operation, then its start-up recovery.

The service runs through ``service_launcher.py``, whose lifecycle observer SIGKILLs the
service when an operation reaches a named step. The client (the ``qmpnet`` console script)
must then fail with one clear line (exit 10); a normal qmpnetd started on the same socket
and state root settles the journal before it listens, and QEMU, the host and the state
agree: an interrupted plug rolled back (unless persisted), an interrupted unplug completed.
Also: SIGTERM during an add, and QEMU killed while the service holds its monitor.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from service_launcher import launcher
from test_crash import (
    BEFORE_THE_PLAN,
    FIRST_JOURNALED,
    PLUG_STEPS,
    QUEUES,
    UNPLUG_STEPS,
    assert_views_agree,
)

from qmpnet import layout
from qmpnet.testing.cli import run_qmpnet
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.probe import held_fd_names, journal_file, qemu_view, saved_ids, tun_count
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.scene import RUN, del_link, make_sandbox
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

MAC = "52:54:00:00:02:31"

CASES = [("add", s, p) for s in PLUG_STEPS for p in ("begin", "done")] + [
    ("remove", s, p) for s in UNPLUG_STEPS for p in ("begin", "done")
]

vm = module_vm("svccrash")


@pytest.fixture
def svc_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(socket, state root, config file) of one test; the config is the service's default."""
    config = tmp_path / "qmpnetd.toml"
    config.write_text(
        "[network]\n"
        f'tap_name = "{RUN}s{{idx}}"\n'
        f"queues = {QUEUES}\n"
        "[network.timeouts]\nunplug = 20.0\nconnect = 30.0\n"
    )
    return tmp_path / "svc" / "qmpnetd.sock", tmp_path / "root", config


@pytest_asyncio.fixture(loop_scope="module")
async def services() -> AsyncIterator[list[ServiceProcess]]:
    """The services a test starts: each stopped (SIGTERM, then SIGKILL) by its pid after."""
    started: list[ServiceProcess] = []
    yield started
    for svc in started:
        await svc.stop()


qmpnet = run_qmpnet  # the kit's, under the name this module's tests call


def iface_file(tmp_path: Path, address: str, name: str = "eth1") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "hwAddr": address}))
    return path


def assert_one_clear_line(done: subprocess.CompletedProcess[str]) -> None:
    """Exit 10 and one line ``qmpnet: error: ...`` naming qmpnetd; no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 10, (done.returncode, done.stdout, done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qmpnet: error: "), lines
    assert "qmpnetd" in lines[0], lines
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("op", "step", "phase"), CASES, ids=[f"{o}-{s}-{p}" for o, s, p in CASES])
async def test_kill_service_at_step_then_startup_recovers(
    vm: GuestVM,
    make_netns: Callable[[], str],
    tmp_path: Path,
    svc_dirs: tuple[Path, Path, Path],
    services: list[ServiceProcess],
    op: str,
    step: str,
    phase: str,
) -> None:
    sock, root, config = svc_dirs
    netns = make_netns()
    make_sandbox(netns, "eth1", MAC)
    veth_before = ip_links(netns)["eth1"]["address"]
    qmp = str(vm.mgmt_qmp_path)
    state_dir = Path(layout.vm_dir(str(root), qmp))
    tun_before = tun_count(vm.pid)
    # shaped both ways, as test_crash's NICs: a kill at any step leaves shaping to settle too
    common = ["--qmp", qmp, "--model", "tcfilter", "--queues", str(QUEUES)]
    common += ["--inbound", "12500", "--outbound", "2500"]

    # The plug and unplug steps have distinct names: an unplug drill lets the setup add pass.
    killing = await ServiceProcess.start(
        tmp_path,
        launcher=launcher("--kill-at", f"{step}:{phase}"),
        root=root,
        socket=sock,
        args=["--config", str(config)],
    )
    services.append(killing)
    if op == "remove":
        added = await qmpnet(
            "add-iface",
            *common,
            "--netns",
            netns,
            "--wait-guest",
            str(iface_file(tmp_path, MAC)),
            env=killing.env,
        )
        assert added.returncode == 0, added.stderr + killing.tail()
        done = await qmpnet("del-iface", "--qmp", qmp, "--mac", MAC, env=killing.env)
    else:
        done = await qmpnet(
            "add-iface",
            *common,
            "--netns",
            netns,
            "--wait-guest",
            str(iface_file(tmp_path, MAC)),
            env=killing.env,
        )
    assert await killing.wait(60) == -signal.SIGKILL, killing.tail()
    assert_one_clear_line(done)

    journal = journal_file(state_dir)
    if step in BEFORE_THE_PLAN:
        assert journal is None, journal
        ours: set[str] = set()
    else:
        assert journal, "a killed operation leaves its plan in the journal"
        ((record_id, record),) = journal.items()
        assert record["step"] == FIRST_JOURNALED[op, "tcfilter"]
        assert record["operation"] == ("hot-plug" if op == "add" else "unplug")
        ours = {record_id}

    # A normal service on the same socket and root: recovery runs before it listens.
    recovering = await ServiceProcess.start(
        tmp_path, root=root, socket=sock, args=["--config", str(config)]
    )
    services.append(recovering)
    saved = await assert_views_agree(
        vm, state_dir, netns, "eth1", "tcfilter", tun_before, ours, shaped=True
    )
    committed = op == "add" and step == "persist" and phase == "done"
    outcome = "rolled-back" if op == "add" and not committed else "completed"
    for endpoint in ours:
        # settled by the start-up reconcile, before the service listened
        assert any(
            f" {outcome} " in f"{line} " and endpoint in line for line in recovering.lines()
        ), recovering.tail()
    assert len(saved) == (1 if committed else 0), (saved, recovering.tail())
    for endpoint in ours:
        assert await held_fd_names(vm.qmp_path, endpoint) == []
    if not committed:
        assert not ip_links(netns).keys() - {"lo", "eth1", "eth1p"}
        assert ip_links(netns)["eth1"]["address"] == veth_before, "the link's MAC is back"
    listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=recovering.env)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["interfaces"]) == len(saved)
    if committed:
        removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", MAC, env=recovering.env)
        assert removed.returncode == 0, removed.stderr + recovering.tail()
        await assert_views_agree(
            vm, state_dir, netns, "eth1", "tcfilter", tun_before, ours, shaped=True
        )
    assert await recovering.stop() == 0, recovering.tail()


#: (step whose begin sends SIGTERM, --stop-timeout): a long one lets the add finish; with 0
#: the add is cancelled (and undone) unless it finishes first, as a quick wait-guest may
SIGTERM_CASES = [("netdev-add", 60), ("device-add", 60), ("persist", 60), ("wait-guest", 0)]


@pytest.mark.parametrize(
    ("step", "stop_timeout"), SIGTERM_CASES, ids=[f"{s}-stop{t}" for s, t in SIGTERM_CASES]
)
async def test_sigterm_during_an_add_exits_0_and_leaves_one_story(
    vm: GuestVM,
    make_netns: Callable[[], str],
    tmp_path: Path,
    svc_dirs: tuple[Path, Path, Path],
    services: list[ServiceProcess],
    step: str,
    stop_timeout: int,
) -> None:
    sock, root, config = svc_dirs
    netns = make_netns()
    make_sandbox(netns, "eth1", MAC)
    qmp = str(vm.mgmt_qmp_path)
    state_dir = Path(layout.vm_dir(str(root), qmp))
    tun_before = tun_count(vm.pid)
    stopping = await ServiceProcess.start(
        tmp_path,
        launcher=launcher("--kill-at", f"{step}:begin", "--signal", "TERM"),
        root=root,
        socket=sock,
        args=["--config", str(config), "--stop-timeout", str(stop_timeout)],
    )
    services.append(stopping)
    done = await qmpnet(
        "add-iface",
        "--qmp",
        qmp,
        "--model",
        "tcfilter",
        "--queues",
        str(QUEUES),
        "--netns",
        netns,
        "--wait-guest",
        str(iface_file(tmp_path, MAC)),
        env=stopping.env,
    )
    assert await stopping.wait(90) == 0, stopping.tail()
    assert not [line for line in stopping.lines() if "Traceback" in line], stopping.tail()
    if done.returncode == 0:
        assert json.loads(done.stdout)["hwAddr"] == MAC
    else:
        assert_one_clear_line(done)
    # Whatever the client heard, the NIC is either fully plugged and recorded or fully gone.
    saved = saved_ids(state_dir)
    assert journal_file(state_dir) is None, "a stop that drained leaves no journal"
    view = await qemu_view(vm.qmp_path)
    ids = set(saved)
    assert {i for i in ids if f"{i}-dev" in view.devices} == ids
    if done.returncode == 0:
        assert len(saved) == 1, (saved, stopping.tail())
    recovering = await ServiceProcess.start(
        tmp_path, root=root, socket=sock, args=["--config", str(config)]
    )
    services.append(recovering)
    await assert_views_agree(vm, state_dir, netns, "eth1", "tcfilter", tun_before, ids)
    if saved:
        removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", MAC, env=recovering.env)
        assert removed.returncode == 0, removed.stderr + recovering.tail()
        await assert_views_agree(vm, state_dir, netns, "eth1", "tcfilter", tun_before, ids)
    assert await recovering.stop() == 0, recovering.tail()


async def test_qemu_killed_under_the_service_is_settled_without_a_client(
    guest_image: GuestImage,
    tmp_path: Path,
    svc_dirs: tuple[Path, Path, Path],
    services: list[ServiceProcess],
) -> None:
    """The kept session hears the connection go: the tap is cleaned and the state dropped.

    Restarting a QEMU on the same socket path is not covered: GuestVM makes a fresh
    directory (and so socket path) for each VM, with no way to choose it.
    """
    sock, root, config = svc_dirs
    tap = f"{RUN}qt"
    qemu = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=4, name=f"{RUN}-sq")
    try:
        qmp = str(qemu.mgmt_qmp_path)
        state_dir = Path(layout.vm_dir(str(root), qmp))
        svc = await ServiceProcess.start(
            tmp_path, root=root, socket=sock, args=["--config", str(config)]
        )
        services.append(svc)
        added = await qmpnet(
            "add-iface",
            "--qmp",
            qmp,
            "--model",
            "none",
            "--tap-name",
            tap,
            str(iface_file(tmp_path, "52:54:00:00:02:41", "eth9")),
            env=svc.env,
        )
        assert added.returncode == 0, added.stderr + svc.tail()
        assert tap in ip_links()
        assert list(saved_ids(state_dir).values()) == ["plugged"]

        os.kill(qemu.pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while tap in ip_links() or saved_ids(state_dir):
            if time.monotonic() > deadline:
                pytest.fail(f"not settled: {saved_ids(state_dir)} {svc.tail()}")
            await asyncio.sleep(0.2)
        assert journal_file(state_dir) is None
        assert any("QMP connection lost" in line for line in svc.lines()), svc.tail()
        assert svc.returncode is None, "the service lives on"
        # the tap went with QEMU: not a vanished link of a plugged NIC any more
        status = await qmpnet("status", "--json", env=svc.env)
        assert status.returncode == 0, status.stderr
        (view,) = json.loads(status.stdout)["vms"]
        assert view["session"] == "closed"
        assert view["vanished_links"] == [], view
        assert await svc.stop() == 0, svc.tail()
    finally:
        await qemu.stop()
        del_link(tap)
