"""The compiled ``qmpnet-cni`` front (contrib/cni-shim) answers as the Python front does.

Both fronts get the same stdin and environment, and their exit status, stdout (as JSON) and
stderr are compared: VERSION, the direct mode they fall back to, a real qmpnetd, and the
protocol's edges. A service that dies between request and reply, or answers nonsense, cannot be
made to on cue by the real qmpnetd; those cases use a one-shot socket peer that plays it, and
say so.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from qmpnet.cni.entry import FORWARDED, TRY_AGAIN
from qmpnet.cni.versions import READ_MAX, SUPPORTED_VERSIONS
from qmpnet.service.protocol import DEFAULT_SOCKET, LINE_MAX, PROTOCOL_VERSION
from qmpnet.testing.cli import run_qmpnet
from qmpnet.testing.gobuild import PYTHON_PLUGIN, SHIM_SOURCE, cni_shim
from qmpnet.testing.scene import del_link, unique
from qmpnet.testing.scene import run as host
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.standin import peer, rpc

FRONTS = ("python", "compiled")


@pytest.fixture(scope="module")
def compiled() -> Path:
    return cni_shim()


@attrs.frozen
class Run:
    status: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out) if self.out.strip() else None


def run(binary: Path, stdin: bytes, **env: str) -> Run:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    done = subprocess.run(
        [str(binary)],
        check=False,
        input=stdin,
        env={**base, **env},
        capture_output=True,
        timeout=60,
    )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def both(compiled: Path, stdin: bytes, **env: str) -> Run:
    """Run both fronts; they must agree, and the answer is returned for further checks."""
    python, go = run(PYTHON_PLUGIN, stdin, **env), run(compiled, stdin, **env)
    assert go.status == python.status, (python, go)
    assert unparsed(go.json) == unparsed(python.json), (python, go)
    assert go.err == python.err, (python, go)
    return go


def unparsed(doc: Any) -> Any:
    """An error without its JSON parser's own words (Go's and Python's differ)."""
    if isinstance(doc, dict) and "unreadable reply: " in str(doc.get("msg")):
        return {**doc, "msg": doc["msg"].split("unreadable reply: ")[0]}
    return doc


def conf(**fields: Any) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "qmpnet-cni", **fields}).encode()


def test_the_fronts_restate_the_same_constants() -> None:
    """main.go is standard library Go: it restates these names; pin them to the Python ones."""
    source = SHIM_SOURCE.read_text()
    versions = re.search(r"supportedVersions = \[\]string\{([^}]*)\}", source)
    assert versions, "supportedVersions"
    assert tuple(json.loads(f"[{versions[1]}]")) == SUPPORTED_VERSIONS
    for name, value in (
        ("readMax", READ_MAX),
        ("lineMax", LINE_MAX),
        ("protocolVersion", PROTOCOL_VERSION),
        ("tryAgain", TRY_AGAIN),
    ):
        found = re.search(rf"^\s*{name}\s*=\s*(.+)$", source, re.M)
        assert found, name
        assert eval(found[1]) == value, name  # our own integer literals
    assert f'defaultSocket   = "{DEFAULT_SOCKET}"' in source
    forwarded = re.search(r"forwarded = \[\]string\{([^}]*)\}", source)
    assert forwarded, "forwarded"
    assert tuple(json.loads(f"[{forwarded[1].strip().rstrip(',')}]")) == FORWARDED


@pytest.mark.parametrize(
    "stdin",
    [
        b"",
        b"not json",
        b"[1]",
        b'{"cniVersion": "0.4.0"}',
        b'{"cniVersion": "9.9.9"}',
        b'{"cniVersion": 1}',
        b'{"cniVersion": "0.3.1", "name": "\xff"}',
    ],
)
def test_version_is_the_same_from_both_fronts(compiled: Path, stdin: bytes) -> None:
    # libcni's version query, with its dummy variables
    got = both(compiled, stdin, CNI_COMMAND="VERSION", CNI_NETNS="dummy", CNI_PATH="dummy")
    assert got.status == 0
    assert got.json["supportedVersions"] == list(SUPPORTED_VERSIONS)


@pytest.mark.parametrize(
    ("env", "stdin"),
    [
        ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "bad/id"}, conf(qmpnetd="")),
        ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x"}, b"not json"),
        ({"CNI_COMMAND": "BOGUS"}, conf(qmpnetd="")),
        ({"CNI_COMMAND": "DEL", "CNI_IFNAME": "eth0"}, conf(qmpnetd="")),
        ({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1"}, conf(model="x", qmpnetd="")),
        ({"CNI_COMMAND": "ADD"}, b'{"cniVersion": "1.0.0", "name": "n", "type": "qmpnet-cni"'),
    ],
)
def test_the_direct_mode_is_the_python_plugins_own(
    compiled: Path, env: dict[str, str], stdin: bytes
) -> None:
    """No service (``"qmpnetd": ""``, unreadable config, or nothing at the default socket):
    the compiled front runs the Python plugin on the same stdin, so every error is its own."""
    if os.path.exists(DEFAULT_SOCKET):
        pytest.fail(f"{DEFAULT_SOCKET} exists: this test needs a node without a qmpnetd there")
    got = both(compiled, stdin, **env)
    assert got.status != 0, got
    assert got.json["code"] not in (None, TRY_AGAIN), got


