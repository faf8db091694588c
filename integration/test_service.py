"""qmpnetd with real QEMU: every door through the service, events heard as they happen.

The service runs as a subprocess with its own socket and state root; clients are the
installed ``qmpnet`` console script, as users run it. What happened is checked
independently: the guest's serial markers, QEMU's first monitor (the VM manager's), ``ip -j``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import QMPClient

from qmpnet.qmp import connect_clean
from qmpnet.testing.cli import run_qmpnet
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.gobuild import cli_shim
from qmpnet.testing.output import conforms
from qmpnet.testing.probe import links
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM, marker_fields

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

QMPNET = str(Path(sys.executable).with_name("qmpnet"))
MARKER_TIMEOUT = 60.0

vm = module_vm("svc", root_ports=6)


def mac(last: int) -> str:
    return f"52:54:00:5e:{os.getpid() % 256:02x}:{last:02x}"


qmpnet = run_qmpnet  # the kit's, under the name this module's tests call

Runner = Callable[..., Awaitable[subprocess.CompletedProcess[str]]]


@pytest.fixture(params=["python", "compiled"])
def front(request: pytest.FixtureRequest) -> str:
    """The client a user runs: the Python console script, or the compiled front (whose
    command lines qmpnetd runs with the Python client's code, through cli.exec)."""
    return QMPNET if request.param == "python" else str(cli_shim())


@pytest.fixture
def cli(front: str) -> Runner:
    return functools.partial(run_qmpnet, binary=front)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    async with await ServiceProcess.start(tmp_path_factory.mktemp("qmpnetd")) as svc:
        yield svc
    assert svc.returncode == 0, svc.tail()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def manager(vm: GuestVM) -> AsyncIterator[QMPClient]:
    client = QMPClient("manager")
    await connect_clean(client, str(vm.qmp_path))
    try:
        yield client
    finally:
        await client.disconnect()


async def peripherals(manager: QMPClient) -> set[str]:
    reply: Any = await manager.execute("qom-list", {"path": "/machine/peripheral"})
    return {c["name"] for c in reply}


def iface_file(tmp_path: Path, address: str, name: str = "eth7") -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"name": name, "hwAddr": address, "mtu": 1400}))
    return path


async def add_tap(
    service: ServiceProcess,
    qmp: str,
    address: str,
    tap: str,
    tmp_path: Path,
    *options: str,
    run: Runner = qmpnet,
) -> subprocess.CompletedProcess[str]:
    """``add-iface`` of a model-none tap NIC through the service; it must succeed."""
    added = await run(
        "add-iface",
        "--qmp",
        qmp,
        "--model",
        "none",
        "--tap-name",
        tap,
        *options,
        str(iface_file(tmp_path, address)),
        env=service.env,
    )
    assert added.returncode == 0, added.stderr + service.tail()
    return added


async def test_add_list_del_through_the_service(
    vm: GuestVM,
    service: ServiceProcess,
    manager: QMPClient,
    tmp_path: Path,
    host_link_names: Any,
    cli: Runner,
) -> None:
    address, tap = mac(0x11), host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    cursor = vm.console_cursor()
    added = await add_tap(service, qmp, address, tap, tmp_path, run=cli)
    reply = conforms(json.loads(added.stdout), "interface")
    assert reply["hwAddr"] == address
    assert reply["pciPath"]
    # the guest saw it, and QEMU's other monitor holds it
    line = await vm.wait_for(rf"QMPNET NIC-ADD .*mac={address}", MARKER_TIMEOUT, since=cursor)
    assert marker_fields(line)["mac"] == address
    assert any(p.endswith("-dev") for p in await peripherals(manager))
    assert tap in links()
    # no --state was needed: the service keeps the VM's state under its own root
    listed = await cli("list-ifaces", "--qmp", qmp, "--json", env=service.env)
    assert listed.returncode == 0, listed.stderr
    doc = conforms(json.loads(listed.stdout), "interfaceList")
    assert [i["status"] for i in doc["interfaces"]] == ["plugged"]
    assert [i["mac"] for i in doc["interfaces"]] == [address]
    table = await cli("list-ifaces", "--qmp", qmp, env=service.env)
    assert address in table.stdout
    assert "plugged" in table.stdout
    removed = await cli("del-iface", "--qmp", qmp, "--mac", address, env=service.env)
    assert removed.returncode == 0, removed.stderr + service.tail()
    assert tap not in links()
    assert not any(p.endswith("-dev") for p in await peripherals(manager))
    listed = await cli("list-ifaces", "--qmp", qmp, "--json", env=service.env)
    assert json.loads(listed.stdout)["interfaces"] == []


