"""qmpnet-cni through qmpnetd: a pod's first network waits for its VM, then is plugged.

A container runtime runs CNI ADD before the sandbox's VM exists (containerd's CRI does);
with the service on the node, the plugin's process forwards the invocation, the service
keeps the attachment pending and plugs it when the VM is registered under the sandbox's
container id, or when the socket the configuration names appears. Every call execs the
installed ``qmpnet-cni`` as a runtime does (see ``test_cni.py``); what happened is checked
on the guest's console, on QEMU's other monitor, with ``ip -j`` and through ``status``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_cni import GUEST, PING, VERSION, Runtime, chained, mac_ending

from qmpnet.testing.cni import Pod, free_link_local_byte, ping_until, pod_network
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import guest_ip_for_mac, host_ip_for_mac
from qmpnet.testing.output import conforms
from qmpnet.testing.probe import ip_json, owned_links, qemu_view
from qmpnet.testing.scene import unique
from qmpnet.testing.service import ServiceProcess
from qmpnet.testing.vm import GuestVM, GuestVMError

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

QMPNET = str(Path(sys.executable).with_name("qmpnet"))
PENDING_CODE, PLUG_FAILED_CODE, CHECK_FAILED_CODE = 107, 108, 104


vm = module_vm("cnisvc", root_ports=8)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServiceProcess]:
    async with await ServiceProcess.start(
        tmp_path_factory.mktemp("qmpnetd"), args=["--log-format", "json"]
    ) as svc:
        yield svc
    assert svc.returncode == 0, svc.tail()


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    bin_dir = tmp_path / "cni-bin"
    bin_dir.mkdir()
    for name in ("bridge", "host-local"):
        (bin_dir / name).symlink_to(Path("/usr/lib/cni") / name)
    (bin_dir / "qmpnet-cni").symlink_to(Path(sys.executable).with_name("qmpnet-cni"))
    return Runtime(bin_dir)


async def qmpnet(svc: ServiceProcess, *args: str) -> Any:
    done = await asyncio.to_thread(
        subprocess.run,
        [QMPNET, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **svc.env},
        check=False,
    )
    assert done.returncode == 0, done.stderr + svc.tail()
    return json.loads(done.stdout) if done.stdout.strip() else None


async def pending(svc: ServiceProcess) -> list[dict[str, Any]]:
    status = conforms(await qmpnet(svc, "status", "--json"), "status")
    return list(status["pending_attachments"])


async def until_none_pending(svc: ServiceProcess, timeout: float = 60.0) -> None:
    """Poll ``status`` (the service's own view, over its socket) until nothing is pending."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await pending(svc):
        assert asyncio.get_running_loop().time() < deadline, await pending(svc)
        await asyncio.sleep(0.2)


def call_of(pod: Pod) -> dict[str, str]:
    return {"container": pod.container_id, "netns": f"/run/netns/{pod.netns}", "ifname": "eth0"}


async def expect_error(runtime: Runtime, command: str, conf: dict[str, Any], pod: Pod) -> Any:
    reply = await runtime.call(command, conf, **call_of(pod))
    return reply.error()


_TAKEN: set[int] = set()


class Network:
    """One pod network on the bridge plugin, with the addresses the guest's init expects."""

    def __init__(self, prefix: str) -> None:
        self.byte = free_link_local_byte(_TAKEN)
        _TAKEN.add(self.byte)
        self.mac = mac_ending(self.byte)
        self.prefix = prefix

    def pod(self) -> Any:
        return pod_network(
            self.prefix,
            f"169.254.{self.byte}.0/24",
            mac=self.mac,
            range_start=f"169.254.{self.byte}.100",
            bridge_address=f"{host_ip_for_mac(self.mac)}/24",
        )


async def guest_has_it(vm: GuestVM, pod: Pod, mac: str, cursor: int) -> str:
    """The guest saw a NIC with the pod's MAC, got its address and answers on the bridge."""
    added = await vm.wait_for(rf"QMPNET NIC-ADD name=\S+ mac={mac}\b", GUEST, since=cursor)
    guest_nic = added.group(0).split("name=")[1].split()[0]
    await vm.wait_for(rf"QMPNET NIC-ADDR name={guest_nic} ", GUEST, since=cursor)
    await ping_until([*PING, "-I", pod.bridge, guest_ip_for_mac(mac)], GUEST)
    return guest_nic


async def test_a_pods_first_network_waits_for_its_vm_and_is_plugged_when_it_is_registered(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    net = Network(unique("q"))
    async with net.pod() as pod:
        state = tmp_path / "cni" / pod.container_id
        # no qmpSocket: the runtime's shim registers the VM under the sandbox's id
        conf = chained(pod, stateDir=f"{tmp_path}/cni/{{containerId}}", qmpnetd=str(service.socket))
        devices_before = (await qemu_view(vm.qmp_path)).devices
        result = await runtime.ok("ADD", conf, **call_of(pod))
        # the result a chained plugin owes, at once: prevResult passed on with our interface
        assert result == {**pod.result.raw, "cniVersion": VERSION}
        (waiting,) = await pending(service)
        assert waiting["container_id"] == pod.container_id
        assert (waiting["ifname"], waiting["status"], waiting["qmp"]) == ("eth0", "pending", "")
        table = await asyncio.to_thread(
            subprocess.run,
            [QMPNET, "status"],
            capture_output=True,
            text=True,
            env={**os.environ, **service.env},
            check=True,
        )
        assert "pending CNI attachments: 1" in table.stdout, table.stdout
        assert f"{pod.container_id}  eth0  " in table.stdout, table.stdout
        assert (await qemu_view(vm.qmp_path)).devices == devices_before  # nothing plugged yet
        assert owned_links(f"/run/netns/{pod.netns}") == {}  # nor made on the host
        err = await expect_error(runtime, "CHECK", {**conf, "prevResult": result}, pod)
        assert err["code"] == PENDING_CODE, err
        assert "pending" in err["msg"], err

        # the stand-in for a VM runtime's shim: the VM is up, register it by sandbox id
        cursor = vm.console_cursor()
        reply = await qmpnet(
            service,
            "vm",
            "register",
            "--id",
            pod.container_id,
            "--qmp",
            str(vm.mgmt_qmp_path),
            "--sandbox",
            f"/run/netns/{pod.netns}",
        )
        ((plugged,),) = [conforms(reply, "vmRegistered")["attachments"]]
        assert plugged["status"] == "plugged", reply
        assert await pending(service) == []
        # the service's JSON log says which sandbox, VM, NIC and step each record is about
        records = [json.loads(line) for line in service.lines() if line.startswith("{")]
        assert any(
            r.get("container_id") == pod.container_id
            and r.get("mac") == net.mac
            and r.get("step") == "device-add"
            and r.get("vm") == str(vm.mgmt_qmp_path)
            for r in records
        ), service.tail()
        guest_nic = await guest_has_it(vm, pod, net.mac, cursor)
        ((_, owner),) = owned_links(f"/run/netns/{pod.netns}").items()
        assert f"{owner}-dev" in (await qemu_view(vm.qmp_path)).devices
        # the VM's state is the service's; the CNI's directory holds only its records
        assert not (state / "state.json").exists()
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call_of(pod))

        cursor = vm.console_cursor()
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        await vm.wait_for(rf"QMPNET NIC-DEL name={guest_nic} mac={net.mac}", GUEST, since=cursor)
        assert f"{owner}-dev" not in (await qemu_view(vm.qmp_path)).devices
        assert owned_links(f"/run/netns/{pod.netns}") == {}
        assert not state.exists()
        await runtime.ok("DEL", conf, **call_of(pod))  # again: fine
        await qmpnet(service, "vm", "unregister", pod.container_id)


async def test_a_pending_bridged_attachment_reports_the_mac_its_pod_link_will_wear(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    """The bridged model parks the pod's link on a MAC derived from the NIC's id, and gives
    the guest's NIC the pod's own: a pending ADD chooses that id, so its result names what
    the link wears once the VM is there, as an ADD into a running VM does."""
    net = Network(unique("q"))
    async with net.pod() as pod:
        netns = f"/run/netns/{pod.netns}"
        conf = chained(pod, stateDir=f"{tmp_path}/cni/{{containerId}}", qmpnetd=str(service.socket))
        conf["model"] = "bridged"
        result = await runtime.ok("ADD", conf, **call_of(pod))
        (ours,) = [i for i in result["interfaces"] if i.get("sandbox") and i["name"] == "eth0"]
        parked = ours["mac"]
        assert parked != pod.mac
        assert ip_json("link", "show", "eth0", netns=netns)[0]["address"] == pod.mac  # not yet
        cursor = vm.console_cursor()
        reply = await qmpnet(
            service, "vm", "register", "--id", pod.container_id, "--qmp", str(vm.mgmt_qmp_path)
        )
        ((plugged,),) = [reply["attachments"]]
        assert plugged["status"] == "plugged", reply
        await guest_has_it(vm, pod, net.mac, cursor)  # the guest's NIC has the pod's MAC
        assert ip_json("link", "show", "eth0", netns=netns)[0]["address"] == parked
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call_of(pod))
        cursor = vm.console_cursor()
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        await vm.wait_for(rf"QMPNET NIC-DEL name=\S+ mac={net.mac}", GUEST, since=cursor)
        assert ip_json("link", "show", "eth0", netns=netns)[0]["address"] == pod.mac  # back
        await qmpnet(service, "vm", "unregister", pod.container_id)


async def test_an_attachment_waits_for_its_socket_to_appear_and_is_plugged_then(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    net = Network(unique("q"))
    async with net.pod() as pod:
        state = tmp_path / "cni" / pod.container_id
        where = tmp_path / "sockets"  # not there yet, nor its directory
        conf = chained(
            pod,
            stateDir=f"{tmp_path}/cni/{{containerId}}",
            qmpnetd=str(service.socket),
            qmpSocket=f"{where}/{{containerId}}/qmp.sock",
        )
        result = await runtime.ok("ADD", conf, **call_of(pod))
        (waiting,) = await pending(service)
        assert waiting["qmp"] == f"{where}/{pod.container_id}/qmp.sock"
        cursor = vm.console_cursor()
        # the VM manager puts the pod's monitor where the configuration says
        (where / pod.container_id).mkdir(parents=True)
        (where / pod.container_id / "qmp.sock").symlink_to(vm.mgmt_qmp_path)
        await until_none_pending(service)
        await guest_has_it(vm, pod, net.mac, cursor)
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call_of(pod))
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        assert owned_links(f"/run/netns/{pod.netns}") == {}
        assert not state.exists()
        vms = await qmpnet(service, "vm", "list", "--json")
        for known in vms["vms"]:
            if Path(known["qmp"]).name == "qmp.sock":
                await qmpnet(service, "vm", "unregister", known["id"])


async def test_add_into_a_running_vm_plugs_through_the_service_at_once(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    net = Network(unique("q"))
    async with net.pod() as pod:
        state = tmp_path / "cni" / pod.container_id
        conf = chained(
            pod,
            stateDir=f"{tmp_path}/cni/{{containerId}}",
            qmpnetd=str(service.socket),
            qmpSocket=str(vm.mgmt_qmp_path),
        )
        cursor = vm.console_cursor()
        result = await runtime.ok("ADD", conf, **call_of(pod))
        assert await pending(service) == []
        await guest_has_it(vm, pod, net.mac, cursor)
        listed = await qmpnet(service, "list-ifaces", "--qmp", str(vm.mgmt_qmp_path), "--json")
        assert net.mac in json.dumps(listed["interfaces"]), listed
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        assert owned_links(f"/run/netns/{pod.netns}") == {}
        assert not state.exists()


async def test_del_cancels_gc_drops_and_check_reports_a_failed_plug(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    nets = [Network(unique("q")) for _ in range(3)]
    async with nets[0].pod() as first, nets[1].pod() as second, nets[2].pod() as third:
        confs = {
            p.container_id: chained(
                p, stateDir=f"{tmp_path}/cni/{{containerId}}", qmpnetd=str(service.socket)
            )
            for p in (first, second, third)
        }
        for p in (first, second, third):
            await runtime.ok("ADD", confs[p.container_id], **call_of(p))
        assert {w["container_id"] for w in await pending(service)} == {
            first.container_id,
            second.container_id,
            third.container_id,
        }
        # DEL before the VM appeared cancels the attachment; CHECK then finds nothing
        await runtime.ok("DEL", confs[first.container_id], **call_of(first))
        err = await expect_error(runtime, "CHECK", confs[first.container_id], first)
        assert err["code"] == CHECK_FAILED_CODE, err
        # GC (1.1) drops what the runtime no longer lists
        gc = {
            **{k: v for k, v in confs[second.container_id].items() if k != "prevResult"},
            "cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [{"containerID": third.container_id, "ifname": "eth0"}],
        }
        reply = await runtime.call("GC", gc, container="", netns="", ifname="")
        assert reply.status == 0, reply
        assert {w["container_id"] for w in await pending(service)} == {third.container_id}
        # the pod's link vanishes before its VM comes: the plug fails, is undone and reported
        await asyncio.to_thread(
            subprocess.run, ["ip", "-n", third.netns, "link", "del", "eth0"], check=True
        )
        reply = await qmpnet(
            service, "vm", "register", "--id", third.container_id, "--qmp", str(vm.mgmt_qmp_path)
        )
        ((failed,),) = [reply["attachments"]]
        assert failed["status"] == "failed", reply
        assert "eth0" in failed["error"], reply
        err = await expect_error(runtime, "CHECK", confs[third.container_id], third)
        assert err["code"] == PLUG_FAILED_CODE, err
        devices = (await qemu_view(vm.qmp_path)).devices
        assert not any(d.startswith("qn") for d in devices), devices
        await runtime.ok("DEL", confs[third.container_id], **call_of(third))
        assert await pending(service) == []
        await qmpnet(service, "vm", "unregister", third.container_id)


async def test_pending_attachments_outlive_a_service_restart(
    runtime: Runtime, tmp_path: Path
) -> None:
    net = Network(unique("q"))
    root, sock = tmp_path / "root", tmp_path / "svc" / "qmpnetd.sock"
    async with net.pod() as pod:
        conf = chained(pod, stateDir=f"{tmp_path}/cni/{{containerId}}", qmpnetd=str(sock))
        async with await ServiceProcess.start(tmp_path, root=root, socket=sock) as svc:
            await runtime.ok("ADD", conf, **call_of(pod))
        assert svc.returncode == 0, svc.tail()
        async with await ServiceProcess.start(tmp_path, root=root, socket=sock) as svc:
            (waiting,) = await pending(svc)
            assert waiting["container_id"] == pod.container_id
            await runtime.ok("DEL", conf, **call_of(pod))
            assert await pending(svc) == []
        assert svc.returncode == 0, svc.tail()


async def test_a_pod_torn_down_in_the_wrong_order_leaves_the_vm_and_nothing_on_the_host(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    """The pod's netns goes while its NIC (two queue pairs, the guest uses both) is plugged,
    before the runtime's DEL: the service hears it, the DEL still unplugs, QEMU lives on."""
    net = Network(unique("q"))
    async with net.pod() as pod:
        conf = chained(
            pod,
            stateDir=f"{tmp_path}/cni/{{containerId}}",
            qmpnetd=str(service.socket),
            qmpSocket=str(vm.mgmt_qmp_path),
            queues=2,
        )
        cursor = vm.console_cursor()
        result = await runtime.ok("ADD", conf, **call_of(pod))
        guest_nic = await guest_has_it(vm, pod, net.mac, cursor)
        added = await vm.wait_for(rf"QMPNET NIC-ADD name={guest_nic} \S+ rxq=2", GUEST)
        assert added
        ((tap, owner),) = owned_links(f"/run/netns/{pod.netns}").items()
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", pod.netns], check=True)
        # the service lost every path to the tap with the netns (QEMU's fds keep it alive)
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            status = await qmpnet(service, "status", "--json")
            if any(tap in v["vanished_links"] for v in status["vms"]):
                break
            assert asyncio.get_running_loop().time() < deadline, status
            await asyncio.sleep(0.2)
        cursor = vm.console_cursor()
        await runtime.ok("DEL", {**conf, "prevResult": result}, **{**call_of(pod), "netns": ""})
        await vm.wait_for(rf"QMPNET NIC-DEL name={guest_nic} mac={net.mac}", GUEST, since=cursor)
        assert f"{owner}-dev" not in (await qemu_view(vm.qmp_path)).devices
        assert await vm.died_by_itself() is None
        assert not (tmp_path / "cni" / pod.container_id).exists()
        await runtime.ok("DEL", conf, **{**call_of(pod), "netns": ""})


@pytest.mark.parametrize("queues", [2, 1])
async def test_a_tap_deleted_behind_our_back_is_not_unplugged_when_multiqueue(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path, queues: int
) -> None:
    """Someone deletes the NIC's tap itself (not the netns, whose taps QEMU's fds keep alive).
    QEMU 7.2 aborts when the guest then resets a multiqueue NIC (``could not disable queue``,
    ``virtio_net_set_queue_pairs: Assertion '!r' failed``: seen here with a 2-queue NIC), and
    an unplug is such a reset. So the DEL succeeds and leaves a 2-queue NIC plugged, without
    a backend, QEMU alive; a 1-queue NIC, which the reset cannot break, is unplugged."""
    net = Network(unique("q"))
    async with net.pod() as pod:
        conf = chained(
            pod,
            stateDir=f"{tmp_path}/cni/{{containerId}}",
            qmpnetd=str(service.socket),
            qmpSocket=str(vm.mgmt_qmp_path),
            queues=queues,
        )
        cursor = vm.console_cursor()
        result = await runtime.ok("ADD", conf, **call_of(pod))
        guest_nic = await guest_has_it(vm, pod, net.mac, cursor)
        ((tap, owner),) = owned_links(f"/run/netns/{pod.netns}").items()
        await asyncio.to_thread(
            subprocess.run, ["ip", "-n", pod.netns, "link", "del", tap], check=True
        )
        cursor = vm.console_cursor()
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        assert not (tmp_path / "cni" / pod.container_id).exists()  # the runtime is done
        if queues == 1:
            await vm.wait_for(
                rf"QMPNET NIC-DEL name={guest_nic} mac={net.mac}", GUEST, since=cursor
            )
            assert f"{owner}-dev" not in (await qemu_view(vm.qmp_path)).devices
        else:
            # the guest was not asked to let it go (it would have within seconds)
            with pytest.raises(GuestVMError, match="no console line matched"):
                await vm.wait_for(rf"QMPNET NIC-DEL name={guest_nic} ", 5, since=cursor)
            assert f"{owner}-dev" in (await qemu_view(vm.qmp_path)).devices
            # marked: the service shows the NIC plugged with its host link gone
            listed = await qmpnet(service, "list-ifaces", "--qmp", str(vm.mgmt_qmp_path), "--json")
            (entry,) = [e for e in listed["interfaces"] if e["mac"] == net.mac]
            assert (entry["status"], entry.get("host_link_gone")) == ("plugged", True), entry
        assert await vm.died_by_itself() is None


async def test_a_vm_registered_before_its_monitor_listens_is_plugged_once_it_does(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    """A shim may register the sandbox's VM before QEMU has made its monitor: the pending
    attachment waits on the registered socket and is plugged when it appears."""
    net = Network(unique("q"))
    async with net.pod() as pod:
        conf = chained(pod, stateDir=f"{tmp_path}/cni/{{containerId}}", qmpnetd=str(service.socket))
        result = await runtime.ok("ADD", conf, **call_of(pod))
        later = tmp_path / "later" / "qmp.sock"
        reply = await qmpnet(
            service, "vm", "register", "--id", pod.container_id, "--qmp", str(later)
        )
        ((waiting,),) = [reply["attachments"]]
        assert (waiting["status"], waiting["qmp"]) == ("pending", str(later)), reply
        cursor = vm.console_cursor()
        later.parent.mkdir()
        later.symlink_to(vm.mgmt_qmp_path)  # the monitor appears
        await until_none_pending(service)
        await guest_has_it(vm, pod, net.mac, cursor)
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call_of(pod))
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        assert owned_links(f"/run/netns/{pod.netns}") == {}
        await qmpnet(service, "vm", "unregister", pod.container_id)


async def test_a_plug_the_service_was_killed_in_is_run_again_from_its_record(
    vm: GuestVM, service: ServiceProcess, runtime: Runtime, tmp_path: Path
) -> None:
    """The service records an attachment before it plugs it; killed then, it finds that
    record next time: the VM's journal says the NIC is not plugged, so the record goes and
    the plug runs again (rather than failing as "already attached")."""
    from qmpnet.cni.records import Attachment, Book, Records

    net = Network(unique("q"))
    async with net.pod() as pod:
        conf = chained(pod, stateDir=f"{tmp_path}/cni/{{containerId}}", qmpnetd=str(service.socket))
        result = await runtime.ok("ADD", conf, **call_of(pod))
        # what a plug interrupted right after its first write leaves behind
        book = Book(tmp_path / "cni" / pod.container_id)
        book.dir.mkdir(parents=True, mode=0o700)
        await book.save(
            Records(
                (
                    Attachment(
                        network=conf["name"],
                        container_id=pod.container_id,
                        ifname="eth0",
                        netns=f"/run/netns/{pod.netns}",
                        mac=net.mac,
                        qmp_socket=str(vm.mgmt_qmp_path),
                    ),
                )
            )
        )
        cursor = vm.console_cursor()
        reply = await qmpnet(
            service, "vm", "register", "--id", pod.container_id, "--qmp", str(vm.mgmt_qmp_path)
        )
        ((plugged,),) = [reply["attachments"]]
        assert plugged["status"] == "plugged", reply
        await guest_has_it(vm, pod, net.mac, cursor)
        await runtime.ok("CHECK", {**conf, "prevResult": result}, **call_of(pod))
        await runtime.ok("DEL", {**conf, "prevResult": result}, **call_of(pod))
        assert owned_links(f"/run/netns/{pod.netns}") == {}
        assert not book.dir.exists()
        await qmpnet(service, "vm", "unregister", pod.container_id)
