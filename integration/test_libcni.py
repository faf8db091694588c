"""qmpnet-cni driven by libcni itself, the Go library CRI-O, Podman and go-cni link.

A small driver (``qmpnet/testing/libcni/main.go``) is built once against Debian's libcni
1.1.2 source and runs a conflist ``bridge`` + ``host-local`` + ``qmpnet-cni`` (chained,
model tcfilter) against one booted guest: validate, ADD, CHECK, libcni's cached result, a
CHECK after the device went behind qmpnet's back, DEL twice. What happened is checked with
independent tools: the guest's serial markers, ``ip``/``tc`` in the pod netns, QEMU's other
monitor, ``ping``, host-local's reservation files.

What libcni 1.1.2 accepts: a conflist ``cniVersion`` up to 1.0.0 for ADD/CHECK/DEL (its
result types stop at 1.0.0, so it cannot parse a 1.1.0 result); ``ValidateNetworkList``
only asks each plugin's VERSION whether the list's version is among its supported ones, so
a 1.1.0 list validates when every plugin names 1.1.0 — Debian's ``bridge`` does not, and
:func:`test_a_1_1_list_is_refused_by_validate_because_bridge_stops_at_1_0` shows that. It
has no GC and no STATUS.

The flow is one coroutine (:func:`libcni_flow`) taking the driver and the conflist, so the
same steps can run against other ways of reaching qmpnet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from test_cni import Reply

from qmpnet.testing.cni import free_link_local_byte, ipam_files, ping_until
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.gobuild import CACHE, cni_shim, go_build
from qmpnet.testing.guest import guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.probe import (
    has_ingress,
    ip_json,
    manager_device_del,
    owned_links,
    qemu_view,
)
from qmpnet.testing.scene import unique
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel]

CHECKOUT = Path(__file__).resolve().parents[1]
SOURCE = CHECKOUT / "qmpnet" / "testing" / "libcni" / "main.go"
#: Debian's golang-github-appc-cni-dev puts libcni here; modules off, nothing downloaded.
GOPATH = Path("/usr/share/gocode")
PLUGIN = Path(sys.executable).with_name("qmpnet-cni")
DEBIAN_CNI = Path("/usr/lib/cni")
VERSION = "1.0.0"  # what Debian's bridge speaks and libcni 1.1.2 parses
GUEST = 90.0  # generous: TCG guests on a shared 2-core machine
PING = ("busybox", "ping", "-c", "1", "-W", "1")


# --- the driver -------------------------------------------------------------------------------


def build_driver(cache: Path) -> Path:
    """Build main.go once per content: ``cache/<sha256 prefix>/libcni``, reused until it changes."""
    assert (GOPATH / "src/github.com/containernetworking/cni/libcni").is_dir(), (
        "libcni source missing: make setup installs golang-github-appc-cni-dev"
    )
    return go_build(SOURCE, cache, "libcni", env={"GOPATH": str(GOPATH)})


@pytest.fixture(scope="session")
def libcni_binary() -> Path:
    return build_driver(CACHE)


@attrs.frozen
class Driver:
    """The libcni driver with a CNI_PATH and a result cache of its own."""

    binary: Path
    cni_path: Path
    cache_dir: Path

    async def call(self, *args: str, cap_args: dict[str, Any] | None = None) -> Reply:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "QMPNET_"))}
        env.update({"CNI_PATH": str(self.cni_path), "CNI_CACHE_DIR": str(self.cache_dir)})
        if cap_args:
            env["CAP_ARGS"] = json.dumps(cap_args)
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 400)
        return Reply(proc.returncode or 0, out.decode(), err.decode())

    async def ok(self, *args: str, cap_args: dict[str, Any] | None = None) -> Reply:
        reply = await self.call(*args, cap_args=cap_args)
        assert reply.status == 0, reply
        assert reply.err == "", reply
        return reply


@pytest.fixture(params=["python", "compiled"])
def driver(request: pytest.FixtureRequest, libcni_binary: Path, tmp_path: Path) -> Driver:
    """libcni with Debian's plugins and one of qmpnet-cni's two fronts: the Python console
    script, or the compiled one (``make cni-shim``) that forwards to qmpnetd and runs the
    Python plugin when no service takes the call."""
    assert PLUGIN.exists(), f"{PLUGIN} missing: pip install -e ."
    bin_dir = tmp_path / "cni-bin"
    bin_dir.mkdir()
    for name in ("bridge", "host-local"):
        (bin_dir / name).symlink_to(DEBIAN_CNI / name)
    front = PLUGIN if request.param == "python" else cni_shim(full_plugin=PLUGIN)
    (bin_dir / "qmpnet-cni").symlink_to(front)
    return Driver(libcni_binary, bin_dir, tmp_path / "libcni-cache")


# --- the pod and its conflist ---------------------------------------------------------------


@attrs.frozen
class PodList:
    """A conflist on disk and the host objects it names (all with the run prefix)."""

    path: Path
    conf: dict[str, Any]
    container: str
    netns: str
    bridge: str
    mac: str
    data_dir: Path
    state_dir: Path

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def attachment(self) -> tuple[str, str, str, str]:
        return (str(self.path), self.container, self.netns_path, "eth0")


def pod_conflist(where: Path, vm: GuestVM, *, version: str = VERSION, qmpnetd: str = "") -> PodList:
    """``qmpnetd``: the service's socket, or "" for the plugin's direct mode."""
    b = free_link_local_byte()
    prefix = unique("l")
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    socket_dir = where / "vms" / prefix
    socket_dir.mkdir(parents=True)
    (socket_dir / "qmp2.sock").symlink_to(vm.mgmt_qmp_path)
    data_dir, state_dir = where / "ipam", where / "state"
    conf = {
        "cniVersion": version,
        "name": f"{prefix}net",
        "plugins": [
            {
                "type": "bridge",
                "bridge": f"{prefix}b",
                "isGateway": False,
                "ipMasq": False,
                "capabilities": {"mac": True},
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(data_dir),
                    "ranges": [[{"subnet": f"169.254.{b}.0/24", "rangeStart": f"169.254.{b}.100"}]],
                },
            },
            {
                "type": "qmpnet-cni",
                "model": "tcfilter",
                "qmpSocket": f"{where}/vms/{{containerId}}/qmp2.sock",
                "stateDir": f"{state_dir}/{{containerId}}",
                "qmpnetd": qmpnetd,
            },
        ],
    }
    path = where / f"{prefix}.conflist"
    path.write_text(json.dumps(conf))
    return PodList(path, conf, prefix, f"{prefix}n", f"{prefix}b", mac, data_dir, state_dir)


pod_vm = module_vm("lib", root_ports=8)


@pytest.fixture
def pod(pod_vm: GuestVM, tmp_path: Path, driver: Driver) -> Iterator[PodList]:
    """The pod's netns exists before ADD (the runtime makes it); everything goes at the end."""
    with _pod(pod_conflist(tmp_path, pod_vm), driver) as made:
        yield made