async def test_a_host_link_deleted_under_a_plugged_nic_is_heard_and_shown(
    vm: GuestVM, service: ServiceProcess, tmp_path: Path, host_link_names: Any
) -> None:
    """RTM_DELLINK of a plugged NIC's tap: logged and shown, the NIC left plugged.

    One queue: QEMU 7.2 aborts when a multiqueue NIC whose tap is gone is reset (FACTS).
    """
    address, tap = mac(0x12), host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    await add_tap(service, qmp, address, tap, tmp_path, "--queues", "1")
    await asyncio.to_thread(subprocess.run, ["ip", "link", "del", tap], check=True)
    deadline = time.monotonic() + 30
    status = ""
    while time.monotonic() < deadline:
        listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
        items = json.loads(listed.stdout)["interfaces"]
        status = str(items)
        if any(address in json.dumps(i) and i.get("host_link_gone") for i in items):
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"the deleted tap was not reported: {status} {service.tail()}")
    table = await qmpnet("list-ifaces", "--qmp", qmp, env=service.env)
    assert "plugged (host link gone)" in table.stdout
    assert any(tap in line and "deleted" in line for line in service.lines())
    removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", address, env=service.env)
    assert removed.returncode == 0, removed.stderr + service.tail()


async def test_a_vanished_link_is_forgotten_with_its_nic(
    vm: GuestVM, service: ServiceProcess, manager: QMPClient, tmp_path: Path, host_link_names: Any
) -> None:
    """A NIC whose tap vanished, dropped by a reconcile: a new NIC on that tap name is healthy."""
    tap = host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    options = ["--qmp", qmp, "--model", "none", "--queues", "1", "--tap-name", tap]
    before = await peripherals(manager)
    added = await qmpnet(
        "add-iface", *options, str(iface_file(tmp_path, mac(0x13))), env=service.env
    )
    assert added.returncode == 0, added.stderr + service.tail()
    (dev,) = await peripherals(manager) - before
    await asyncio.to_thread(subprocess.run, ["ip", "link", "del", tap], check=True)
    deadline = time.monotonic() + 30
    while not any(tap in line and "deleted" in line for line in service.lines()):
        assert time.monotonic() < deadline, service.tail()
        await asyncio.sleep(0.2)
    # the VM manager unplugs it behind qmpnet's back; a reconcile drops it from the state
    await manager.execute("device_del", {"id": dev})
    while dev in await peripherals(manager):
        assert time.monotonic() < deadline + 60, "the guest did not release the NIC"
        await asyncio.sleep(0.2)
    settled = await qmpnet("reconcile", "--qmp", qmp, env=service.env)
    assert settled.returncode == 0, settled.stdout + settled.stderr
    again = await qmpnet(
        "add-iface", *options, str(iface_file(tmp_path, mac(0x14))), env=service.env
    )
    assert again.returncode == 0, again.stderr + service.tail()
    listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
    (item,) = json.loads(listed.stdout)["interfaces"]
    assert not item.get("host_link_gone"), item
    table = await qmpnet("list-ifaces", "--qmp", qmp, env=service.env)
    assert "host link gone" not in table.stdout, table.stdout
    removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", mac(0x14), env=service.env)
    assert removed.returncode == 0, removed.stderr + service.tail()