def test_a_stale_socket_is_the_direct_mode(compiled: Path, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # bound, never listening: connect is refused
    got = both(compiled, conf(qmpnetd=str(path)), CNI_COMMAND="ADD", CNI_CONTAINERID="a b")
    assert got.json["code"] == 4, got
    assert "CNI_NETNS" in got.json["msg"], got


# --- a real qmpnetd ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_through_a_real_qmpnetd_both_fronts_get_the_services_answers(
    compiled: Path, tmp_path: Path
) -> None:
    async with await ServiceProcess.start(tmp_path / "svc") as svc:
        stdin = conf(qmpnetd=str(svc.socket))
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"}
        got = both(compiled, stdin, **env, CNI_NETNS=str(tmp_path / "no-such-netns"))
        assert got.json["code"] not in (None, TRY_AGAIN), got
        # a DEL of what was never added is fine
        assert both(compiled, stdin, **{**env, "CNI_COMMAND": "DEL"}) == Run(0, "", "")
    assert svc.returncode == 0, svc.tail()


@pytest.mark.kernel
@pytest.mark.asyncio
async def test_the_compiled_front_keeps_a_pods_first_network_pending_in_qmpnetd(
    compiled: Path, tmp_path: Path
) -> None:
    """Only the service can answer this ADD at once (its VM is not there yet): proof that the
    compiled front forwarded it; its DEL cancels it there."""
    name = unique("s")
    netns = f"{name}n"
    host("ip", "netns", "add", netns)
    try:
        host("ip", "link", "add", f"{name}h", "type", "veth", "peer", "eth0", "netns", netns)
        mac = json.loads(host("ip", "-j", "-n", netns, "link", "show", "eth0").stdout)[0]["address"]
        prev = {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": mac, "sandbox": f"/run/netns/{netns}"}],
            "ips": [],
        }
        async with await ServiceProcess.start(tmp_path / "svc") as svc:
            state = f"{tmp_path}/cni/{{containerId}}"
            stdin = conf(qmpnetd=str(svc.socket), prevResult=prev, stateDir=state)
            env = {
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": name,
                "CNI_IFNAME": "eth0",
                "CNI_NETNS": f"/run/netns/{netns}",
            }
            got = run(compiled, stdin, **env)
            assert (got.status, got.err) == (0, ""), got
            assert got.json == prev
            (waiting,) = (await status(svc))["pending_attachments"]
            assert (waiting["container_id"], waiting["status"]) == (name, "pending")
            assert run(compiled, stdin, **{**env, "CNI_COMMAND": "DEL"}) == Run(0, "", "")
            assert (await status(svc))["pending_attachments"] == []
        assert svc.returncode == 0, svc.tail()
    finally:
        host("ip", "netns", "del", netns)
        del_link(f"{name}h")


async def status(svc: ServiceProcess) -> Any:
    done = await run_qmpnet("status", "--json", env=svc.env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- the protocol's edges, played by a one-shot peer ----------------------------------------

ADD = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "K=V",
    "CNI_PATH": "/opt/cni/bin",
    "QMPNET_CNI_DEBUG": "1",
    "NOT_FORWARDED": "secret",
}


AGAIN = Run(1, "TRY_AGAIN", "")  # the spec's code 11, in the configuration's version


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        pytest.param(
            rpc({"exit": 0, "stdout": '{"cniVersion": "0.4.0"}', "stderr": ""}),
            Run(0, '{"cniVersion": "0.4.0"}\n', ""),
            id="ok",
        ),
        pytest.param(
            rpc({"exit": 7, "stdout": '{"code": 7}', "stderr": "logged\n"}),
            Run(7, '{"code": 7}\n', "logged\n"),
            id="fail",
        ),
        pytest.param(rpc({"stdout": "{}"}), Run(1, "{}\n", ""), id="no-exit"),
        pytest.param(rpc([1, 2]), AGAIN, id="not-an-object"),
        pytest.param(rpc(error={"code": -32000, "message": "monitor held"}), AGAIN, id="error"),
        pytest.param(lambda line: None, AGAIN, id="died"),
        pytest.param(lambda line: b"{nonsense\n", AGAIN, id="unreadable"),
    ],
)
def test_both_fronts_send_the_same_request_and_read_the_reply_alike(
    compiled: Path, tmp_path: Path, answer: Callable[[bytes], bytes | None], expected: Run
) -> None:
    path = tmp_path / "peer.sock"
    stdin = conf(qmpnetd=str(path), cniVersion="0.4.0")
    with peer(path, answer) as seen:
        got = both(compiled, stdin, **ADD)
    python, go = seen
    assert go == python
    assert go["method"] == "cni.exec"
    assert go["params"]["stdin"] == stdin.decode()
    assert set(go["params"]["environ"]) == set(FORWARDED)
    if expected is AGAIN:
        assert got.status == 1, got
        assert got.json["code"] == TRY_AGAIN, got
        assert got.json["cniVersion"] == "0.4.0", got
        assert f"qmpnetd at {path}" in got.json["msg"], got
    else:
        assert got == expected


def test_a_caller_the_service_refuses_runs_the_direct_mode(compiled: Path, tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    refused = rpc(error={"code": -32001, "message": "no", "data": {"refused_caller": True}})
    with peer(path, refused):
        got = both(compiled, conf(qmpnetd=str(path)), CNI_COMMAND="ADD", CNI_CONTAINERID="a b")
    assert got.json["code"] == 4, got
    assert "CNI_NETNS" in got.json["msg"], got
