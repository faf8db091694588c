"""The service's pieces without QEMU: who may call, how params are read, how errors travel."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from qmpnet import layout
from qmpnet.errors import DeniedError, InvalidInputError, PlugError, QmpCommandError
from qmpnet.service import protocol
from qmpnet.service.auth import Authority, Peer, Role, netns_allowed
from qmpnet.service.methods import Caller, Params, Service
from qmpnet.service.registry import Registry
from qmpnet.service.server import Server, wire_error


def test_roles_root_member_and_anyone_else() -> None:
    auth = Authority(group=4242)
    assert auth.role(Peer(1, 0, 0)) is Role.ROOT
    assert auth.role(Peer(1, 1000, 4242)) is Role.MEMBER
    assert auth.role(Peer(1, 1000, 1000, frozenset({4242}))) is Role.MEMBER
    assert auth.role(Peer(1, 1000, 1000, frozenset({7}))) is Role.NONE
    assert Authority().role(Peer(1, 1000, 4242)) is Role.NONE


def test_the_peer_is_the_kernels_word() -> None:
    a, b = socket.socketpair()
    with a, b:
        peer = Peer.of(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_a_member_may_name_only_run_netns_or_the_sandbox() -> None:
    assert netns_allowed("/run/netns/pod1", frozenset())
    assert not netns_allowed("/proc/1/ns/net", frozenset())
    assert not netns_allowed("/run/netns/../netns-evil/x", frozenset())
    assert netns_allowed("/var/run/sandbox/ns", frozenset({"/var/run/sandbox/ns"}))


def test_params_are_typed_and_leftovers_refused() -> None:
    p = Params({"qmp": "/x", "queues": 2, "wait_guest": True, "protocol": 1, "colour": "red"})
    assert p.text("qmp") == "/x"
    assert p.count("queues") == 2
    assert p.flag("wait_guest") is True
    with pytest.raises(InvalidInputError) as caught:
        p.done()
    assert caught.value.value == "colour"
    with pytest.raises(InvalidInputError, match="must be an integer"):
        Params({"queues": True}).count("queues")
    with pytest.raises(InvalidInputError, match="must be a string"):
        Params({"qmp": 3}).text("qmp")


def test_error_codes_map_to_exit_classes() -> None:
    assert protocol.exit_of_code(3) == 3
    assert protocol.exit_of_code(protocol.INVALID_PARAMS) == 3
    assert protocol.exit_of_code(protocol.PROTOCOL_MISMATCH) == 10
    assert protocol.exit_of_code(-32099) == 1


def test_an_errors_fields_travel_with_it() -> None:
    cause = QmpCommandError("device_add", {"id": "d"}, "GenericError", "no slot")
    wire = wire_error(PlugError("hot-plug", "device-add", "eth1", cause))
    assert wire["type"] == "PlugError"
    assert wire["exit"] == 4
    assert wire["fields"]["step"] == "device-add"
    assert wire["fields"]["cause"] == {"type": "QmpCommandError", "message": str(cause)}
    json.dumps(wire)


def test_a_stale_hold_is_ignored(tmp_path: Path) -> None:
    root, qmp = str(tmp_path), str(tmp_path / "qmp.sock")
    layout.write_hold(root, qmp)
    assert layout.holder(root, qmp) is None  # our own
    path = Path(layout.hold_path(root, qmp))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "pid": 1, "start_time": -1}))  # pid 1 started otherwise
    assert layout.holder(root, qmp) is None
    path.write_text(json.dumps({**data, "pid": 1, "start_time": layout._start_time(1)}))
    assert layout.holder(root, qmp) == 1
    layout.drop_hold(root, qmp)
    assert layout.holder(root, qmp) is None


@pytest.mark.asyncio
async def test_anyone_else_is_refused_before_anything_happens(tmp_path: Path) -> None:
    service = Service(Registry(str(tmp_path / "root")), str(tmp_path / "s.sock"))
    server = Server(service, Authority())
    line = protocol.encode(protocol.request("vm.list", {}, 7))
    reply = await server._reply(line, Caller(Peer(1, 65534, 65534), Role.NONE))
    assert reply["id"] == 7
    assert reply["error"]["code"] == 12
    assert reply["error"]["data"]["refused_caller"] is True
    assert reply["error"]["data"]["type"] == DeniedError.__name__
    assert not (tmp_path / "root").exists()


def test_the_thin_clients_copies_of_constants_agree() -> None:
    """cli keeps these without importing their modules (start-up cost): they must not drift."""
    from qmpnet import cli
    from qmpnet.boundary import DOCUMENT_MAX

    assert cli.STATE_ROOT == layout.DEFAULT_ROOT
    assert cli._READ_MAX == DOCUMENT_MAX + 1


@pytest.mark.asyncio
async def test_status_does_not_count_itself_in_flight(tmp_path: Path) -> None:
    import asyncio

    service = Service(Registry(str(tmp_path)), str(tmp_path / "s.sock"))
    root = Caller(Peer(pid=1, uid=0, gid=0), Role.ROOT)
    other = asyncio.Event()
    busy = asyncio.create_task(other.wait())  # another request, still running
    work = asyncio.create_task(service.status(Params({}), root))
    service.inflight |= {busy, work}
    got = await work
    assert got["requests_in_flight"] == 1
    other.set()
    await busy