async def test_a_direct_call_for_a_held_vm_fails_at_once(
    vm: GuestVM, service: ServiceProcess, tmp_path: Path
) -> None:
    """While qmpnetd holds the monitor, --direct says so (exit 11) instead of hanging."""
    qmp = str(vm.mgmt_qmp_path)
    warm = await qmpnet("list-ifaces", "--qmp", qmp, env=service.env)  # the service holds it
    assert warm.returncode == 0, warm.stderr
    started = time.monotonic()
    direct = await qmpnet(
        "--direct",
        "add-iface",
        "--qmp",
        qmp,
        "--timeout-connect",
        "30",
        str(iface_file(tmp_path, mac(0x21))),
        env=service.env,
    )
    assert time.monotonic() - started < 10  # not the 30 s connect deadline
    assert direct.returncode == 11, direct.stderr
    lines = [x for x in direct.stderr.splitlines() if x.startswith("qmpnet: error:")]
    assert len(lines) == 1, direct.stderr
    assert "held by qmpnetd" in lines[0]
    assert "Traceback" not in direct.stderr


async def test_an_unplug_completed_late_by_the_guest_is_finished_by_the_service(
    vm: GuestVM, service: ServiceProcess, manager: QMPClient, tmp_path: Path, host_link_names: Any
) -> None:
    """DEVICE_DELETED after the deadline: the service completes the unplug, no client call."""
    address, tap = mac(0x22), host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    await add_tap(service, qmp, address, tap, tmp_path, "--queues", "1", "--wait-guest")
    await manager.execute("stop")
    try:
        removed = await qmpnet(
            "del-iface", "--qmp", qmp, "--mac", address, "--timeout-unplug", "1", env=service.env
        )
        assert removed.returncode == 6, removed.stderr
        # the request's own deadline, not the service's default of 5 s
        assert "within 1 s" in removed.stderr, removed.stderr
        listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
        states = [i["status"] for i in json.loads(listed.stdout)["interfaces"]]
        assert states == ["unplug-pending"]
    finally:
        await manager.execute("cont")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = json.loads((service.root / _vm_key(qmp) / "state.json").read_text())
        if not state["endpoints"] and tap not in links():
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail(f"the late unplug was not completed: {service.tail()}")
    assert not any(p.endswith("-dev") for p in await peripherals(manager))


def _vm_key(qmp: str) -> str:
    from qmpnet.layout import vm_key

    return vm_key(qmp)


async def test_the_thin_client_imports_only_the_standard_library(
    vm: GuestVM, service: ServiceProcess, tmp_path: Path, host_link_names: Any
) -> None:
    address, tap = mac(0x23), host_link_names("s")
    qmp = str(vm.mgmt_qmp_path)
    path = iface_file(tmp_path, address)
    code = (
        "import sys; from qmpnet.cli import main; "
        f"rc = main(['add-iface', '--qmp', {qmp!r}, '--model', 'none', '--queues', '1', "
        f"'--tap-name', {tap!r}, {str(path)!r}]); "
        "print('MODULES', ' '.join(sorted(sys.modules))); sys.exit(rc)"
    )
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **service.env},
        check=False,
        timeout=120,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith("MODULES ")]
        heavy = [
            m
            for m in line.split()[1:]
            if m.split(".")[0] in ("pyroute2", "qemu", "attrs", "cattrs", "asyncio")
        ]
        assert heavy == []
    finally:
        removed = await qmpnet("del-iface", "--qmp", qmp, "--mac", address, env=service.env)
        assert removed.returncode == 0, removed.stderr


async def test_hostile_requests_cost_only_their_own_connection(service: ServiceProcess) -> None:
    import socket

    from qmpnet.service import protocol

    def exchange(payload: bytes) -> list[dict[str, Any]]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(service.socket))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        return [json.loads(x) for x in data.splitlines() if x.strip()]

    def req(method: str, **params: Any) -> bytes:
        return protocol.encode(protocol.request(method, params, 1))

    assert exchange(b"{not json\n")[0]["error"]["code"] == protocol.PARSE_ERROR
    assert exchange(b"[1, 2]\n")[0]["error"]["code"] == protocol.INVALID_REQUEST
    wrong = protocol.encode({"jsonrpc": "2.0", "method": "status", "params": {"protocol": 99}})
    assert exchange(wrong)[0]["error"]["code"] == protocol.PROTOCOL_MISMATCH
    assert exchange(req("nope"))[0]["error"]["code"] == protocol.METHOD_NOT_FOUND
    unknown = exchange(req("vm.list", colour="red"))[0]["error"]
    assert unknown["data"]["exit"] == 3
    assert "colour" in unknown["message"]
    huge = b'{"x": "' + b"a" * (protocol.LINE_MAX + 10) + b'"}\n'
    (reply,) = await asyncio.to_thread(exchange, huge)
    assert reply["error"]["code"] == protocol.INVALID_REQUEST
    # a half-sent line from one client, while another is answered
    with socket.socket(socket.AF_UNIX) as dangling:
        dangling.connect(str(service.socket))
        dangling.sendall(b'{"jsonrpc": "2.0", "meth')
        version = exchange(req("version"))[0]["result"]
    assert version["protocol"] == protocol.PROTOCOL_VERSION
    assert service.returncode is None


