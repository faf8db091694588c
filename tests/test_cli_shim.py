"""The compiled ``qmpnet`` front (contrib/cli-shim) prints and exits as the Python client does.

Both fronts run the same command lines against a real qmpnetd, from the same directory and
with the same stdin, and their status, stdout and stderr must be equal byte for byte: the
service runs the compiled front's line with the Python client's own code (``cli.exec``), and
the front falls back to the Python ``qmpnet`` for everything else. A front built with a probe
in place of the Python ``qmpnet`` shows where it fell back and where it did not. A service that
dies between request and reply, or an older one without ``cli.exec``, cannot be made to by the
real qmpnetd on cue; a one-shot socket peer plays it, and says so.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import re
import socket
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio

from qmpnet import cli
from qmpnet.exits import EXIT_SERVICE
from qmpnet.service import cliexec
from qmpnet.service.protocol import (
    DEFAULT_SOCKET,
    LINE_MAX,
    METHOD_NOT_FOUND,
    PROTOCOL_MISMATCH,
    PROTOCOL_VERSION,
)
from qmpnet.testing.gobuild import CLI_SOURCE, PYTHON_CLI, cli_shim
from qmpnet.testing.probe import links
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.standin import peer, rpc
from qmpnet.testing.vm import GuestVM


@pytest.fixture(scope="module")
def compiled() -> Path:
    return cli_shim()


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A front whose 'Python qmpnet' is a probe: it notes its arguments and exits 99."""
    work = tmp_path_factory.mktemp("probe")
    notes = work / "ran"
    probe = work / "probe"
    probe.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {notes}\nexit 99\n')
    probe.chmod(0o755)
    return cli_shim(full_cli=probe, name="qmpnet-probe"), notes


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    async with await ServiceProcess.start(tmp_path_factory.mktemp("qmpnetd")) as svc:
        yield svc
    assert svc.returncode == 0, svc.tail()


@attrs.frozen
class Run:
    status: int
    out: str
    err: str


