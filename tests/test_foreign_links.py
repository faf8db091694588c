"""Links that are not a sandbox's own, and namespaces that are not a sandbox's: refused, untouched.

A NetPair joins the link a CNI plugin made in a pod's netns. A link of another kind, a port of
a bridge, a link of the host's namespace (whatever path names it) is refused in the validate
step, before anything is made, and ``ip -j link``/``tc -j qdisc`` show it exactly as before.
What a plug changes on the link it joins (its admin state) is given back on unplug and undo.
The watcher and the CNI plugin refuse qmpnet's own namespace before any connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from qmpnet import cni
from qmpnet.cli import exit_code_for
from qmpnet.cli import main as cli_main
from qmpnet.config import Config
from qmpnet.endpoints import PlugContext, create_endpoint, net_info_from_interface
from qmpnet.endpoints.netpair import MODELS, NetPairEndpoint
from qmpnet.errors import InvalidInputError, NetnsError, PlugError, UnsupportedError
from qmpnet.hypervisor import QemuHypervisor
from qmpnet.lifecycle import Operation, Step
from qmpnet.links import Links
from qmpnet.model import TAP_MTU_MAX, InterfaceDescription, InterworkingModel
from qmpnet.netns import check_sandbox_netns
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.testing import probe
from qmpnet.testing.scene import unique
from qmpnet.tuntap import QueueFds
from qmpnet.watch import watch

pytestmark = [pytest.mark.kernel]

TC, MACVTAP, BRIDGED = (
    InterworkingModel.TCFILTER,
    InterworkingModel.MACVTAP,
    InterworkingModel.BRIDGED,
)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, capture_output=True, text=True, check=True)


def _ctx(allow_foreign_link: bool = False) -> PlugContext:
    # A session that never connects: a refusal comes before anything would need QEMU.
    session = QmpSession(QMPClient("unused"), "/nonexistent", 1.0, logging.getLogger("test"))
    return PlugContext(
        QemuHypervisor(session),
        Config(),
        Operation("hot-plug", "x"),
        allow_foreign_link=allow_foreign_link,
    )


def _endpoint(
    netns: str, name: str, link_type: str = "veth", model: InterworkingModel = TC
) -> NetPairEndpoint:
    desc = InterfaceDescription(name=name, link_type=link_type)
    ep = create_endpoint(
        net_info_from_interface(desc, model), 0, model, netns_path=netns, tap_name=unique("t")
    )
    assert isinstance(ep, NetPairEndpoint)
    return ep


def _view(netns: str) -> dict[str, Any]:
    """Every link of the netns and its qdiscs, as ``ip -d -j`` and ``tc -j`` show them.

    Without the root ``noqueue`` qdisc the kernel itself attaches the first time a link goes
    up (and keeps when it goes down): that is the kernel's, not a change of qmpnet's.
    """
    return {
        name: (
            {k: v for k, v in probe.stable_view(link).items() if k != "qdisc"},
            [q for q in probe.qdiscs(netns, name) if q.get("kind") != "noqueue"],
        )
        for name, link in probe.links(netns).items()
    }


async def _refused(ep: NetPairEndpoint, ctx: PlugContext | None = None) -> BaseException:
    ctx = ctx or _ctx()
    with pytest.raises(PlugError) as caught:
        async with ctx.op:
            await ep.hot_attach(ctx)
    assert [step for step, _ in ctx.op.history] == ["validate", "validate"]
    return caught.value.cause


# --- the link's kind, master and namespace ---------------------------------------------------


def _ns(netns: str) -> list[str]:
    return ["ip", "-n", probe.ns_name(netns), "link"]


def _bridge(netns: str) -> str:
    name = unique("b")
    sh(*_ns(netns), "add", name, "type", "bridge")
    return name


def _veth(netns: str, up: bool = False) -> str:
    name = unique("v")
    sh(*_ns(netns), "add", name, "type", "veth", "peer", "name", name + "p")
    if up:
        sh(*_ns(netns), "set", name, "up")
    return name


def _tap(netns: str) -> str:
    name = unique("u")
    sh("ip", "-n", probe.ns_name(netns), "tuntap", "add", name, "mode", "tap")
    return name


def _bridge_port(netns: str) -> str:
    name = _veth(netns)
    sh(*_ns(netns), "set", name, "master", _bridge(netns))
    return name


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("make", "link_type", "field"),
    [
        (_bridge, "veth", "kind of"),
        (_tap, "veth", "kind of"),
        (_veth, "macvlan", "kind of"),
        (_veth, "tuntap", "kind of"),
        (_bridge_port, "veth", "master of"),
    ],
    ids=["bridge", "tap-as-veth", "veth-as-macvlan", "veth-as-tuntap", "bridge-port"],
)
@pytest.mark.parametrize("model", [TC, MACVTAP, BRIDGED])
async def test_a_link_that_is_not_the_types_own_is_refused_untouched(
    netns: str,
    make: Callable[[str], str],
    link_type: str,
    field: str,
    model: InterworkingModel,
) -> None:
    name = make(netns)
    before = _view(netns)
    cause = await _refused(_endpoint(netns, name, link_type, model))
    assert isinstance(cause, InvalidInputError)
    assert cause.field.startswith(field)
    assert name in cause.field
    assert _view(netns) == before


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["", "/proc/self/ns/net"])
async def test_a_link_of_the_hosts_namespace_is_refused_untouched(
    host_link_names: Callable[[str], str], path: str
) -> None:
    name, peer = host_link_names("v"), host_link_names("w")
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", peer)
    before = {n: probe.stable_view(probe.links()[n]) for n in (name, peer)}
    qdiscs = probe.qdiscs("", name)
    cause = await _refused(_endpoint(path, name))
    assert isinstance(cause, InvalidInputError)
    assert cause.field == "netns"
    assert cause.value == path
    after = probe.links()
    assert {n: probe.stable_view(after[n]) for n in (name, peer)} == before
    assert probe.qdiscs("", name) == qdiscs


@pytest.mark.asyncio
async def test_a_bridge_port_is_joined_only_when_allowed_and_never_by_the_bridged_model(
    netns: str,
) -> None:
    name = _bridge_port(netns)
    settled = await _endpoint(netns, name).settle(allow_foreign_link=True)
    assert settled.found is not None
    before = _view(netns)
    cause = await _refused(_endpoint(netns, name, model=BRIDGED), _ctx(allow_foreign_link=True))
    assert isinstance(cause, UnsupportedError)
    assert "port of another master" in str(cause)
    assert _view(netns) == before


@pytest.mark.asyncio
async def test_a_link_with_an_ingress_qdisc_not_ours_is_refused_by_tcfilter(netns: str) -> None:
    name = _veth(netns)
    sh("tc", "-n", probe.ns_name(netns), "qdisc", "add", "dev", name, "ingress")
    before = _view(netns)
    cause = await _refused(_endpoint(netns, name))
    assert isinstance(cause, UnsupportedError)
    assert "ingress qdisc" in str(cause)
    assert _view(netns) == before


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "link_type"),
    [("veth", "veth"), ("macvlan", "macvlan"), ("tun", "tuntap")],
)
async def test_each_type_takes_its_own_kind(netns: str, kind: str, link_type: str) -> None:
    if kind == "tun":
        name = _tap(netns)
    elif kind == "macvlan":
        name = unique("m")
        sh(*_ns(netns), "add", name, "link", _veth(netns), "type", "macvlan")
    else:
        name = _veth(netns)
    ep = await _endpoint(netns, name, link_type).settle()
    assert ep.found is not None
    assert ep.found.index == probe.links(netns)[name]["ifindex"]
    assert ep.found.up is False


@pytest.mark.asyncio
async def test_a_link_mtu_no_tap_can_carry_is_refused_before_the_tap_is_made(netns: str) -> None:
    name = _veth(netns)
    sh(*_ns(netns), "set", name, "mtu", "65535")
    before = _view(netns)
    cause = await _refused(_endpoint(netns, name))
    assert isinstance(cause, InvalidInputError)
    assert cause.field == f"MTU of {name}"
    assert cause.value == 65535
    assert _view(netns) == before


# --- the admin state, given back ------------------------------------------------------------


async def _plug_host_side(ep: NetPairEndpoint) -> NetPairEndpoint:
    ep = await ep.settle()
    fds = QueueFds()
    async with Operation("hot-plug", ep.name) as op:
        await MODELS[ep.network_pair.model].connect(ep, op, 1, fds)
        op.commit()
    fds.close()
    return ep


def _up(netns: str, name: str) -> bool:
    return "UP" in probe.links(netns)[name]["flags"]


@pytest.mark.asyncio
@pytest.mark.parametrize("model", [TC, MACVTAP, BRIDGED])
@pytest.mark.parametrize("was_up", [False, True])
async def test_the_sandbox_link_gets_its_admin_state_back_on_unplug(
    netns: str, model: InterworkingModel, was_up: bool
) -> None:
    name = _veth(netns, up=was_up)
    before = probe.link_fingerprint(probe.links(netns)[name])
    ep = await _plug_host_side(_endpoint(netns, name, model=model))
    assert _up(netns, name)
    async with Operation("unplug", ep.name) as op:
        await ep.teardown(op)
        op.commit()
    assert probe.link_fingerprint(probe.links(netns)[name]) == before
    assert _up(netns, name) is was_up
    assert not probe.has_ingress(netns, name)


@pytest.mark.asyncio
@pytest.mark.parametrize("model", [TC, MACVTAP, BRIDGED])
async def test_an_undone_plug_leaves_a_down_link_down(netns: str, model: InterworkingModel) -> None:
    name = _veth(netns)
    before = _view(netns)
    ep = await _endpoint(netns, name, model=model).settle()
    fds = QueueFds()
    seen_up: list[bool] = []

    async def plug_then_fail() -> None:
        async with Operation("hot-plug", ep.name) as op:
            await MODELS[model].connect(ep, op, 1, fds)
            seen_up.append(_up(netns, name))

            async def later_step_fails() -> None:
                raise OSError(5, "a later step failed")

            await op.step(Step.NETDEV_ADD, later_step_fails)

    with pytest.raises(PlugError):
        await plug_then_fail()
    fds.close()
    assert seen_up == [True]
    assert _view(netns) == before


@pytest.mark.asyncio
async def test_a_link_that_replaced_the_down_one_is_left_up(netns: str) -> None:
    name = _veth(netns)
    ep = await _plug_host_side(_endpoint(netns, name))
    sh(*_ns(netns), "del", name)
    sh(*_ns(netns), "add", name, "type", "veth", "peer", "name", name + "q")
    sh(*_ns(netns), "set", name, "up")
    async with Operation("unplug", ep.name) as op:
        await ep.teardown(op)
        op.commit()
    assert _up(netns, name)


# --- taps: the kernel's MTU limit -----------------------------------------------------------


@pytest.mark.asyncio
async def test_the_tap_mtu_limit_is_the_kernels(netns: str) -> None:
    name = _tap(netns)
    async with Links.open(netns) as links:
        await links.set_mtu(name, TAP_MTU_MAX)
        assert (await links.get(name)).mtu == TAP_MTU_MAX
        with pytest.raises(Exception, match="EINVAL"):
            await links.set_mtu(name, TAP_MTU_MAX + 1)
    desc = InterfaceDescription(name="eth0", mtu=TAP_MTU_MAX + 1)
    none = InterworkingModel.NONE
    with pytest.raises(InvalidInputError) as caught:
        create_endpoint(net_info_from_interface(desc, none), 0, none)
    assert (caught.value.field, caught.value.value) == ("mtu", TAP_MTU_MAX + 1)
    desc = InterfaceDescription(name="eth0", mtu=TAP_MTU_MAX)
    create_endpoint(net_info_from_interface(desc, none), 0, none)


# --- qmpnet's own namespace, whatever path names it -----------------------------------------


@pytest.fixture
def own_netns_paths(tmp_path: Path) -> Iterator[list[str]]:
    """Paths of this process's netns: /proc/self, /proc/1 when init shares it, a bind mount."""
    paths = ["/proc/self/ns/net", f"/proc/{os.getpid()}/ns/net"]
    with contextlib.suppress(OSError):  # /proc/1 may be out of reach in a container
        if os.stat("/proc/1/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
            paths.append("/proc/1/ns/net")
    target = tmp_path / "hostns"
    target.touch()
    sh("mount", "--bind", "/proc/self/ns/net", str(target))
    paths.append(str(target))
    try:
        yield paths
    finally:
        sh("umount", str(target))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A unix socket that never answers: whether anything connected is read back after."""
    path = str(tmp_path / "qmp.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    sock.setblocking(False)
    try:
        yield path, sock
    finally:
        sock.close()


def _connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


def test_every_path_of_the_own_netns_is_refused(own_netns_paths: list[str], netns: str) -> None:
    for path in own_netns_paths:
        with pytest.raises(InvalidInputError) as caught:
            check_sandbox_netns(path)
        assert caught.value.value == path
    assert check_sandbox_netns(netns) == (os.stat(netns).st_dev, os.stat(netns).st_ino)


@pytest.mark.asyncio
async def test_watch_refuses_the_own_netns_before_connecting(
    own_netns_paths: list[str], listener: tuple[str, socket.socket], tmp_path: Path
) -> None:
    qmp, sock = listener
    for path in own_netns_paths:
        state = NetworkState.open(tmp_path / "state", qmp)
        with pytest.raises(InvalidInputError, match="own network namespace"):
            await asyncio.wait_for(watch(state, path), 10)
    assert not _connected(sock)
    assert not (tmp_path / "state").exists()


def test_the_cli_watch_exits_3_for_the_own_netns(
    own_netns_paths: list[str], listener: tuple[str, socket.socket], tmp_path: Path
) -> None:
    qmp, sock = listener
    for path in own_netns_paths:
        args = ["watch", "--qmp", qmp, "--state", str(tmp_path / "st"), "--netns", path]
        assert cli_main(args) == 3
    assert not _connected(sock)
    assert not (tmp_path / "st").exists()


def _not_a_netns(tmp_path: Path, kind: str) -> str:
    path = tmp_path / "notns"
    if kind == "file":
        path.write_text("")
    else:
        path.mkdir()
    return str(path)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_watch_on_a_netns_path_that_is_a_regular_file_exits_3(
    listener: tuple[str, socket.socket], tmp_path: Path, kind: str
) -> None:
    qmp, sock = listener
    path = _not_a_netns(tmp_path, kind)
    with pytest.raises(NetnsError):
        check_sandbox_netns(path)
    args = ["watch", "--qmp", qmp, "--state", str(tmp_path / "st"), "--netns", path]
    assert cli_main(args) == 3
    assert not _connected(sock)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["file", "directory"])
async def test_add_iface_on_a_netns_path_that_is_a_regular_file_is_bad_input(
    listener: tuple[str, socket.socket], tmp_path: Path, kind: str
) -> None:
    qmp, sock = listener
    path = _not_a_netns(tmp_path, kind)
    desc = InterfaceDescription(name="eth0", hw_addr="52:54:00:00:00:31")
    with pytest.raises(NetnsError) as caught:
        await NetworkState.open(tmp_path / "st", qmp).add_interface(desc, netns_path=path)
    assert exit_code_for(caught.value) == 3  # what add-iface exits with
    assert not _connected(sock)


def _cni_add(netns: str, qmp: str, tmp_path: Path, **conf: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "qmpnet-cni",
        "qmpSocket": qmp,
        "stateDir": str(tmp_path / "cni" / "{containerId}"),
        "timeouts": {"connect": 0.3},
        "prevResult": {"cniVersion": "1.0.0", "interfaces": [], "ips": []},
    }
    data.update(conf)
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "pod1",
        "CNI_NETNS": netns,
        "CNI_IFNAME": unique("e"),
        "CNI_PATH": "/usr/lib/cni",
    }
    status, out = cni.run(
        json.dumps({k: v for k, v in data.items() if v is not None}).encode(), env
    )
    assert status != 0
    reply: dict[str, Any] = json.loads(out)
    return reply


@pytest.mark.parametrize("mode", ["chained", "main"])
def test_the_cni_refuses_the_own_netns_before_connecting(
    own_netns_paths: list[str], listener: tuple[str, socket.socket], tmp_path: Path, mode: str
) -> None:
    qmp, sock = listener
    extra: dict[str, Any] = {"model": "none", "prevResult": None} if mode == "main" else {}
    for path in own_netns_paths:
        reply = _cni_add(path, qmp, tmp_path, **extra)
        assert reply["code"] == cni.Code.INVALID_ENV, reply
        assert "CNI_NETNS" in reply["msg"]
    assert not _connected(sock)
    assert not (tmp_path / "cni").exists()


def test_cni_main_mode_may_use_the_host_netns_when_its_config_says_so(
    listener: tuple[str, socket.socket], tmp_path: Path
) -> None:
    qmp, sock = listener
    main = {"model": "none", "prevResult": None, "allowHostNetns": True}
    reply = _cni_add("/proc/self/ns/net", qmp, tmp_path, **main)
    # past the netns check: it went on to the monitor, which never greets
    assert reply["code"] == cni.Code.TRY_AGAIN, reply
    assert _connected(sock)
    chained = _cni_add("/proc/self/ns/net", qmp, tmp_path, allowHostNetns=True)
    assert chained["code"] == cni.Code.INVALID_CONFIG
    assert "allowHostNetns" in chained["msg"]
    with contextlib.suppress(BlockingIOError):
        sock.accept()