async def test_version_names_both_sides(service: ServiceProcess) -> None:
    proc = await qmpnet("--version", env=service.env)
    assert proc.returncode == 0
    assert proc.stdout.startswith("qmpnet ")
    assert "qmpnetd " in proc.stdout
    assert "protocol 1" in proc.stdout


async def test_reconcile_status_vm_and_watch_doors(
    vm: GuestVM, service: ServiceProcess, make_netns: Any, cli: Runner
) -> None:
    qmp = str(vm.mgmt_qmp_path)
    rec = await cli("reconcile", "--qmp", qmp, env=service.env)
    assert rec.returncode == 0, rec.stderr
    rec_json = await cli("reconcile", "--qmp", qmp, "--json", env=service.env)
    assert rec_json.returncode == 0
    assert conforms(json.loads(rec_json.stdout), "reconcile")["qemu"] == "running"
    reg = await cli("vm", "register", "--id", "sandbox-1", "--qmp", qmp, env=service.env)
    assert reg.returncode == 0, reg.stderr
    conforms(json.loads(reg.stdout), "vmRegistered")
    listed = await cli("vm", "list", "--json", env=service.env)
    vms = conforms(json.loads(listed.stdout), "vmList")["vms"]
    (entry,) = [v for v in vms if v["id"] == "sandbox-1"]
    assert entry["session"] == "open"
    assert entry["registered_by_root"] is True
    status = await cli("status", "--json", env=service.env)
    doc = conforms(json.loads(status.stdout), "status")
    assert doc["pid"] == service.pid
    assert any(v["id"] == "sandbox-1" for v in doc["vms"])
    human = await cli("status", env=service.env)
    assert "qmpnetd" in human.stdout
    assert "sandbox-1" in human.stdout
    netns = make_netns()
    started = await cli(
        "watch", "--qmp", qmp, "--netns", netns, "--model", "tcfilter", env=service.env
    )
    assert started.returncode == 0, started.stderr
    ident = started.stdout.split()[1]
    watches = json.loads((await cli("watches", "--json", env=service.env)).stdout)
    (w,) = [x for x in conforms(watches, "watchList")["watches"] if x["id"] == ident]
    assert w["running"] is True
    assert (await cli("unwatch", ident, env=service.env)).returncode == 0
    watches = json.loads((await cli("watches", "--json", env=service.env)).stdout)
    assert all(x["id"] != ident for x in watches["watches"])
    unreg = await cli("vm", "unregister", "sandbox-1", env=service.env)
    assert unreg.returncode == 0, unreg.stderr
    again = await cli("list-ifaces", "--qmp", qmp, env=service.env)  # known again on use
    assert again.returncode == 0, again.stderr


