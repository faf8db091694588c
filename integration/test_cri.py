"""qmpnet-cni under Debian's real containerd 1.6, driven over the CRI v1 API as kubelet does.

A private containerd (qmpnet.testing.cri.Containerd) runs its CRI plugin with a conflist of
Debian's ``bridge`` (host-local on a link-local /24, never isGateway or ipMasq), ``tuning``
(a fixed MAC for the pod's veth, so the guest's address follows from it) and ``qmpnet-cni``
(model tcfilter). containerd itself makes the pod netns, execs the plugins (ADD in list order,
DEL in reverse) and removes the netns. What happened is checked with independent views:
host-local's reservation files, ``ip`` in containerd's pod netns, the processes and mounts
on the host, QEMU's other monitor and the guest's serial console and ping.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from qmpnet.testing.cni import free_link_local_byte, ping_until
from qmpnet.testing.cri import (
    CNI_PLUGINS,
    Containerd,
    CriClient,
    CriError,
    SandboxStatus,
    pids_with_argument,
)
from qmpnet.testing.gobuild import cni_shim
from qmpnet.testing.guest import GuestImage, guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.probe import QemuView, ip_json, qemu_view
from qmpnet.testing.scene import del_link, run, unique
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel]

QMPNET = str(Path(sys.executable).with_name("qmpnet"))
CNI_VERSION = "1.0.0"  # what containerd 1.6's libcni and Debian's plugins speak
GUEST = 120.0  # generous: TCG guests on a shared 2-core machine
CRI = 300.0
PING = ("busybox", "ping", "-c", "1", "-W", "1")


# --- the node -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def compiled_front() -> Path:
    return cni_shim(full_plugin=CNI_PLUGINS["qmpnet-cni"])


@pytest_asyncio.fixture
async def node(compiled_front: Path) -> AsyncIterator[Containerd]:
    """A prepared (not yet started) containerd; closed, and its bridge removed, at the end.

    Its ``qmpnet-cni`` is the compiled front a node installs (``make install-cni``): it
    forwards to qmpnetd, and runs the Python plugin in the direct mode."""
    node = Containerd.prepare(plugins={**CNI_PLUGINS, "qmpnet-cni": compiled_front})
    try:
        yield node
    finally:
        await node.close()
        del_link(bridge_of(node))


def bridge_of(node: Containerd) -> str:
    return f"{node.name}b"


def conflist(node: Containerd, b: int, mac: str, qmpnet: dict[str, Any]) -> dict[str, Any]:
    """bridge + host-local on 169.254.B.0/24, tuning's MAC, then qmpnet-cni (tcfilter)."""
    return {
        "cniVersion": CNI_VERSION,
        "name": f"{node.name}net",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge_of(node),
                "isGateway": False,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(node.ipam_dir),
                    "ranges": [[{"subnet": f"169.254.{b}.0/24", "rangeStart": f"169.254.{b}.100"}]],
                },
            },
            {"type": "tuning", "mac": mac},
            {
                "type": "qmpnet-cni",
                "model": "tcfilter",
                "queues": 1,
                "stateDir": f"{node.top}/qmpnet/{{containerId}}",
                "logFile": str(node.top / "qmpnet-cni.log"),
                **qmpnet,
            },
        ],
    }


def reservations(node: Containerd, network: str) -> set[str]:
    """The addresses host-local holds for ``network`` (one file per address)."""
    where = node.ipam_dir / network
    return {p.name for p in where.iterdir() if p.name[0].isdigit()} if where.exists() else set()


def bridge_ports(bridge: str) -> list[str]:
    return [link["ifname"] for link in ip_json("link", "show", "master", bridge)]


def netns_link(netns: str, name: str) -> dict[str, Any]:
    """A link in a netns given by path (containerd's are not under /run/netns)."""
    out = run("nsenter", f"--net={netns}", "ip", "-j", "link", "show", name)
    (link,) = json.loads(out.stdout)
    return dict(link)


def plugin_log(node: Containerd) -> str:
    path = node.top / "qmpnet-cni.log"
    return path.read_text(errors="replace") if path.exists() else ""


# --- today: containerd runs CNI ADD before any VM exists -------------------------------------