@contextlib.contextmanager
def _pod(pod: PodList, driver: Driver) -> Iterator[PodList]:
    subprocess.run(["ip", "netns", "add", pod.netns], check=True)
    try:
        yield pod
    finally:
        # a failed test may leave the attachment: DEL through libcni first, then the host
        env = {**os.environ, "CNI_PATH": str(driver.cni_path)}
        env["CNI_CACHE_DIR"] = str(driver.cache_dir)
        subprocess.run(
            [str(driver.binary), "del", *pod.attachment], env=env, capture_output=True, check=False
        )
        subprocess.run(["ip", "link", "del", pod.bridge], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True, check=False)


# --- independent views ----------------------------------------------------------------------


# --- the flow -------------------------------------------------------------------------------


async def libcni_flow(driver: Driver, pod: PodList, vm: GuestVM) -> None:
    """validate, ADD, CHECK, cached result, CHECK after a lost device, DEL twice, nothing left."""
    network = pod.conf["name"]
    caps = (await driver.ok("validate", str(pod.path))).json
    assert caps == {"capabilities": ["mac"]}
    versions = (await driver.ok("version", str(pod.path))).json
    assert VERSION in versions["qmpnet-cni"]["supportedVersions"]

    cursor = vm.console_cursor()
    result = (await driver.ok("add", *pod.attachment, cap_args={"mac": pod.mac})).json
    assert result["cniVersion"] == VERSION
    assert any(
        i.get("sandbox") == pod.netns_path and i["mac"] == pod.mac and i["name"] == "eth0"
        for i in result["interfaces"]
    ), result
    (ip,) = result["ips"]
    address = ip["address"].split("/")[0]
    assert ipam_files(pod.data_dir, network) == {address}
    added = await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={pod.mac}\b", GUEST, since=cursor)
    guest_nic = added.group(0).split("name=")[1].split()[0]
    await vm.wait_for(rf"QMPNET NIC-ADDR name={guest_nic} ", GUEST, since=cursor)
    # the far side of the guest's link: the bridge holds the address the guest expects
    ip_add = await asyncio.create_subprocess_exec(
        "ip", "addr", "add", f"{host_ip_for_mac(pod.mac)}/24", "dev", pod.bridge
    )
    assert await ip_add.wait() == 0
    await ping_until([*PING, "-I", pod.bridge, guest_ip_for_mac(pod.mac)], GUEST)
    ((tap, owner),) = owned_links(pod.netns).items()
    assert has_ingress(pod.netns, "eth0")
    assert f"{owner}-dev" in (await qemu_view(vm.qmp_path)).devices

    await driver.ok("check", *pod.attachment)
    cached = (await driver.ok("cached", *pod.attachment)).json
    assert cached == result
    cache_file = driver.cache_dir / "results" / f"{network}-{pod.container}-eth0"
    assert json.loads(cache_file.read_text())["result"] == result

    await manager_device_del(vm.qmp_path, f"{owner}-dev", GUEST)
    failed = await driver.call("check", *pod.attachment)
    assert failed.status == 1, failed
    assert failed.out == ""
    assert failed.err.startswith("error 104: "), failed
    assert f"{owner}-dev" in failed.err, failed

    cursor = vm.console_cursor()
    await driver.ok("del", *pod.attachment)
    await driver.ok("del", *pod.attachment)
    assert set(owned_links(pod.netns)) == set(), tap
    assert {link["ifname"] for link in ip_json("link", "show", netns=pod.netns)} == {"lo"}
    assert not (pod.state_dir / pod.container).exists()
    assert f"{owner}-dev" not in (await qemu_view(vm.qmp_path)).devices
    assert ipam_files(pod.data_dir, network) == set()
    assert (await driver.ok("cached", *pod.attachment)).json is None
    assert not cache_file.exists()