async def test_a_qemu_restarted_on_the_same_path_is_a_new_vm(
    guest_image: Any, service: ServiceProcess, tmp_path: Path, host_link_names: Any
) -> None:
    """A new QEMU on the old socket path never inherits the old one's NICs.

    Two paused QEMUs (no guest code runs: a hot-plug needs none) take turns on one extra
    monitor path; the service, holding the first one's session, must see the second as a
    new VM: the first's tap cleaned from the host, nothing of it in the state or re-plugged
    into the second (its own first monitor shows no NIC), and the session re-opened to it.
    """
    import shutil
    import tempfile

    from qmpnet.testing.scene import RUN

    short = Path(tempfile.mkdtemp(prefix=f"{RUN}-same-", dir="/tmp"))  # AF_UNIX path limit
    qmp = str(short / "vm.sock")
    extra = ["-qmp", f"unix:{qmp},server=on,wait=off"]
    tap = host_link_names("r")
    first = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2, extra_args=extra)
    second: GuestVM | None = None
    try:
        await add_tap(service, qmp, mac(0x31), tap, tmp_path, "--queues", "1")
        assert tap in links()
        await first.stop()  # QEMU gone; its socket path is free for the next one
        second = await GuestVM.start(
            guest_image, tmp_path, paused=True, root_ports=2, extra_args=extra
        )
        state_file = service.root / _vm_key(qmp) / "state.json"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            if tap not in links() and not state.get("endpoints"):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the old VM's NIC was not dropped: {service.tail()}")
        listed = await qmpnet("list-ifaces", "--qmp", qmp, "--json", env=service.env)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["interfaces"] == []
        vms = json.loads((await qmpnet("vm", "list", "--json", env=service.env)).stdout)
        (ours,) = [v for v in vms["vms"] if v["qmp"] == qmp]
        assert ours["qemu_pid"] == second.pid
        assert ours["session"] == "open"
        client = QMPClient("second")
        await connect_clean(client, str(second.qmp_path))
        try:
            assert not {p for p in await peripherals(client) if p.endswith("-dev")}
        finally:
            await client.disconnect()
        # and the new VM takes a NIC of its own under the same name
        await add_tap(service, qmp, mac(0x32), tap, tmp_path, "--queues", "1")
        assert tap in links()
    finally:
        await first.stop()
        if second is not None:
            await second.stop()
        shutil.rmtree(short, ignore_errors=True)


async def test_group_members_act_within_their_rules_and_strangers_are_refused(
    guest_image: Any, tmp_path: Path, host_link_names: Any, front: str
) -> None:
    """Real unprivileged clients (uid 65534) against a service run with ``--group nogroup``.

    A member may plug into a VM whose monitor a QEMU it does not own serves; it may not
    name a socket its own process serves (root would hand tap fds to it), a netns outside
    /run/netns, or a state directory. A client outside the group cannot reach the socket.
    """
    import shutil
    import tempfile

    from qmpnet.testing.scene import RUN

    work = Path(tempfile.mkdtemp(prefix=f"{RUN}-grp-", dir="/tmp"))
    os.chmod(work, 0o755)  # the clients are not root: they must reach the socket's directory
    member = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    stranger = ["setpriv", "--reuid", "65534", "--regid", "12345", "--clear-groups"]
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2)
    fake: asyncio.subprocess.Process | None = None
    try:
        async with await ServiceProcess.start(work, args=["--group", "nogroup"]) as svc:
            env = {"QMPNET_SOCKET": str(svc.socket)}

            async def run(who: list[str], *args: str, stdin: str | None = None) -> Any:
                return await asyncio.to_thread(
                    subprocess.run,
                    [*who, front, *args],
                    input=stdin,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env={**os.environ, **env},
                    check=False,
                )

            def one_error(done: Any, *words: str) -> None:
                lines = [x for x in done.stderr.splitlines() if x.startswith("qmpnet: error:")]
                assert len(lines) == 1, done.stderr
                assert all(w in lines[0] for w in words), lines[0]
                assert "Traceback" not in done.stderr

            if front == QMPNET:
                refused = await run(stranger, "status")
                assert refused.returncode == 10, refused.stderr
                one_error(refused, "permission denied")
            else:
                # the compiled front cannot reach the socket either, and runs the Python
                # qmpnet in its place; that one's interpreter is this venv's, under /root
                # (0700, out of the stranger's reach here), so a probe stands in for it
                probe = work / "probe"
                probe.write_text("#!/bin/sh\necho the Python front ran; exit 99\n")
                probe.chmod(0o755)
                shim = cli_shim(full_cli=probe, name="qmpnet-stranger")
                fell = await asyncio.to_thread(
                    subprocess.run,
                    [*stranger, str(shim), "status"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, **env},
                    check=False,
                )
                assert (fell.returncode, fell.stdout) == (99, "the Python front ran\n"), fell

            assert (await run(member, "vm", "list")).returncode == 0
            qmp = str(vm.mgmt_qmp_path)
            tap = host_link_names("g")
            desc = json.dumps({"name": "eth7", "hwAddr": mac(0x41)})
            base = ["add-iface", "--qmp", qmp, "--model", "none", "--tap-name", tap]
            for extra, words in (
                (["--netns", str(work)], ["/run/netns"]),
                (["--state", str(work / "state")], ["state"]),
            ):
                denied = await run(member, *base, *extra, "-", stdin=desc)
                assert denied.returncode == 12, denied.stderr
                one_error(denied, *words)
                assert tap not in links()
            # a socket the member's own process serves: never handed a tap fd
            mine = work / "member"
            os.mkdir(mine)
            os.chown(mine, 65534, 65534)
            fake_path = mine / "fake.sock"
            fake = await asyncio.create_subprocess_exec(
                *member,
                sys.executable,
                "-c",
                "import socket, time; s = socket.socket(socket.AF_UNIX);"
                f" s.bind({str(fake_path)!r}); s.listen(); print('up', flush=True);"
                " time.sleep(300)",
                stdout=asyncio.subprocess.PIPE,
            )
            assert fake.stdout is not None
            assert (await fake.stdout.readline()).strip() == b"up"
            own = await run(member, "add-iface", "--qmp", str(fake_path), "-", stdin=desc)
            assert own.returncode == 12, own.stderr
            one_error(own, "root registered or QEMU serves")
            # within the rules: a NIC into root's QEMU
            added = await run(member, *base, "--queues", "1", "--no-vhost", "-", stdin=desc)
            assert added.returncode == 0, added.stderr + svc.tail()
            assert tap in links()
    finally:
        if fake is not None and fake.returncode is None:
            fake.kill()
            await fake.wait()
        await vm.stop()
        shutil.rmtree(work, ignore_errors=True)