@pytest.mark.asyncio
async def test_add_runs_before_any_vm_exists_so_direct_mode_fails_and_containerd_runs_del(
    node: Containerd,
) -> None:
    """RunPodSandbox execs the CNI list before it starts the sandbox's task: in direct mode
    qmpnet-cni finds no VM monitor at its qmpSocket, the ADD fails, containerd runs DEL
    through the list and removes the netns; nothing is left."""
    b = free_link_local_byte()
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    vms = node.top / "vms"  # where a VM runtime would put each sandbox's monitor: not yet
    network = f"{node.name}net"
    # direct mode: "qmpnetd": "" keeps the work in the plugin's process, whatever runs on
    # the node's default service socket
    direct = {"qmpnetd": "", "qmpSocket": f"{vms}/{{containerId}}/qmp2.sock"}
    node.write_conflist(conflist(node, b, mac, direct))
    await node.start()
    client = node.client()
    version = await client.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    pod = unique("pod")

    with pytest.raises(CriError) as failed:
        await client.run_pod_sandbox(
            client.sandbox_config(pod, cgroup_parent=node.cgroup_parent), timeout=CRI
        )

    err = failed.value
    assert err.code == "UNKNOWN", err
    # containerd's own words around the plugin's error object's message
    assert "failed to setup network for sandbox" in err.details, err
    assert 'plugin type="qmpnet-cni" failed (add)' in err.details, err
    assert "no such socket" in err.details, err
    named = re.search(r'sandbox "([0-9a-f]{64})"', err.details)
    assert named, err
    sid = named.group(1)
    assert str(vms / sid / "qmp2.sock") in err.details, err
    assert not vms.exists()
    # host-local did hand out an address (bridge's ADD ran) and holds none now (its DEL ran)
    assert (node.ipam_dir / network / "last_reserved_ip.0").exists()
    assert reservations(node, network) == set()
    # the plugin ran ADD in containerd's netns for the sandbox, then DEL as the rollback
    calls = re.findall(
        rf"qmpnet.cni: (ADD|DEL) container={sid} ifname=eth0 netns=(\S+)", plugin_log(node)
    )
    assert [c for c, _ in calls] == ["ADD", "DEL"], plugin_log(node)
    assert all(ns.startswith(f"{node.netns_dir}/cni-") for _, ns in calls), calls
    # no sandbox, no netns, no veth on the bridge, no task (no shim was ever started)
    assert await client.list_pod_sandbox() == []
    assert node.netns() == []
    assert bridge_ports(bridge_of(node)) == []
    assert pids_with_argument(str(node.socket)) == []
    assert not (node.top / "qmpnet" / sid).exists()
    # containerd cleaned up by itself: closing it finds nothing to force
    assert await node.close() == []
    assert node.leftovers() == []


# --- the real flow: ADD recorded as pending by qmpnetd, plugged when the VM registers --------


async def qmpnet(*args: str, socket: Path) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [QMPNET, "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("QMPNET_")},
        check=False,
    )


async def qmpnet_json(*args: str, socket: Path) -> Any:
    proc = await qmpnet(*args, socket=socket)
    assert proc.returncode == 0, proc
    return json.loads(proc.stdout)


@pytest_asyncio.fixture
async def service() -> AsyncIterator[ServiceProcess]:
    work = Path(tempfile.mkdtemp(prefix=f"{unique('svc')}-"))
    try:
        async with await ServiceProcess.start(work) as svc:
            yield svc
        assert svc.returncode == 0, svc.tail()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def shim_stand_in_starts_the_vm(
    guest_image: GuestImage, workdir: Path, sandbox_id: str, netns: str, socket: Path
) -> tuple[GuestVM, Any]:
    """What a VM runtime's shim does once its sandbox task starts: boot the VM, then tell
    qmpnetd about it (its id is the pod sandbox's id, its sandbox the pod's netns)."""
    vm = await GuestVM.start(
        guest_image, workdir, root_ports=8, name=f"{unique('vm')}", ready_timeout=GUEST
    )
    try:
        reply = await qmpnet_json(
            "vm",
            "register",
            "--id",
            sandbox_id,
            "--qmp",
            str(vm.mgmt_qmp_path),
            "--sandbox",
            netns,
            socket=socket,
        )
    except BaseException:
        await vm.stop()
        raise
    return vm, reply


async def pending_pod(
    node: Containerd, service: ServiceProcess, b: int, mac: str
) -> tuple[CriClient, str, SandboxStatus]:
    """RunPodSandbox with qmpnet-cni forwarding to qmpnetd: it succeeds with no VM, and the
    service holds the attachment pending."""
    network = f"{node.name}net"
    node.write_conflist(conflist(node, b, mac, {"qmpnetd": str(service.socket)}))
    await node.start()
    client = node.client()
    sandbox_id = await client.run_pod_sandbox(
        client.sandbox_config(unique("pod"), cgroup_parent=node.cgroup_parent), timeout=CRI
    )
    status = await client.pod_sandbox_status(sandbox_id)
    assert status.state == "SANDBOX_READY"
    assert status.netns.startswith(f"{node.netns_dir}/"), status
    assert pids_with_argument(str(node.socket)), "no shim runs the sandbox's task"
    # the pod's veth, as containerd's netns holds it: tuning's MAC, host-local's address
    assert netns_link(status.netns, "eth0")["address"] == mac
    assert reservations(node, network) == {status.ip}
    assert status.ip.startswith(f"169.254.{b}.")
    pending = (await qmpnet_json("status", "--json", socket=service.socket))["pending_attachments"]
    assert [(p["container_id"], p["network"], p["ifname"], p["status"]) for p in pending] == [
        (sandbox_id, network, "eth0", "pending")
    ]
    return client, sandbox_id, status


