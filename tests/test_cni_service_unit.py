"""qmpnet-cni's forwarding to qmpnetd, and the service's record of pending attachments."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmpnet.cni.entry import FORWARDED, TRY_AGAIN, forward, service_socket
from qmpnet.cni.request import Deferred, NetConf
from qmpnet.cni.spec import DEBUG_ENV, Code
from qmpnet.errors import DeniedError
from qmpnet.service.auth import Peer, Role
from qmpnet.service.cni import PENDING_FILE, CniHost, Waiting, listening
from qmpnet.service.methods import Caller, Params, Service
from qmpnet.service.protocol import DEFAULT_SOCKET
from qmpnet.service.registry import Registry

PLUGIN = Path(sys.executable).with_name("qmpnet-cni")
EXAMPLES = Path(__file__).parent.parent / "examples" / "cni"


def test_the_configuration_names_the_service_socket_or_the_default() -> None:
    assert service_socket(b'{"type": "qmpnet-cni"}') == DEFAULT_SOCKET
    assert service_socket(b'{"qmpnetd": "/run/x/s.sock"}') == "/run/x/s.sock"
    # "" is the direct mode; what cannot be read is left to the full path to report
    for raw in (b'{"qmpnetd": ""}', b'{"qmpnetd": "rel/s.sock"}', b"not json", b"[1]"):
        assert service_socket(raw) == ""


def test_the_thin_plugins_codes_and_variables_are_the_plugins_own() -> None:
    """entry.py is standard library only, so it restates two of the plugin's names."""
    assert TRY_AGAIN == Code.TRY_AGAIN
    assert DEBUG_ENV in FORWARDED


def test_a_stale_socket_is_no_service(tmp_path: Path) -> None:
    """A socket file nobody listens on (a service killed without cleanup): direct mode."""
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # bound, never listening: connect is refused
    assert not listening(str(path))
    assert forward(str(path), b'{"cniVersion": "1.0.0"}') is None


