"""qmpnet-cni driven exactly as a container runtime drives a CNI plugin, against a real VM.

Every call execs the installed ``qmpnet-cni`` console script, found by its ``type`` in
``CNI_PATH`` next to Debian's ``bridge`` and ``host-local`` (as libcni finds plugins), with
the ``CNI_*`` variables and the network configuration on stdin; chained calls get the
previous plugin's result as ``prevResult``, DEL runs the list in reverse. What happened is
checked with independent tools: the guest's serial markers, ``ip``/``tc`` in the pod netns,
QEMU's other monitor (the one a VM manager holds, never the one qmpnet uses), ``ping``, and
host-local's reservation files.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio

from qmpnet.marks import claimed_owner
from qmpnet.testing.cni import Pod, free_link_local_byte, ipam_files, ping_until, pod_network
from qmpnet.testing.guest import GuestImage, guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.probe import ip_json, links, manager_device_del, owned_links, qemu_view
from qmpnet.testing.probe import monitor_command as hmp
from qmpnet.testing.scene import RUN, run, unique
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel]

PLUGIN = Path(sys.executable).with_name("qmpnet-cni")
DEBIAN_CNI = Path("/usr/lib/cni")
VERSION = "1.0.0"  # what Debian's bridge and host-local speak; the list's version
GUEST = 90.0  # generous: TCG guests on a shared 2-core machine
#: busybox (a declared dependency) has ping; the host may have no iputils.
PING = ("busybox", "ping", "-c", "1", "-W", "1")


# --- what a runtime does ------------------------------------------------------------------


@attrs.frozen
class Reply:
    status: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    def error(self, debug: bool = False) -> dict[str, Any]:
        """The spec's error object; a failure must print exactly that on stdout.

        A traceback may reach stderr only in debug mode, never stdout.
        """
        assert self.status != 0, self
        reply = self.json
        assert set(reply) <= {"cniVersion", "code", "msg", "details"}, reply
        assert isinstance(reply["code"], int)
        assert reply["msg"]
        assert "Traceback" not in self.out + ("" if debug else self.err)
        return dict(reply)


@attrs.frozen
class Runtime:
    """The parts of libcni a test needs: find the plugin in CNI_PATH, set env, pipe JSON."""

    cni_path: Path

    async def call(
        self,
        command: str,
        conf: dict[str, Any],
        *,
        container: str = "",
        netns: str = "",
        ifname: str = "",
        args: str = "",
        extra_env: dict[str, str] | None = None,
    ) -> Reply:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "QMPNET_"))}
        env.update(
            {
                "CNI_COMMAND": command,
                "CNI_CONTAINERID": container,
                "CNI_NETNS": netns,
                "CNI_IFNAME": ifname,
                "CNI_ARGS": args,
                "CNI_PATH": str(self.cni_path),
            }
        )
        env.update(extra_env or {})
        proc = await asyncio.create_subprocess_exec(
            str(self.cni_path / conf.get("type", "qmpnet-cni")),
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(conf).encode()), 300)
        return Reply(proc.returncode or 0, out.decode(), err.decode())

    async def ok(self, command: str, conf: dict[str, Any], **kw: Any) -> Any:
        """A call that must succeed: ADD prints a result, the others print nothing."""
        reply = await self.call(command, conf, **kw)
        assert reply.status == 0, reply
        assert reply.err == "", reply  # no logs on stderr unless asked for
        if command == "ADD":
            return reply.json
        assert reply.out == "", reply
        return None


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    """A CNI_PATH with the Debian plugins and the installed console script, as on a node."""
    assert PLUGIN.exists(), f"{PLUGIN} missing: pip install -e ."
    bin_dir = tmp_path / "cni-bin"
    bin_dir.mkdir()
    for name in ("bridge", "host-local"):
        (bin_dir / name).symlink_to(DEBIAN_CNI / name)
    (bin_dir / "qmpnet-cni").symlink_to(PLUGIN)
    return Runtime(bin_dir)


def chained(pod: Pod, **fields: Any) -> dict[str, Any]:
    """qmpnet-cni's entry of the pod's list, as the runtime passes it after ``bridge``."""
    conf: dict[str, Any] = {
        "cniVersion": pod.config["cniVersion"],
        "name": pod.config["name"],
        "type": "qmpnet-cni",
        "prevResult": pod.result.raw,
    }
    conf.update(fields)
    return conf


# --- independent views ----------------------------------------------------------------------


def ns(path: str) -> str:
    return Path(path).name


def qdisc_kinds(netns: str, dev: str) -> set[str]:
    return {q["kind"] for q in ip_tc("qdisc", "show", "dev", dev, netns=netns)}


def ip_tc(*args: str, netns: str) -> list[dict[str, Any]]:
    import subprocess

    out = subprocess.run(
        ["tc", "-j", "-n", ns(netns), *args], capture_output=True, text=True, check=False
    )
    return list(json.loads(out.stdout or "[]")) if out.returncode == 0 else []


async def sh(*cmd: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


def mac_ending(last: int) -> str:
    return f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{last:02x}"


# --- the pod's VM -----------------------------------------------------------------------------


@attrs.frozen
class PodVM:
    """One booted guest, reachable as a runtime would find it: by container id."""

    vm: GuestVM
    #: the VM's directory name, used as the CNI container id: the template finds the socket.
    container: str
    qmp_template: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pod_vm(
    guest_image: GuestImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[PodVM]:
    vm = await GuestVM.start(
        guest_image, tmp_path_factory.mktemp("vms"), root_ports=8, name=f"{RUN}pod"
    )
    try:
        yield PodVM(vm, vm.workdir.name, f"{vm.workdir.parent}/{{containerId}}/qmp2.sock")
    finally:
        await vm.stop()


@pytest.fixture
def state_template(tmp_path: Path) -> str:
    return f"{tmp_path}/state/{{containerId}}"


def socket_template(pod_vm: PodVM, container: str, tmp_path: Path) -> str:
    """Where a VM manager put the pod's monitor, by container id: a link to the VM's socket.

    Chained tests reuse the booted VM for pods whose container id the bridge plugin already
    knows; a runtime uses one container id for the whole list.
    """
    where = tmp_path / "vms" / container
    where.mkdir(parents=True)
    (where / "qmp2.sock").symlink_to(pod_vm.vm.mgmt_qmp_path)
    return f"{tmp_path}/vms/{{containerId}}/qmp2.sock"


def state_of(template: str, container: str) -> Path:
    return Path(template.replace("{containerId}", container))


@pytest.fixture
def pod_prefix() -> str:
    return unique("p")


# --- VERSION and errors (no VM) -----------------------------------------------------------


@pytest.mark.asyncio
async def test_version_answers_with_the_supported_versions(runtime: Runtime) -> None:
    reply = await runtime.call("VERSION", {"cniVersion": "1.1.0"})
    assert reply.status == 0
    assert reply.json["cniVersion"] == "1.1.0"
    assert {"1.0.0", "1.1.0"} <= set(reply.json["supportedVersions"])


BASE = {
    "cniVersion": VERSION,
    "name": "errnet",
    "type": "qmpnet-cni",
    "qmpSocket": "/nonexistent/{containerId}/qmp2.sock",
    "prevResult": {"cniVersion": VERSION, "interfaces": []},
}


@pytest.fixture
def lonely_netns(make_netns: Callable[[], str]) -> str:
    """A netns with a veth ``eth0``, as if a main plugin ran; no VM behind it."""
    path = make_netns()
    run("ip", "-n", ns(path), "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    return path


@pytest.mark.parametrize(
    ("conf", "env", "code", "words"),
    [
        ("{not json", {}, 6, "JSON"),
        ({**BASE, "cniVersion": "0.1.0"}, {}, 1, "version"),
        ({**BASE, "name": None}, {}, 7, "name"),
        ({**BASE, "model": "ovs"}, {}, 7, "ovs"),
        ({**BASE, "queues": -1}, {}, 7, "queues"),
        ({k: v for k, v in BASE.items() if k != "prevResult"}, {}, 7, "prevResult"),
        (BASE, {"CNI_NETNS": ""}, 4, "CNI_NETNS"),
        (BASE, {"CNI_IFNAME": "much-too-long-name"}, 4, "CNI_IFNAME"),
        (BASE, {"CNI_COMMAND": "ATTACH"}, 4, "CNI_COMMAND"),
        (BASE, {"CNI_NETNS": "/run/netns/no-such-netns"}, 3, "no-such-netns"),
        (BASE, {}, 100, "/nonexistent/"),
        (BASE, {"CNI_IFNAME": "eth7"}, 105, "eth7"),
    ],
)
@pytest.mark.asyncio
async def test_bad_input_gets_the_specs_error_json(
    runtime: Runtime,
    lonely_netns: str,
    state_template: str,
    conf: Any,
    env: dict[str, str],
    code: int,
    words: str,
) -> None:
    stdin = (
        conf
        if isinstance(conf, str)
        else {"stateDir": state_template, **{k: v for k, v in conf.items() if v is not None}}
    )
    defaults = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": f"{RUN}c",
        "CNI_NETNS": lonely_netns,
        "CNI_IFNAME": "eth0",
    }
    full = {**defaults, **env}
    if isinstance(stdin, str):
        reply = await _call_raw(runtime, stdin, full)
    else:
        reply = await runtime.call(full.pop("CNI_COMMAND"), stdin, extra_env=full)
    error = reply.error()
    assert error["code"] == code, error
    assert words in error["msg"], error
    assert reply.err == ""
    assert not state_of(state_template, f"{RUN}c").exists()


async def _call_raw(runtime: Runtime, stdin: str, env: dict[str, str]) -> Reply:
    proc = await asyncio.create_subprocess_exec(
        str(runtime.cni_path / "qmpnet-cni"),
        env={**os.environ, **env, "CNI_PATH": str(runtime.cni_path)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin.encode())
    return Reply(proc.returncode or 0, out.decode(), err.decode())


@pytest.mark.asyncio
async def test_debug_logs_go_to_stderr_and_a_log_file_never_stdout(
    runtime: Runtime, tmp_path: Path, lonely_netns: str, state_template: str
) -> None:
    log_file = tmp_path / "cni.log"
    conf = {**BASE, "logFile": str(log_file), "stateDir": state_template}
    reply = await runtime.call(
        "ADD",
        conf,
        container=f"{RUN}c",
        netns=lonely_netns,
        ifname="eth0",
        extra_env={"QMPNET_CNI_DEBUG": "1"},
    )
    assert reply.error(debug=True)["code"] == 100
    assert "ADD failed: code 100" in reply.err
    assert "ADD failed: code 100" in log_file.read_text()


@pytest.mark.asyncio
async def test_status_reports_readiness(runtime: Runtime, tmp_path: Path) -> None:
    main = {
        "cniVersion": "1.1.0",
        "name": "stnet",
        "type": "qmpnet-cni",
        "model": "none",
        "ipam": {
            "type": "host-local",
            "subnet": "169.254.3.0/24",
            "dataDir": str(tmp_path / "ipam"),
        },
    }
    await runtime.ok("STATUS", {**main, "model": "tcfilter", "ipam": None})
    await runtime.ok("STATUS", main)  # host-local has no STATUS (1.0 plugin): not asked
    missing = await runtime.call("STATUS", {**main, "ipam": {"type": "no-such-ipam"}})
    error = missing.error()
    assert error["code"] == 50
    assert "no-such-ipam" in error["msg"]
    old = (await runtime.call("STATUS", {**main, "cniVersion": "1.0.0"})).error()
    assert old["code"] == 1


# --- chained after bridge + host-local --------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_chained_add_plugs_the_pods_veth_and_traffic_flows_then_del_leaves_nothing(
    pod_vm: PodVM, runtime: Runtime, state_template: str, pod_prefix: str, tmp_path: Path
) -> None:
    vm = pod_vm.vm
    b = free_link_local_byte()
    mac = mac_ending(b)
    async with pod_network(
        pod_prefix,
        f"169.254.{b}.0/24",
        mac=mac,
        range_start=f"169.254.{b}.100",
        bridge_address=f"{host_ip_for_mac(mac)}/24",
    ) as pod:
        netns = f"/run/netns/{pod.netns}"
        conf = chained(
            pod,
            stateDir=state_template,
            qmpSocket=socket_template(pod_vm, pod.container_id, tmp_path),
        )
        call = {
            "container": pod.container_id,
            "netns": netns,
            "ifname": pod.ifname,
            "args": f"IgnoreUnknown=1;K8S_POD_NAME={pod_prefix}",
        }
        cursor = vm.console_cursor()
        result = await runtime.ok("ADD", conf, **call)
        try:
            # The result is bridge's, passed on: same interfaces (the veth is listed with its
            # sandbox and MAC already) and the address host-local chose.
            assert result == {**pod.result.raw, "cniVersion": VERSION}
            assert any(
                i.get("sandbox") == netns and i["mac"] == mac and i["name"] == "eth0"
                for i in result["interfaces"]
            )
            added = await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}\b", GUEST, since=cursor)
            guest_nic = added.group(0).split("name=")[1].split()[0]
            await vm.wait_for(rf"QMPNET NIC-ADDR name={guest_nic} ", GUEST, since=cursor)
            # Traffic from the bridge, through the veth, tc, the tap, into the guest; and the
            # guest's own ping of the bridge's address.
            await ping_until([*PING, "-I", pod.bridge, guest_ip_for_mac(mac)], GUEST)
            await vm.wait_for(
                rf"QMPNET PING name={guest_nic} peer={host_ip_for_mac(mac)} "
                "result=ok",
                GUEST,
                since=cursor,
            )
            ours = owned_links(netns)
            assert len(ours) == 1
            ((tap, owner),) = ours.items()
            assert "ingress" in qdisc_kinds(netns, "eth0")
            view = await qemu_view(vm.qmp_path)
            assert f"{owner}-dev" in view.devices
            assert f"{owner}-net" in view.netdevs
            state = state_of(state_template, pod.container_id)
            assert (state / "state.json").exists()
            # CHECK through the whole list, as the runtime does it.
            await runtime.ok("CHECK", {**pod.config, "prevResult": result}, **call)
            await runtime.ok("CHECK", {**conf, "prevResult": result}, **call)
        finally:
            cursor = vm.console_cursor()
            await runtime.ok("DEL", {**conf, "prevResult": result}, **call)
        await vm.wait_for(rf"QMPNET NIC-DEL name={guest_nic} mac={mac}", GUEST, since=cursor)
        assert not (await qemu_view(vm.qmp_path)).has_any_of(owner)
        assert tap not in {link["ifname"] for link in ip_json("link", "show", netns=pod.netns)}
        assert "ingress" not in qdisc_kinds(netns, "eth0")
        assert not state.exists()
        # The spec: DEL of what is gone succeeds, also without prevResult.
        await runtime.ok("DEL", {k: v for k, v in conf.items() if k != "prevResult"}, **call)
        assert not state.exists()


@pytest.mark.asyncio(loop_scope="module")
async def test_check_fails_when_qemu_lost_the_device_and_del_still_cleans_up(
    pod_vm: PodVM, runtime: Runtime, state_template: str, pod_prefix: str, tmp_path: Path
) -> None:
    vm = pod_vm.vm
    mac = mac_ending(random.randrange(16, 250))
    async with pod_network(pod_prefix, "169.254.250.0/24", mac=mac) as pod:
        netns = f"/run/netns/{pod.netns}"
        conf = chained(
            pod,
            stateDir=state_template,
            model="bridged",
            qmpSocket=socket_template(pod_vm, pod.container_id, tmp_path),
        )
        call = {"container": pod.container_id, "netns": netns, "ifname": pod.ifname}
        result = await runtime.ok("ADD", conf, **call)
        (owner,) = set(owned_links(netns).values())  # the tap and the bridge
        # bridged parks the veth on another MAC (the guest has the pod's): the result says
        # so, and so the main plugin's CHECK, run on the same result, agrees.
        veth = links(pod.netns)["eth0"]
        assert veth["address"] != mac
        (entry,) = [i for i in result["interfaces"] if i.get("sandbox") == netns]
        assert entry["mac"] == veth["address"]
        await runtime.ok("CHECK", {**pod.config, "prevResult": result}, **call)
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call)
        await manager_device_del(vm.qmp_path, f"{owner}-dev", GUEST)
        error = (await runtime.call("CHECK", {**conf, "prevResult": result}, **call)).error()
        assert error["code"] == 104
        assert f"{owner}-dev" in error["msg"]
        other = (
            await runtime.call(
                "CHECK", {**conf, "prevResult": result}, **{**call, "ifname": "eth9"}
            )
        ).error()
        assert other["code"] == 104
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call)
        assert owned_links(netns) == {}
        assert not state_of(state_template, pod.container_id).exists()
        # bridged swapped the veth's MAC for the guest's sake; DEL gave it back.
        veth = links(pod.netns)["eth0"]
        assert veth["address"] == mac
        assert veth.get("master") is None


@pytest.mark.asyncio
async def test_del_succeeds_and_cleans_the_netns_when_the_vm_is_gone(
    paused_vm: GuestVM, runtime: Runtime, state_template: str, pod_prefix: str
) -> None:
    mac = mac_ending(random.randrange(16, 250))
    async with pod_network(pod_prefix, "169.254.251.0/24", mac=mac) as pod:
        netns = f"/run/netns/{pod.netns}"
        # The socket comes from runtimeConfig, as a runtime passes a capability.
        conf = chained(
            pod,
            stateDir=state_template,
            capabilities={"qmpSocket": True},
            runtimeConfig={"qmpSocket": str(paused_vm.mgmt_qmp_path)},
        )
        call = {"container": pod.container_id, "netns": netns, "ifname": pod.ifname}
        await runtime.ok("ADD", conf, **call)
        assert "ingress" in qdisc_kinds(netns, "eth0")
        await paused_vm.stop()
        await runtime.ok("DEL", conf, **call)
        assert "ingress" not in qdisc_kinds(netns, "eth0")
        assert owned_links(netns) == {}
        assert not state_of(state_template, pod.container_id).exists()
        await runtime.ok("DEL", conf, **call)


# --- main mode: qmpnet-cni makes the tap, host-local the address ------------------------------


def main_conf(
    pod_vm: PodVM, name: str, state_template: str, data_dir: Path, subnet: str, **fields: Any
) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": VERSION,
        "name": name,
        "type": "qmpnet-cni",
        "model": "none",
        "qmpSocket": pod_vm.qmp_template,
        "stateDir": state_template,
        "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": subnet}]]},
    }
    conf.update(fields)
    return conf


@pytest.mark.asyncio(loop_scope="module")
async def test_main_mode_makes_a_tap_in_the_netns_with_an_address_from_host_local(
    pod_vm: PodVM,
    runtime: Runtime,
    state_template: str,
    tmp_path: Path,
    make_netns: Callable[[], str],
) -> None:
    vm = pod_vm.vm
    netns = make_netns()
    mac = mac_ending(random.randrange(16, 250))
    network = f"{RUN}main"
    data_dir = tmp_path / "ipam"
    conf = main_conf(pod_vm, network, state_template, data_dir, "169.254.252.0/24")
    call = {
        "container": pod_vm.container,
        "netns": netns,
        "ifname": "net1",
        "args": f"IgnoreUnknown=1;MAC={mac}",
    }
    cursor = vm.console_cursor()
    result = await runtime.ok("ADD", conf, **call)
    try:
        assert result["interfaces"] == [{"name": "net1", "mac": mac, "sandbox": netns}]
        (ip,) = result["ips"]
        assert ip["interface"] == 0
        address = ip["address"].split("/")[0]
        assert address.startswith("169.254.252.")
        assert ipam_files(data_dir, network) == {address}
        added = await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}\b", GUEST, since=cursor)
        guest_nic = added.group(0).split("name=")[1].split()[0]
        tap = links(ns(netns))["net1"]
        assert tap["linkinfo"]["info_kind"] == "tun"
        assert tap["linkinfo"]["info_data"]["type"] == "tap"
        assert tap["ifalias"].startswith("qmpnet:")
        owner = claimed_owner(tap["ifalias"])
        assert owner, tap["ifalias"]
        assert f"{owner}-dev" in (await qemu_view(vm.qmp_path)).devices
        # The tap is the pod end of the guest's link: traffic from inside the netns.
        assert (
            await sh(
                "ip", "-n", ns(netns), "addr", "add", f"{host_ip_for_mac(mac)}/24", "dev", "net1"
            )
            == 0
        )
        await vm.wait_for(rf"QMPNET NIC-ADDR name={guest_nic} ", GUEST, since=cursor)
        await ping_until(["ip", "netns", "exec", ns(netns), *PING, guest_ip_for_mac(mac)], GUEST)
        await runtime.ok("CHECK", conf, **call)  # host-local's CHECK is asked too
    finally:
        cursor = vm.console_cursor()
        await runtime.ok("DEL", conf, **call)
    await vm.wait_for(rf"QMPNET NIC-DEL name={guest_nic} mac={mac}", GUEST, since=cursor)
    assert "net1" not in links(ns(netns))
    assert ipam_files(data_dir, network) == set()
    assert not (await qemu_view(vm.qmp_path)).has_any_of(owner)
    assert not state_of(state_template, pod_vm.container).exists()
    await runtime.ok("DEL", conf, **call)


def tc_text(netns: str, *args: str) -> str:
    import subprocess

    done = subprocess.run(
        ["tc", "-n", ns(netns), *args], check=True, capture_output=True, text=True
    )
    return done.stdout


@pytest.mark.asyncio(loop_scope="module")
async def test_the_bandwidth_capability_shapes_the_nic_and_del_takes_it_away(
    pod_vm: PodVM,
    runtime: Runtime,
    state_template: str,
    tmp_path: Path,
    make_netns: Callable[[], str],
) -> None:
    """CNI's ``bandwidth`` (bits/s and bits; ingress = into the pod = the guest's inbound):
    the tap's egress gets the ingress rate, the NIC's ifb the egress rate; a bad one is the
    spec's error 7 before anything is made. Rates on the wire: integration/test_live.py."""
    vm, netns = pod_vm.vm, make_netns()
    mac = mac_ending(random.randrange(16, 250))
    network = f"{RUN}bw"
    conf = main_conf(
        pod_vm,
        network,
        state_template,
        tmp_path / "ipam",
        "169.254.250.0/24",
        capabilities={"bandwidth": True},
        runtimeConfig={
            "bandwidth": {
                "ingressRate": 20_000_000,
                "ingressBurst": 800_000,
                "egressRate": 100_000_000,
                "egressBurst": 8_000_000,
            }
        },
    )
    call = {
        "container": pod_vm.container,
        "netns": netns,
        "ifname": "net1",
        "args": f"IgnoreUnknown=1;MAC={mac}",
    }
    bad = {**conf, "runtimeConfig": {"bandwidth": {"ingressRate": -1}}}
    error = (await runtime.call("ADD", bad, **call)).error()
    assert error["code"] == 7, error
    assert "runtimeConfig.bandwidth.ingressRate" in error["msg"], error
    assert "net1" not in links(ns(netns))
    cursor = vm.console_cursor()
    await runtime.ok("ADD", conf, **call)
    try:
        await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}\b", GUEST, since=cursor)
        assert "rate 20Mbit ceil 20Mbit burst 100000b" in tc_text(
            netns, "class", "show", "dev", "net1"
        )
        owner = claimed_owner(links(ns(netns))["net1"]["ifalias"])
        assert owner
        ifb = "qi" + owner[2:]
        assert links(ns(netns))[ifb]["linkinfo"]["info_kind"] == "ifb"
        assert "rate 100Mbit" in tc_text(netns, "class", "show", "dev", ifb)
        assert ifb in tc_text(netns, "filter", "show", "dev", "net1", "ingress")
    finally:
        cursor = vm.console_cursor()
        await runtime.ok("DEL", conf, **call)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={mac}", GUEST, since=cursor)
    assert not {n for n in links(ns(netns)) if n.startswith(("net1", "qi"))}