async def test_metrics_count_what_was_done(
    guest_image: Any, tmp_path: Path, host_link_names: Any
) -> None:
    """``--metrics-listen``: a scrape after two plugs and a timed-out unplug tells them apart.

    A paused QEMU of its own (the module's guest is held by the other service): plugs need
    no guest code, and its unplug times out (left pending), which the metrics must show.
    """
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=3)
    try:
        async with await ServiceProcess.start(
            tmp_path / "m", args=["--metrics-listen", f"127.0.0.1:{port}"]
        ) as svc:
            qmp = str(vm.mgmt_qmp_path)
            for last in (0x51, 0x52):
                await add_tap(svc, qmp, mac(last), host_link_names("m"), tmp_path, "--queues", "1")
            removed = await qmpnet(
                "del-iface", "--qmp", qmp, "--mac", mac(0x51), "--timeout-unplug", "1", env=svc.env
            )
            assert removed.returncode == 6, removed.stderr
            url = f"http://127.0.0.1:{port}/metrics"
            text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    finally:
        await vm.stop()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    for step in ("prepare-links", "open-queues", "pass-fds", "netdev-add", "device-add", "persist"):
        assert value("qmpnet_step_seconds_count", kind="hot-plug", step=step) == 2, step
    assert value("qmpnet_step_seconds_count", kind="unplug", step="device-del") == 1
    errors = {"kind": "unplug", "step": "device-del", "error": "UnplugTimeoutError"}
    assert value("qmpnet_step_errors_total", **errors) == 1
    assert value("qmpnet_vms") == 1
    assert value("qmpnet_sessions_open") == 1
    assert value("qmpnet_pending_unplugs") == 1
    assert value("qmpnet_requests_in_flight") == 0


async def test_metrics_refuse_a_bad_address(tmp_path: Path) -> None:
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "qmpnet.service.daemon",
            "--socket",
            str(tmp_path / "s"),
            "--metrics-listen",
            "nowhere",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "want HOST:PORT, not 'nowhere'" in done.stderr
    assert not (tmp_path / "s").exists()