def run(
    binary: Path,
    *args: str,
    stdin: bytes = b"",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Run:
    base = {k: v for k, v in os.environ.items() if not k.startswith("QMPNET_")}
    done = subprocess.run(
        [str(binary), *args],
        check=False,
        input=stdin,
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        timeout=120,
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def both(compiled: Path, *args: str, **kw: Any) -> Run:
    """Both fronts on one command line: they must agree; the answer is returned."""
    python, go = run(PYTHON_CLI, *args, **kw), run(compiled, *args, **kw)
    assert untimed(go) == untimed(python), (python, go)
    return go


def untimed(got: Run) -> Run:
    """A JSON log record's time is its own moment's."""
    return attrs.evolve(got, err=re.sub(r'"time": [0-9.]+', '"time": T', got.err))


def test_the_front_restates_the_same_constants() -> None:
    """main.go is standard library Go: it restates these; pin them to the Python ones."""
    source = CLI_SOURCE.read_text()
    for name, value in (
        ("readMax", cli._READ_MAX),
        ("lineMax", LINE_MAX),
        ("protocolVersion", PROTOCOL_VERSION),
        ("filesMax", cliexec.FILES_MAX),
        ("exitService", EXIT_SERVICE),
        ("methodNotFound", METHOD_NOT_FOUND),
        ("protocolMismatch", PROTOCOL_MISMATCH),
    ):
        found = re.search(rf"^\s*{name}\s*=\s*(.+)$", source, re.M)
        assert found, name
        assert eval(found[1]) == value, name  # our own integer literals
    assert re.search(rf"defaultSocket\s+= \"{re.escape(DEFAULT_SOCKET)}\"", source)
    valued = re.search(r"valued = \[\]string\{([^}]*)\}", source)
    assert valued, "valued"
    assert tuple(json.loads(f"[{valued[1]}]")) == cli._GLOBAL_VALUED


def test_without_a_service_the_python_front_does_it(compiled: Path, tmp_path: Path) -> None:
    # nothing listens: the explicit socket's error, and the default socket's direct mode
    gone = str(tmp_path / "none.sock")
    got = both(compiled, "list-ifaces", "--qmp", gone, env={"QMPNET_SOCKET": gone})
    assert got.status == EXIT_SERVICE, got
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: a service that died
    got = both(compiled, "list-ifaces", "--qmp", gone, env={"QMPNET_SOCKET": str(stale)})
    assert got.status == EXIT_SERVICE, got
    got = both(compiled, "--direct", "list-ifaces", "--qmp", gone, "--state", str(tmp_path / "s"))
    assert got.status == 4, got
    assert "no such socket" in got.err


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("vm", "list"), id="vm-list"),
        pytest.param(("vm", "list", "--json"), id="vm-list-json"),
        pytest.param(("watches", "--json"), id="watches"),
        pytest.param(("list-ifaces", "--qmp", "/nonexistent.sock"), id="no-qemu"),
        pytest.param(("list-ifaces", "--qmp", "rel.sock", "--json"), id="relative-qmp"),
        pytest.param(("--log-format", "json", "list-ifaces", "--qmp", "x.sock"), id="json-error"),
        pytest.param(("add-iface", "--qmp", "x.sock", "absent.json"), id="no-file"),
        pytest.param(("add-iface", "--qmp", "x.sock", "."), id="a-directory"),
        pytest.param(("add-iface", "--qmp", "x.sock", "secret.json"), id="unreadable"),
        pytest.param(("add-iface", "--qmp", "x.sock", "-"), id="stdin"),
        pytest.param(("add-iface", "--qmp", "x.sock", "--config", "nope.toml", "-"), id="config"),
        pytest.param(("add-iface", "--qmp", "x.sock", "--bandwidth", "{", "-"), id="bad-option"),
        pytest.param(("add-iface", "--qmp", "x.sock", "--config", "-", "-"), id="config-dash"),
        pytest.param(("del-iface", "--qmp", "x.sock", "--mac", "zz"), id="bad-mac"),
        pytest.param(
            ("set-link", "--qmp", "x.sock", "--mac", "52:54:00:00:00:01", "sideways"), id="usage"
        ),
        pytest.param(("add-iface",), id="missing-args"),
        pytest.param(("add-iface", "--help"), id="help"),
        pytest.param(("--version",), id="version"),
        pytest.param(("nosuch",), id="unknown-command"),
        pytest.param(("--sock", "x", "status"), id="abbreviated-global"),
        pytest.param((), id="nothing"),
        pytest.param(("unwatch", "w-nope"), id="unknown-watch"),
    ],
)
async def test_both_fronts_print_the_same_through_qmpnetd(
    compiled: Path, service: ServiceProcess, tmp_path: Path, args: tuple[str, ...]
) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    secret.chmod(0)
    got = both(
        compiled,
        *args,
        stdin=b'{"name": "eth1", "hwAddr": "52:54:00:00:00:\xff"',
        cwd=tmp_path,
        env={"QMPNET_SOCKET": str(service.socket)},
    )
    assert "Traceback" not in got.err


@pytest.mark.asyncio(loop_scope="module")
async def test_the_service_runs_what_it_can_and_the_rest_falls_back(
    probed: tuple[Path, Path], service: ServiceProcess, tmp_path: Path
) -> None:
    front, notes = probed
    notes.unlink(missing_ok=True)
    env = {"QMPNET_SOCKET": str(service.socket)}
    taken: tuple[tuple[str, ...], ...] = (
        ("vm", "list"),
        ("list-ifaces", "--qmp", "/nonexistent.sock"),
        ("add-iface", "--qmp", "x.sock", "-"),
        ("-v", "--socket", str(service.socket), "status"),
    )
    for args in taken:
        got = run(front, *args, stdin=b"{}", cwd=tmp_path, env=env)
        assert got.status != 99, (args, got)
    assert not notes.exists()
    not_taken: tuple[tuple[str, ...], ...] = (
        ("--version",),
        ("--direct", "vm", "list"),
        ("demo", "--help"),
        ("add-iface", "--help"),
        ("nosuch",),
        ("vm", "list", *["--json"] * 300),  # longer than the service parses
        ("--sock", "x", "status"),
    )
    for args in not_taken:
        got = run(front, *args, env=env)
        assert got.status == 99, (args, got)
    assert notes.read_text().splitlines()[-1] == "--sock x status"
    assert len(notes.read_text().splitlines()) == 7