@pytest.mark.asyncio(loop_scope="module")
async def test_del_after_the_netns_is_gone_still_unplugs_and_releases(
    pod_vm: PodVM,
    runtime: Runtime,
    state_template: str,
    tmp_path: Path,
    make_netns: Callable[[], str],
) -> None:
    vm = pod_vm.vm
    netns = make_netns()
    network = f"{RUN}gone"
    conf = main_conf(pod_vm, network, state_template, tmp_path / "ipam", "169.254.249.0/24")
    call = {"container": pod_vm.container, "ifname": "net1"}
    cursor = vm.console_cursor()
    result = await runtime.ok("ADD", conf, netns=netns, **call)
    mac = result["interfaces"][0]["mac"]
    await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}\b", GUEST, since=cursor)
    # The pod died: its netns (and the tap in it) went first; the runtime sends DEL with no
    # CNI_NETNS, as the spec allows.
    assert await sh("ip", "netns", "del", ns(netns)) == 0
    cursor = vm.console_cursor()
    await runtime.ok("DEL", conf, netns="", **call)
    await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={mac}", GUEST, since=cursor)
    assert ipam_files(tmp_path / "ipam", network) == set()
    assert not state_of(state_template, pod_vm.container).exists()
    await runtime.ok("DEL", conf, netns="", **call)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_second_add_of_the_same_attachment_is_refused(
    pod_vm: PodVM,
    runtime: Runtime,
    state_template: str,
    tmp_path: Path,
    make_netns: Callable[[], str],
) -> None:
    netns = make_netns()
    conf = main_conf(pod_vm, f"{RUN}dup", state_template, tmp_path / "ipam", "169.254.253.0/24")
    call = {"container": pod_vm.container, "netns": netns, "ifname": "net1"}
    await runtime.ok("ADD", conf, **call)
    try:
        error = (await runtime.call("ADD", conf, **call)).error()
        assert error["code"] == 106
        # Nothing leaked by the refused ADD: one reservation, one tap.
        assert len(ipam_files(tmp_path / "ipam", f"{RUN}dup")) == 1
        assert list(owned_links(netns)) == ["net1"]
    finally:
        await runtime.ok("DEL", conf, **call)
    assert ipam_files(tmp_path / "ipam", f"{RUN}dup") == set()