def test_a_stale_service_socket_falls_back_to_the_direct_mode_and_its_errors(
    tmp_path: Path,
) -> None:
    """The whole plugin process: the direct mode answers, with the spec's error JSON."""
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "qmpnet-cni", "qmpnetd": str(path)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "QMPNET_"))}
    done = subprocess.run(
        [str(PLUGIN)],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        env={**env, "CNI_COMMAND": "ADD", "CNI_PATH": "/usr/lib/cni"},
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert answer["code"] == 4  # CNI_CONTAINERID missing, named
    assert "CNI_CONTAINERID" in answer["msg"]
    assert done.stderr == ""


def test_a_pending_attachment_survives_its_json() -> None:
    waiting = Waiting(
        network="n",
        container_id="c1",
        ifname="eth0",
        netns="/run/netns/p",
        qmp="",
        stdin='{"cniVersion": "1.0.0"}',
        environ={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1"},
        mac="52:54:00:00:00:01",
        got={"ips": [{"address": "169.254.1.5/24"}]},
        status=Deferred.FAILED,
        error="code 105: no interface eth0",
    )
    assert Waiting.from_json(json.loads(json.dumps(waiting.to_json()))) == waiting
    assert waiting.view()["status"] == "failed"


@pytest.mark.asyncio
async def test_pending_attachments_are_kept_under_the_root_and_dropped(tmp_path: Path) -> None:
    host = CniHost(Registry(str(tmp_path)))
    waiting = Waiting(
        network="n",
        container_id="c1",
        ifname="eth0",
        netns="/run/netns/p",
        qmp="",
        stdin="{}",
        environ={},
        mac="52:54:00:00:00:01",
    )
    await host.keep(waiting)
    assert (tmp_path / PENDING_FILE).stat().st_mode & 0o077 == 0
    again = CniHost(Registry(str(tmp_path)))
    again.load()
    assert again.waiting == {waiting.key: waiting}
    assert await again.drop(waiting.key)
    assert not await again.drop(waiting.key)
    third = CniHost(Registry(str(tmp_path)))
    third.load()
    assert third.waiting == {}


def test_an_unreadable_pending_file_is_reported_and_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / PENDING_FILE).write_text("{not json")
    host = CniHost(Registry(str(tmp_path)))
    host.load()
    assert host.waiting == {}
    assert "unreadable" in caplog.text
    assert (tmp_path / PENDING_FILE).read_text() == "{not json"


@pytest.mark.asyncio
async def test_only_root_may_run_cni_commands_in_the_service(tmp_path: Path) -> None:
    service = Service(Registry(str(tmp_path)), str(tmp_path / "s.sock"))
    member = Caller(Peer(pid=1, uid=65534, gid=65534), Role.MEMBER)
    with pytest.raises(DeniedError, match="only root runs CNI plugins"):
        await service.cni_exec(Params({"environ": {}, "stdin": "{}"}), member)
    assert not (tmp_path / PENDING_FILE).exists()


@pytest.mark.asyncio
async def test_a_forwarded_invocation_gets_the_same_checks_and_errors(tmp_path: Path) -> None:
    service = Service(Registry(str(tmp_path)), str(tmp_path / "s.sock"))
    root = Caller(Peer(pid=1, uid=0, gid=0), Role.ROOT)
    got = await service.cni_exec(
        Params(
            {
                "environ": {
                    "CNI_COMMAND": "ADD",
                    "CNI_CONTAINERID": "bad id",
                    "CNI_NETNS": "/run/netns/x",
                    "CNI_IFNAME": "eth0",
                    "CNI_PATH": "/x",
                },
                "stdin": "{}",
            }
        ),
        root,
    )
    assert got["exit"] == 1
    assert json.loads(got["stdout"])["code"] == 4
    assert "CNI_CONTAINERID" in json.loads(got["stdout"])["msg"]
    assert os.listdir(tmp_path) == []  # nothing made


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.conflist")), ids=lambda p: p.name)
def test_the_example_conflists_are_valid(path: Path) -> None:
    """Each qmpnet-cni entry, as the runtime hands it over (the list's version and name)."""
    conflist = json.loads(path.read_text())
    ours = [p for p in conflist["plugins"] if p["type"] == "qmpnet-cni"]
    assert ours, path
    for plugin in ours:
        conf = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        parsed = NetConf.parse(json.dumps(conf).encode(), "DEL")
        assert parsed.name == conflist["name"]
        assert parsed.qmpnetd in ("", DEFAULT_SOCKET)


@pytest.mark.asyncio
async def test_without_inotify_a_pending_socket_is_still_seen_by_the_slow_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """inotify instances are a host-wide limit a test must not use up, so its exhaustion is
    simulated (the one stand-in here); the socket that appears is a real listening one."""
    import asyncio
    import errno

    import asyncinotify

    def exhausted() -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(asyncinotify, "Inotify", exhausted)
    host = CniHost(Registry(str(tmp_path / "root")))
    path = tmp_path / "vm" / "qmp.sock"
    waiting = Waiting(
        network="n",
        container_id="c1",
        ifname="eth0",
        netns="/run/netns/none",
        qmp=str(path),
        stdin="{}",  # not a configuration: the plug, once tried, fails and is kept as failed
        environ={},
        mac="52:54:00:00:00:01",
    )
    await host.keep(waiting)
    host.start()
    try:
        await asyncio.sleep(0.1)
        assert host.waiting[waiting.key].status is Deferred.PENDING
        path.parent.mkdir()
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.listen()
        try:
            for _ in range(100):  # up to 10 s: the look comes every 2 s
                if host.waiting[waiting.key].status is not Deferred.PENDING:
                    break
                await asyncio.sleep(0.1)
        finally:
            sock.close()
    finally:
        await host.close()
    assert host.waiting[waiting.key].status is Deferred.FAILED
    assert "no inotify" in caplog.text