@pytest.mark.asyncio(loop_scope="module")
async def test_libcni_runs_the_chained_list_against_a_booted_guest(
    driver: Driver, pod: PodList, pod_vm: GuestVM
) -> None:
    await libcni_flow(driver, pod, pod_vm)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_1_1_list_is_refused_by_validate_because_bridge_stops_at_1_0(
    driver: Driver, pod_vm: GuestVM, tmp_path: Path
) -> None:
    pod = pod_conflist(tmp_path, pod_vm, version="1.1.0")
    versions = (await driver.ok("version", str(pod.path))).json
    assert "1.1.0" in versions["qmpnet-cni"]["supportedVersions"]
    assert "1.1.0" not in versions["bridge"]["supportedVersions"]
    refused = await driver.call("validate", str(pod.path))
    assert refused.status == 1
    assert 'plugin bridge does not support config version "1.1.0"' in refused.err, refused
    assert "qmpnet-cni" not in refused.err


@pytest.mark.asyncio(loop_scope="module")
async def test_libcni_runs_the_list_through_qmpnetd(
    driver: Driver, pod_vm: GuestVM, tmp_path: Path
) -> None:
    """The same flow with the service on the node: qmpnet-cni forwards every command."""
    async with await ServiceProcess.start(tmp_path / "svc") as svc:
        with _pod(pod_conflist(tmp_path, pod_vm, qmpnetd=str(svc.socket)), driver) as pod:
            await libcni_flow(driver, pod, pod_vm)
            # the service did the work: it knows the VM, and its state is under its root
            assert any((svc.root).glob("vm-*/state.json")), svc.tail()
    assert svc.returncode == 0, svc.tail()