# --- GC (1.1) ---------------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_gc_removes_only_this_networks_attachments_missing_from_the_valid_list(
    pod_vm: PodVM,
    runtime: Runtime,
    state_template: str,
    tmp_path: Path,
    make_netns: Callable[[], str],
) -> None:
    vm = pod_vm.vm
    netns = make_netns()
    data_dir = tmp_path / "ipam"
    net_a, net_b = f"{RUN}gca", f"{RUN}gcb"
    conf_a = main_conf(pod_vm, net_a, state_template, data_dir, "169.254.254.0/25")
    conf_b = main_conf(pod_vm, net_b, state_template, data_dir, "169.254.254.128/25")
    call = {"container": pod_vm.container, "netns": netns}
    macs = {}
    for conf, ifname in ((conf_a, "a1"), (conf_a, "a2"), (conf_b, "b1")):
        result = await runtime.ok("ADD", conf, ifname=ifname, **call)
        macs[ifname] = result["interfaces"][0]["mac"]
    owners = owned_links(netns)
    try:
        assert sorted(owners) == ["a1", "a2", "b1"]
        assert len(ipam_files(data_dir, net_a)) == 2
        gc = {
            **conf_a,
            "cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [{"containerID": pod_vm.container, "ifname": "a1"}],
        }
        # A state directory GC cannot read (sorted first) is reported, and GC goes on.
        broken = state_of(state_template, "0broken")
        broken.mkdir(parents=True)
        (broken / "cni-attachments.json").write_text("garbage")
        cursor = vm.console_cursor()
        error = (await runtime.call("GC", gc)).error()
        assert error["code"] == 5
        assert "0broken" in error["msg"] + error.get("details", "")
        shutil.rmtree(broken)
        await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={macs['a2']}", GUEST, since=cursor)
        assert sorted(owned_links(netns)) == ["a1", "b1"]
        assert len(ipam_files(data_dir, net_a)) == 1
        assert len(ipam_files(data_dir, net_b)) == 1
        devices = (await qemu_view(vm.qmp_path)).devices
        assert {f"{owners[n]}-dev" for n in ("a1", "b1")} <= devices
        assert f"{owners['a2']}-dev" not in devices
        # CHECK still passes for what GC kept.
        await runtime.ok("CHECK", conf_a, ifname="a1", **call)
        await runtime.ok("CHECK", conf_b, ifname="b1", **call)
        # An empty list for network A leaves network B's attachment alone.
        await runtime.ok("GC", {**gc, "cni.dev/valid-attachments": []})
        assert sorted(owned_links(netns)) == ["b1"]
    finally:
        for conf, ifname in ((conf_a, "a1"), (conf_a, "a2"), (conf_b, "b1")):
            await runtime.ok("DEL", conf, ifname=ifname, **call)
    assert owned_links(netns) == {}
    assert ipam_files(data_dir, net_a) == ipam_files(data_dir, net_b) == set()
    assert not state_of(state_template, pod_vm.container).exists()