@pytest.mark.asyncio(loop_scope="module")
async def test_a_file_is_read_by_the_caller_not_by_the_service(compiled: Path) -> None:
    """A group member's front reads its files itself, with its own rights: a file only root
    may read is refused to it as to the Python client, never read by the service for it."""
    import shutil
    import tempfile

    from qmpnet.testing.scene import RUN

    work = Path(tempfile.mkdtemp(prefix=f"{RUN}-clif-", dir="/tmp"))
    os.chmod(work, 0o755)  # the member must reach the socket's directory and its own files
    member = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    private, public = work / "private.json", work / "public.json"
    for path in (private, public):
        path.write_text(json.dumps({"name": "eth1", "hwAddr": "52:54:00:00:00:01"}))
    private.chmod(0o600)
    public.chmod(0o644)
    try:
        async with await ServiceProcess.start(work, args=["--group", "nogroup"]) as svc:
            env = {**os.environ, "QMPNET_SOCKET": str(svc.socket)}

            def as_member(front: Path, path: Path) -> Run:
                done = subprocess.run(
                    [*member, str(front), "add-iface", "--qmp", "/nonexistent.sock", str(path)],
                    capture_output=True,
                    env=env,
                    timeout=120,
                    check=False,
                )
                return Run(done.returncode, done.stdout.decode(), done.stderr.decode())

            for path, status, words in (
                (private, 3, "Permission denied"),
                (public, 4, "no such socket"),  # read, sent, and the plug went on
            ):
                python, go = as_member(PYTHON_CLI, path), as_member(compiled, path)
                assert go == python, (python, go)
                assert go.status == status, go
                assert words in go.err, go
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.kernel
@pytest.mark.asyncio(loop_scope="module")
async def test_a_plug_through_the_compiled_front_is_the_services(
    probed: tuple[Path, Path],
    service: ServiceProcess,
    guest_image: Any,
    tmp_path: Path,
    host_link_names: Any,
) -> None:
    """add-iface with its interface on stdin, list, set-link, stats, del-iface and status, all
    run by qmpnetd (the probe never ran), each printing what the Python client prints."""
    front, notes = probed
    before = notes.read_text() if notes.exists() else ""
    env = {"QMPNET_SOCKET": str(service.socket)}
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2)
    try:
        qmp = str(vm.mgmt_qmp_path)
        tap, mac = host_link_names("c"), "52:54:00:c1:00:01"
        desc = json.dumps({"name": "eth1", "hwAddr": mac}).encode()
        plug = ["--model", "none", "--tap-name", tap, "--queues", "2", "--no-vhost"]
        added = run(front, "add-iface", "--qmp", qmp, *plug, "-", stdin=desc, env=env)
        assert added.status == 0, added
        assert json.loads(added.out)["hwAddr"] == mac
        listed = run(front, "list-ifaces", "--qmp", qmp, "--json", env=env)
        assert listed.status == 0, listed
        [entry] = json.loads(listed.out)["interfaces"]
        assert (entry["mac"], entry["queues"], entry["host_link"]) == (mac, 2, tap)
        assert run(PYTHON_CLI, "list-ifaces", "--qmp", qmp, "--json", env=env) == listed
        down = run(front, "set-link", "--qmp", qmp, "--mac", mac, "down", env=env)
        assert down.status == 0, down
        stats = run(front, "stats", "--qmp", qmp, "--mac", mac, "--json", env=env)
        assert stats.status == 0, stats
        assert json.loads(stats.out)["interfaces"][0]["link"] == "down"
        # a paused guest never lets its NIC go: the unplug is left pending, said as Python says it
        unplug = ["del-iface", "--qmp", qmp, "--mac", mac, "--timeout-unplug", "1"]
        removed = run(front, *unplug, env=env)
        assert removed.status == 6, removed
        assert removed.err.endswith("the unplug is pending\n"), removed
        pending = run(front, "status", "--json", env=env)
        assert [p["mac"] for p in json.loads(pending.out)["pending_unplugs"]] == [mac]
        assert (notes.read_text() if notes.exists() else "") == before
    finally:
        await vm.stop()
    # the service hears its QEMU go and cleans the host side by itself
    for _ in range(100):
        if tap not in links():
            break
        await asyncio.sleep(0.1)
    assert tap not in links()