async def plugged_nic(vm: GuestVM, reply: Any, sandbox_id: str, network: str, mac: str) -> str:
    """The register reply lists the attachment as plugged and the guest has the NIC; returns
    the guest's name for it."""
    assert [(a["container_id"], a["network"], a["status"]) for a in reply["attachments"]] == [
        (sandbox_id, network, "plugged")
    ], reply
    added = await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}\b", GUEST)
    guest_nic = added.group(0).split("name=")[1].split()[0]
    await vm.wait_for(rf"QMPNET NIC-ADDR name={guest_nic} ", GUEST)
    return guest_nic


def vm_nics(view: QemuView) -> set[str]:
    return {d for d in view.devices if d.endswith("-dev")}


@pytest.mark.asyncio
async def test_add_is_pending_in_qmpnetd_until_the_vm_registers_then_plugs_and_del_unplugs(
    node: Containerd, service: ServiceProcess, guest_image: GuestImage
) -> None:
    b = free_link_local_byte()
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    network = f"{node.name}net"
    client, sandbox_id, status = await pending_pod(node, service, b, mac)
    vm: GuestVM | None = None
    try:
        # the far side of the pod's veth gets the address the guest expects (no isGateway)
        run("ip", "addr", "add", f"{host_ip_for_mac(mac)}/24", "dev", bridge_of(node))
        vm, reply = await shim_stand_in_starts_the_vm(
            guest_image, node.top, sandbox_id, status.netns, service.socket
        )
        guest_nic = await plugged_nic(vm, reply, sandbox_id, network, mac)
        await ping_until([*PING, "-I", bridge_of(node), guest_ip_for_mac(mac)], GUEST)
        await vm.wait_for(
            rf"QMPNET PING name={guest_nic} peer={host_ip_for_mac(mac)} result=ok", GUEST
        )
        assert len(vm_nics(await qemu_view(vm.qmp_path))) == 1
        after = await qmpnet_json("status", "--json", socket=service.socket)
        assert after["pending_attachments"] == []

        cursor = vm.console_cursor()
        await client.stop_pod_sandbox(sandbox_id, timeout=CRI)
        # containerd ran DEL: the NIC is gone from QEMU and the guest, the address released
        await vm.wait_for(rf"QMPNET NIC-DEL name={guest_nic} mac={mac}", GUEST, since=cursor)
        unplugged = await qemu_view(vm.qmp_path)
        assert not vm_nics(unplugged), unplugged
        assert not unplugged.netdevs, unplugged
        assert reservations(node, network) == set()
        assert node.netns() == []
        assert bridge_ports(bridge_of(node)) == []
        await client.remove_pod_sandbox(sandbox_id, timeout=CRI)
        assert await client.list_pod_sandbox() == []
        # the stand-in shim's end: forget the VM, then stop it
        await qmpnet_json("vm", "unregister", sandbox_id, socket=service.socket)
    finally:
        if vm is not None:
            await vm.stop()
    final = await qmpnet_json("status", "--json", socket=service.socket)
    assert final["pending_attachments"] == []
    assert all(v["id"] != sandbox_id for v in final["vms"]), final
    assert await node.close() == []
    assert node.leftovers() == []


@pytest.mark.asyncio
async def test_del_after_the_vm_is_gone_succeeds_as_with_containerds_own_stop_order(
    node: Containerd, service: ServiceProcess, guest_image: GuestImage
) -> None:
    """containerd's StopPodSandbox stops the sandbox's task first and runs DEL only after it:
    under a VM runtime the VM is gone by then. The stand-in shim stops its VM first, as the
    task's end would; DEL must still succeed and leave nothing."""
    b = free_link_local_byte()
    mac = f"52:54:00:{random.randrange(256):02x}:{random.randrange(256):02x}:{b:02x}"
    network = f"{node.name}net"
    client, sandbox_id, status = await pending_pod(node, service, b, mac)
    vm, reply = await shim_stand_in_starts_the_vm(
        guest_image, node.top, sandbox_id, status.netns, service.socket
    )
    try:
        await plugged_nic(vm, reply, sandbox_id, network, mac)
    finally:
        await vm.stop()
    assert not vm.qmp_path.exists()

    await client.stop_pod_sandbox(sandbox_id, timeout=CRI)

    assert reservations(node, network) == set()
    assert node.netns() == []
    assert bridge_ports(bridge_of(node)) == []
    await client.remove_pod_sandbox(sandbox_id, timeout=CRI)
    assert await client.list_pod_sandbox() == []
    final = await qmpnet_json("status", "--json", socket=service.socket)
    assert final["pending_attachments"] == []
    assert await node.close() == []
    assert node.leftovers() == []