@pytest.mark.asyncio(loop_scope="module")
async def test_main_mode_in_1_1_with_a_1_0_ipam_plugin_and_check_reads_prev_result(
    pod_vm: PodVM,
    runtime: Runtime,
    state_template: str,
    tmp_path: Path,
    make_netns: Callable[[], str],
) -> None:
    """Debian's host-local speaks CNI 1.0 only: a 1.1 configuration is passed to it as 1.0,
    so STATUS is truthful, ADD and DEL work. CHECK compares prevResult with the attachment."""
    netns = make_netns()
    network = f"{RUN}v11"
    data_dir = tmp_path / "ipam"
    conf = main_conf(
        pod_vm, network, state_template, data_dir, "169.254.248.0/24", cniVersion="1.1.0"
    )
    call = {"container": pod_vm.container, "netns": netns, "ifname": "net1"}
    await runtime.ok("STATUS", conf)
    result = await runtime.ok("ADD", conf, **call)
    try:
        assert result["cniVersion"] == "1.1.0"
        (ip,) = result["ips"]
        assert ipam_files(data_dir, network) == {ip["address"].split("/")[0]}
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call)
        for field, value in (("mac", "52:54:00:00:00:01"), ("address", "169.254.248.77/24")):
            wrong = json.loads(json.dumps(result))
            if field == "mac":
                wrong["interfaces"][0]["mac"] = value
            else:
                wrong["ips"][0]["address"] = value
            error = (await runtime.call("CHECK", {**conf, "prevResult": wrong}, **call)).error()
            assert error["code"] == 104, error
            assert value.split("/")[0] in error["msg"], error
    finally:
        await runtime.ok("DEL", conf, **call)
    assert ipam_files(data_dir, network) == set()
    assert owned_links(netns) == {}