def test_a_service_that_dies_mid_request_is_said_in_one_line(
    compiled: Path, tmp_path: Path
) -> None:
    path = tmp_path / "peer.sock"
    with peer(path, lambda line: None) as seen:
        got = run(compiled, "vm", "list", env={"QMPNET_SOCKET": str(path)})
    assert seen[0]["method"] == "cli.exec"
    assert seen[0]["params"]["argv"] == ["vm", "list"]
    assert seen[0]["params"]["cwd"] == os.getcwd()
    assert got.status == EXIT_SERVICE, got
    [line] = got.err.splitlines()
    assert line.startswith(f"qmpnet: error: qmpnetd at {path} closed the connection"), line
    assert got.out == ""


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param({"error": {"code": -32601, "message": "no method 'cli.exec'"}}, id="older"),
        pytest.param({"error": {"code": -32001, "message": "protocol 2"}}, id="other-protocol"),
        pytest.param({"error": {"code": 12, "data": {"refused_caller": True}}}, id="refused"),
        pytest.param({"result": {"fallback": "help"}}, id="fallback"),
    ],
)
def test_anything_but_an_answer_is_the_python_fronts_to_say(
    probed: tuple[Path, Path], tmp_path: Path, reply: dict[str, Any]
) -> None:
    front, notes = probed
    path = tmp_path / "peer.sock"
    with peer(path, rpc(**reply)):
        got = run(front, "vm", "list", env={"QMPNET_SOCKET": str(path)})
    assert got.status == 99, got
    assert notes.read_text().splitlines()[-1] == "vm list"


@pytest.mark.parametrize(
    ("reply", "status", "words"),
    [
        pytest.param(
            {"error": {"code": 4, "message": "QEMU said no", "data": {"exit": 4}}},
            4,
            "qmpnet: error: QEMU said no",
            id="an-error-after-it-may-have-acted",
        ),
        pytest.param({"result": [1]}, EXIT_SERVICE, "not cli.exec's", id="not-an-object"),
        pytest.param({"result": {"stdout": "x"}}, EXIT_SERVICE, "without an exit", id="no-exit"),
    ],
)
def test_an_error_the_service_may_have_acted_before_is_said_never_run_again(
    probed: tuple[Path, Path], tmp_path: Path, reply: dict[str, Any], status: int, words: str
) -> None:
    front, notes = probed
    notes.unlink(missing_ok=True)
    path = tmp_path / "peer.sock"
    with peer(path, rpc(**reply)):
        got = run(front, "vm", "list", env={"QMPNET_SOCKET": str(path)})
    assert got.status == status, got
    [line] = got.err.splitlines()
    assert words in line, line
    assert not notes.exists()


def test_the_front_sends_the_files_it_is_asked_for(compiled: Path, tmp_path: Path) -> None:
    """The stand-in asks for the interface file; the front's second request carries it (base64),
    and a file it cannot read goes as its errno."""
    path = tmp_path / "peer.sock"
    (tmp_path / "eth1.json").write_bytes(b'{"name": "eth1"}\xff')
    requests: list[Any] = []
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            for reply in (
                {"read": ["eth1.json"]},
                {"read": ["absent.json"]},
                {"exit": 5, "stdout": "out\n", "stderr": "err\n"},
            ):
                requests.append(json.loads(lines.readline()))
                body = {"jsonrpc": "2.0", "id": requests[-1]["id"], "result": reply}
                conn.sendall(json.dumps(body).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        got = run(
            compiled, "add-iface", "eth1.json", cwd=tmp_path, env={"QMPNET_SOCKET": str(path)}
        )
    finally:
        thread.join(5)
        server.close()
    assert got == Run(5, "out\n", "err\n")
    sent = {"data": base64.b64encode((tmp_path / "eth1.json").read_bytes()).decode()}
    assert [r["params"]["files"] for r in requests] == [
        {},
        {"eth1.json": sent},
        {"eth1.json": sent, "absent.json": {"errno": errno.ENOENT}},
    ]
    assert {r["params"]["cwd"] for r in requests} == {str(tmp_path)}