@pytest.mark.asyncio(loop_scope="module")
async def test_an_add_that_cannot_undo_itself_is_settled_by_the_runtimes_del(
    pod_vm: PodVM, runtime: Runtime, state_template: str, pod_prefix: str, tmp_path: Path
) -> None:
    """The guest stops mid-ADD: the driver never sees DRIVER_OK, and the undo's device_del
    is never acknowledged. The attachment record stays, so the runtime's DEL (after the
    guest runs again) finishes the rollback instead of answering "nothing to do"."""
    vm = pod_vm.vm
    mac = mac_ending(random.randrange(16, 250))
    async with pod_network(pod_prefix, "169.254.247.0/24", mac=mac) as pod:
        netns = f"/run/netns/{pod.netns}"
        conf = chained(
            pod,
            stateDir=state_template,
            waitGuest=True,
            timeouts={"guestReady": 3, "unplug": 2},
            qmpSocket=socket_template(pod_vm, pod.container_id, tmp_path),
        )
        call = {"container": pod.container_id, "netns": netns, "ifname": pod.ifname}
        before = (await qemu_view(vm.qmp_path)).devices
        await hmp(vm.qmp_path, "stop")
        try:
            error = (await runtime.call("ADD", conf, **call)).error()
            assert "wait-guest" in error["msg"], error
            # the undo could not finish: QEMU still has the device
            (left,) = (await qemu_view(vm.qmp_path)).devices - before
            assert left.endswith("-dev")
            assert state_of(state_template, pod.container_id).exists()
        finally:
            await hmp(vm.qmp_path, "cont")
        await runtime.ok("DEL", conf, **call)
        assert not (await qemu_view(vm.qmp_path)).has_any_of(left.removesuffix("-dev"))
        assert owned_links(netns) == {}
        assert "ingress" not in qdisc_kinds(netns, "eth0")
        assert not state_of(state_template, pod.container_id).exists()
