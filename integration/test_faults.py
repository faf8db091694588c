"""Fault injection at every step of a hot-plug and an unplug: nothing half-made remains.

Each test makes one named step fail with a realistic fault, injected through a lifecycle
observer (``NetworkState.observers``, public API) at that step:

- netlink / host: a veth or netns deleted mid-way, a link or qdisc already holding the name,
  the state file's directory entry taken by a directory;
- QEMU's own error reply (real QEMU): a duplicate netdev or device id (made on the VM
  manager's monitor at the step), a root port launched with hot-plug off, no free slot;
- QEMU killed with SIGKILL at the step (the QMP connection drops);
- a timeout: a stopped guest never releases a device nor sets DRIVER_OK.

A fake QMP peer (:class:`qmpnet.testing.fakeqemu.FakeQemu`) stands in for QEMU only where
QEMU cannot be made to fail that way for a correct client: an error reply to ``getfd`` (QEMU
only refuses a ``getfd`` that came without an fd), to ``x-query-virtio-status`` of a device
that exists, and to ``device_del``/``netdev_del`` of a NIC that is plugged.
Everything on the host stays real.

Afterwards the independent views must show the state from before: ``ip -j link`` in the
sandbox netns and on the host, ``ip netns``, ``tc -j qdisc``, QOM ``/machine/peripheral``,
``query-pci``, ``info network``, ``closefd`` of the NIC's fd names, QEMU's tun fds in
``/proc/<pid>/fd``, the state file and journal, and this process's ``/proc/self/fd``. The
error is a PlugError naming the step, chained to the typed cause carrying QEMU's or the
kernel's message. The module prints the step x fault matrix at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from qmpnet.bandwidth import Bandwidth, Rate
from qmpnet.config import Config, Timeouts
from qmpnet.endpoints import Endpoint
from qmpnet.errors import (
    HostError,
    LinkExistsError,
    NetnsError,
    NotOursError,
    PlugError,
    QmpCommandError,
    QmpDisconnectedError,
    QmpTimeoutError,
    StateError,
    UnplugTimeoutError,
    UnsupportedError,
)
from qmpnet.lifecycle import Operation, Phase, Step
from qmpnet.marks import claimed_owner
from qmpnet.model import InterfaceDescription, InterworkingModel, LinkState
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.reconcile import Outcome, reconcile
from qmpnet.testing.fakeqemu import FakeQemu
from qmpnet.testing.fixtures import module_vm
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.probe import (
    OpenFd,
    has_ingress,
    held_fd_names,
    journal_file,
    link_fingerprint,
    marked_links,
    netns_names,
    ns_name,
    open_fds,
    qdiscs,
    qemu_view,
    saved_ids,
    state_file,
    tun_count,
)
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.probe import monitor_command as hmp
from qmpnet.testing.scene import RUN, make_sandbox
from qmpnet.testing.steps import StepRecorder
from qmpnet.testing.vm import GuestVM

pytestmark = [pytest.mark.qemu, pytest.mark.kernel, pytest.mark.asyncio(loop_scope="module")]

QUEUES = 2
MAC = "52:54:00:00:02:21"
#: the state file once a plugged NIC was removed again
EMPTY = {"version": 1, "endpoints": []}


def _nics(state: Any) -> Any:
    """A state file's content without the VM identity and socket it records beside the NICs."""
    if not isinstance(state, dict):
        return state
    return {k: v for k, v in state.items() if k not in ("vm", "qmp")}


VIRT = "eth1"
#: every plug is shaped both ways, so every fault's undo must take the shaping away too
SHAPED = Bandwidth(inbound=Rate(average=12_500_000), outbound=Rate(average=2_500_000))

# --- the matrix --------------------------------------------------------------------------------

COLUMNS = (
    "netlink / host",
    "QEMU error reply",
    "QEMU killed (SIGKILL)",
    "timeout",
    "fake QMP peer",
)
ROWS = [s.value for s in Step]
MATRIX: dict[tuple[str, str], list[str]] = {}
HOST_STEPS = (
    "validate",
    "prepare-links",
    "open-queues",
    "shape",
    "persist",
    "remove-links",
    "forget",
)
NOT_APPLICABLE = {
    **{
        (row, c): "— (no QMP call in this step)"
        for row in HOST_STEPS
        for c in COLUMNS[1:]
        if c != COLUMNS[2]
    },
    **{
        (row, COLUMNS[0]): "— (no netlink call in this step)"
        for row in (
            "pass-fds",
            "netdev-add",
            "device-add",
            "wait-guest",
            "device-del",
            "netdev-del",
        )
    },
    **{
        (row, COLUMNS[2]): "— (no QMP call after this step: the unplug completes)"
        for row in ("remove-links", "forget")
    },
    **{
        ("open-vhost", c): "n/a: no /dev/vhost-net on this host, the step never runs"
        for c in COLUMNS
    },
}


def record(step: Step, column: str, text: str) -> None:
    assert column in COLUMNS
    MATRIX.setdefault((step.value, column), []).append(text)


def render_matrix() -> list[str]:
    lines = ["| step | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in ROWS:
        cells = []
        for col in COLUMNS:
            found = MATRIX.get((row, col))
            cells.append("<br>".join(found) if found else NOT_APPLICABLE.get((row, col), "—"))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _print_matrix(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    lines = [
        "",
        "fault matrix (step x fault -> result; 'clean' = every view as before):",
        *render_matrix(),
    ]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)


# --- fixtures and the views --------------------------------------------------------------------

#: one running guest for the faults that leave QEMU alive
booted = module_vm("flt")


@contextlib.asynccontextmanager
async def fresh_vm(
    image: GuestImage, workdir: Path, *, paused: bool = True, **kwargs: Any
) -> AsyncIterator[GuestVM]:
    vm = await GuestVM.start(image, workdir, paused=paused, name=f"{RUN}-fv", **kwargs)
    try:
        yield vm
    finally:
        await vm.stop()


def config(**timeouts: float) -> Config:
    values = {"unplug": 10.0, "guest_ready": 30.0, "connect": 30.0, **timeouts}
    return Config(tap_name=f"{RUN}f{{idx}}", queues=QUEUES, timeouts=Timeouts(**values))


@attrs.define
class Views:
    """Everything the independent tools say, before a fault; compared after it."""

    netns: str
    sandbox: dict[str, Any]
    ingress: bool
    #: the sandbox link's qdiscs (kind, handle): the tcfilter model shapes on its egress
    virt_qdiscs: list[tuple[str, str]]
    host_ours: set[str]
    netns_list: set[str]
    qemu: Any
    tun: int
    qemu_fds: int
    state: Any
    #: this process's open fds: one the operation left open is new after it (tap queues,
    #: vhost, QMP and netlink sockets, files). Fds that close meanwhile do not matter: the
    #: collector closes earlier tests' garbage when it likes, and a QEMU killed by the test
    #: closes our ends of its console pipes.
    driver_fds: frozenset[OpenFd]


async def views(vm_qmp: str | None, pid: int | None, netns: str, state_dir: Path) -> Views:
    qemu = await qemu_view(vm_qmp) if vm_qmp else None
    return Views(
        netns=netns,
        sandbox={n: link_fingerprint(v) for n, v in ip_links(netns).items()} if netns else {},
        ingress=has_ingress(netns, VIRT) if netns else False,
        virt_qdiscs=sorted((q["kind"], q["handle"]) for q in qdiscs(netns, VIRT)) if netns else [],
        host_ours={n for n in ip_links() if n.startswith(RUN)},
        netns_list={n for n in netns_names() if n.startswith(RUN)},
        qemu=qemu,
        tun=tun_count(pid) if pid else 0,
        qemu_fds=len(os.listdir(f"/proc/{pid}/fd")) if pid else 0,
        state=state_file(state_dir),
        driver_fds=open_fds(),
    )


def at(step: Step, phase: Phase, action: Callable[[Operation], Any]) -> Callable[..., Any]:
    """An observer that runs ``action`` once, when the operation reaches (step, phase)."""
    done = False

    async def observe(op: Operation, s: Step, p: Phase) -> None:
        nonlocal done
        if not done and s is step and p is phase:
            done = True
            result = action(op)
            if inspect.isawaitable(result):
                await result

    return observe


def kill(vm: GuestVM) -> Callable[[Operation], None]:
    def action(_: Operation) -> None:
        os.kill(vm.pid, signal.SIGKILL)

    return action


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


async def assert_clean(
    before: Views,
    endpoint_id: str,
    vm_qmp: str | None,
    pid: int | None,
    state_dir: Path,
    *,
    sandbox_change: Callable[[dict[str, Any]], None] | None = None,
    netns_gone: bool = False,
) -> None:
    """Every view as before the operation, and nothing of ``endpoint_id`` anywhere."""
    assert endpoint_id, "the operation never got an endpoint"
    after = await views(vm_qmp, pid, "" if netns_gone else before.netns, state_dir)
    if netns_gone:
        assert ns_name(before.netns) not in netns_names()
    elif before.netns:
        expected = dict(before.sandbox)
        if sandbox_change:
            sandbox_change(expected)
        assert after.sandbox == expected, "the sandbox netns links changed"
        assert after.ingress == before.ingress, "tc ingress on the sandbox link changed"
        assert after.virt_qdiscs == before.virt_qdiscs, "the sandbox link's qdiscs changed"
        assert not marked_links(before.netns)
    gone_ns = {ns_name(before.netns)} if netns_gone else set()
    assert after.netns_list == before.netns_list - gone_ns
    assert after.host_ours == before.host_ours, "host links with the run prefix changed"
    assert not [a for a in marked_links().values() if claimed_owner(a) == endpoint_id]
    if vm_qmp:
        assert after.qemu == before.qemu, "QOM / query-pci / info network changed"
        assert not after.qemu.has_any_of(endpoint_id)
        assert await held_fd_names(vm_qmp, endpoint_id) == []
        assert after.tun == before.tun, "QEMU holds a different number of tap queues"
    # the state also records which QEMU its NICs belong to: what matters here is the NICs
    assert _nics(after.state) == _nics(before.state), "the state file changed"
    assert journal_file(state_dir) is None, "the journal must be empty"
    leaked = sorted(after.driver_fds - before.driver_fds, key=lambda fd: fd.number)
    assert not leaked, f"the driver left fds open: {[(fd.number, fd.target) for fd in leaked]}"


def expect(err: PlugError, step: Step, cause: type[BaseException], text: str) -> str:
    assert err.step == step.value, f"failed at {err.step}, expected {step.value}: {err}"
    assert isinstance(err.cause, cause), repr(err.cause)
    assert err.__cause__ is err.cause
    assert text in str(err.cause), f"{text!r} not in {err.cause}"
    return f"PlugError({err.step}) ← {type(err.cause).__name__} “{text}”"


@attrs.define
class Scene:
    """One sandbox (netns + veth) and a state dir, for one fault."""

    netns: str
    state_dir: Path
    recorder: StepRecorder = attrs.field(factory=StepRecorder)

    def state(
        self, qmp: str | Path, cfg: Config | None = None, *inject: Callable[..., Any]
    ) -> NetworkState:
        st = NetworkState.open(self.state_dir, str(qmp), cfg or config())
        st.observers.extend([self.recorder, *inject])
        return st

    async def plug(
        self,
        state: NetworkState,
        *,
        model: InterworkingModel = InterworkingModel.TCFILTER,
        tap_name: str | None = None,
        wait_guest: bool = True,
        link: LinkState = LinkState.UP,
        bandwidth: Bandwidth | None = SHAPED,
    ) -> Endpoint:
        return await state.add_interface(
            InterfaceDescription(name=VIRT, hw_addr=MAC, bandwidth=bandwidth),
            model=model,
            netns_path=self.netns,
            tap_name=tap_name,
            wait_guest=wait_guest,
            link=link,
        )

    async def plug_fails(self, state: NetworkState, **kw: Any) -> PlugError:
        with pytest.raises(PlugError) as info:
            await self.plug(state, **kw)
        return info.value

    async def unplug_fails(self, state: NetworkState) -> PlugError:
        with pytest.raises(PlugError) as info:
            await state.remove_interface(MAC)
        return info.value


@pytest.fixture
def scene(make_netns: Callable[[], str], tmp_path: Path) -> Scene:
    netns = make_netns()
    make_sandbox(netns, VIRT, MAC)
    return Scene(netns, tmp_path / "state")


def drop(*names: str) -> Callable[[dict[str, Any]], None]:
    def change(links: dict[str, Any]) -> None:
        for name in names:
            links.pop(name, None)

    return change


# --- hot-plug: netlink / host faults ------------------------------------------------------------


async def test_validate_sandbox_link_missing(
    booted: GuestVM, make_netns: Callable[[], str], tmp_path: Path
) -> None:
    sc = Scene(make_netns(), tmp_path / "state")  # no veth in it
    before = await views(booted.qmp_path, booted.pid, sc.netns, sc.state_dir)
    err = await sc.plug_fails(sc.state(booted.mgmt_qmp_path))
    text = expect(err, Step.VALIDATE, HostError, "No such device")
    await assert_clean(before, sc.recorder.endpoint_id, booted.qmp_path, booted.pid, sc.state_dir)
    record(Step.VALIDATE, "netlink / host", f"veth missing: {text}; clean")


@pytest.mark.parametrize(
    ("phase", "fails_at"),
    [(Phase.BEGIN, Step.VALIDATE), (Phase.DONE, Step.OPEN_QUEUES)],
    ids=["validate", "open-queues"],
)
async def test_netns_deleted(booted: GuestVM, scene: Scene, phase: Phase, fails_at: Step) -> None:
    """The sandbox netns goes as validate begins (validate fails) or ends (open-queues)."""
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(
        booted.mgmt_qmp_path,
        None,
        at(Step.VALIDATE, phase, lambda _: sh("ip", "netns", "del", ns_name(scene.netns))),
    )
    err = await scene.plug_fails(state)
    text = expect(err, fails_at, NetnsError, "No such file or directory")
    await assert_clean(
        before,
        scene.recorder.endpoint_id,
        booted.qmp_path,
        booted.pid,
        scene.state_dir,
        netns_gone=True,
    )
    record(fails_at, "netlink / host", f"netns deleted: {text}; clean")


async def test_open_queues_name_clash(booted: GuestVM, scene: Scene) -> None:
    sh(
        "ip",
        "-n",
        ns_name(scene.netns),
        "link",
        "add",
        "clash0",
        "type",
        "veth",
        "peer",
        "name",
        "clash0p",
    )
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    err = await scene.plug_fails(scene.state(booted.mgmt_qmp_path), tap_name="clash0")
    text = expect(err, Step.OPEN_QUEUES, LinkExistsError, "already exists")
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )  # the dummy is in `before`: untouched
    record(
        Step.OPEN_QUEUES, "netlink / host", f"tap name taken: {text}; other link untouched; clean"
    )


async def test_shape_someone_elses_root_qdisc_on_the_sandbox_link(
    booted: GuestVM, scene: Scene
) -> None:
    """tcfilter shapes the guest's outbound on the sandbox link's egress: a root qdisc that
    appears there meanwhile is someone else's, refused and left; the inbound half goes."""
    ns = ns_name(scene.netns)
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(
        booted.mgmt_qmp_path,
        None,
        at(
            Step.SHAPE,
            Phase.BEGIN,
            lambda _: sh(
                "tc", "-n", ns, "qdisc", "add", "dev", VIRT, "root", "handle", "5:", "pfifo"
            ),
        ),
    )
    err = await scene.plug_fails(state)
    text = expect(err, Step.SHAPE, UnsupportedError, "root qdisc qmpnet did not make")
    assert ("pfifo", "5:") in [(q["kind"], q["handle"]) for q in qdiscs(scene.netns, VIRT)]
    sh("tc", "-n", ns, "qdisc", "del", "dev", VIRT, "root")
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(Step.SHAPE, "netlink / host", f"foreign root qdisc: {text}; it is left; clean")


async def test_shape_the_nics_ifb_name_taken(booted: GuestVM, scene: Scene) -> None:
    """bridged shapes the guest's outbound through the NIC's ifb (``qi`` + its id): a link of
    that name made meanwhile is not ours, refused and left as it is."""
    ns = ns_name(scene.netns)
    taken: list[str] = []

    def squat(op: Operation) -> None:
        assert op.subject is not None
        taken.append("qi" + op.subject.id[2:])
        sh("ip", "-n", ns, "link", "add", taken[0], "type", "bridge")

    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(booted.mgmt_qmp_path, None, at(Step.SHAPE, Phase.BEGIN, squat))
    err = await scene.plug_fails(state, model=InterworkingModel.BRIDGED)
    text = expect(err, Step.SHAPE, NotOursError, "not created by qmpnet")
    squatter = ip_links(scene.netns)[taken[0]]
    assert squatter["linkinfo"]["info_kind"] == "bridge"
    assert not squatter.get("ifalias")
    sh("ip", "-n", ns, "link", "del", taken[0])
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(Step.SHAPE, "netlink / host", f"ifb name taken: {text}; other link untouched; clean")


async def test_prepare_links_veth_deleted(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(
        booted.mgmt_qmp_path,
        None,
        at(
            Step.OPEN_QUEUES,
            Phase.DONE,
            lambda _: sh("ip", "-n", ns_name(scene.netns), "link", "del", VIRT),
        ),
    )
    err = await scene.plug_fails(state)
    text = expect(err, Step.PREPARE_LINKS, HostError, "No such device")
    before.ingress = False
    before.virt_qdiscs = []  # the link is gone, and its qdiscs with it
    await assert_clean(
        before,
        scene.recorder.endpoint_id,
        booted.qmp_path,
        booted.pid,
        scene.state_dir,
        sandbox_change=drop(VIRT, VIRT + "p"),
    )
    record(Step.PREPARE_LINKS, "netlink / host", f"veth deleted mid-way: {text}; clean")


async def test_prepare_links_foreign_ingress_qdisc(booted: GuestVM, scene: Scene) -> None:
    sh("tc", "-n", ns_name(scene.netns), "qdisc", "add", "dev", VIRT, "ingress")
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    assert before.ingress
    err = await scene.plug_fails(scene.state(booted.mgmt_qmp_path))
    # refused when the sandbox link is read, before the tap or any qdisc is made
    text = expect(err, Step.VALIDATE, UnsupportedError, "already has an ingress qdisc")
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )  # the foreign qdisc is still there
    record(
        Step.VALIDATE,
        "netlink / host",
        f"ingress qdisc already there: {text}; foreign qdisc kept; clean",
    )


async def test_prepare_links_macvtap_name_clash(booted: GuestVM, scene: Scene) -> None:
    """The macvtap model changes the sandbox link's MAC first: the undo must give it back."""
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(
        booted.mgmt_qmp_path,
        None,
        at(
            Step.VALIDATE,
            Phase.DONE,
            lambda _: sh(
                "ip",
                "-n",
                ns_name(scene.netns),
                "link",
                "add",
                "clash1",
                "type",
                "veth",
                "peer",
                "name",
                "clash1p",
            ),
        ),
    )
    err = await scene.plug_fails(state, model=InterworkingModel.MACVTAP, tap_name="clash1")
    text = expect(err, Step.PREPARE_LINKS, LinkExistsError, "already exists")
    after = ip_links(scene.netns)
    assert after[VIRT]["address"] == MAC, "the sandbox link has its own MAC back"
    assert "ifalias" not in after["clash1"]

    def added(links: dict[str, Any]) -> None:
        for name in ("clash1", "clash1p"):
            links[name] = link_fingerprint(after[name])

    await assert_clean(
        before,
        scene.recorder.endpoint_id,
        booted.qmp_path,
        booted.pid,
        scene.state_dir,
        sandbox_change=added,
    )
    record(
        Step.PREPARE_LINKS,
        "netlink / host",
        f"macvtap name taken mid-way: {text}; MAC restored; clean",
    )


# --- hot-plug: QEMU error replies (real QEMU) ---------------------------------------------------


async def test_netdev_add_duplicate_id(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    injected: list[str] = []

    async def clash(op: Operation) -> None:
        injected.append(f"{op.subject.id}-net")
        await hmp(booted.qmp_path, "netdev_add", {"type": "hubport", "id": injected[0], "hubid": 7})

    err = await scene.plug_fails(
        scene.state(booted.mgmt_qmp_path, None, at(Step.PASS_FDS, Phase.DONE, clash))
    )
    text = expect(err, Step.NETDEV_ADD, QmpCommandError, f"Duplicate ID '{injected[0]}'")
    info = await hmp(booted.qmp_path, "human-monitor-command", {"command-line": "info network"})
    assert injected[0] in info, "the netdev qmpnet did not make is left alone"
    await hmp(booted.qmp_path, "netdev_del", {"id": injected[0]})
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(Step.NETDEV_ADD, "QEMU error reply", f"duplicate netdev id: {text}; fds closed; clean")


async def test_device_add_duplicate_id(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    injected: list[str] = []

    async def clash(op: Operation) -> None:
        injected.append(f"{op.subject.id}-dev")
        await hmp(
            booted.qmp_path,
            "device_add",
            {"driver": "virtio-net-pci", "id": injected[0], "bus": "rp3"},
        )

    err = await scene.plug_fails(
        scene.state(booted.mgmt_qmp_path, None, at(Step.NETDEV_ADD, Phase.DONE, clash))
    )
    text = expect(err, Step.DEVICE_ADD, QmpCommandError, "Duplicate")
    assert injected[0] in (await qemu_view(booted.qmp_path)).devices, "left alone"
    async with await _manager(booted) as s:
        await s.device_del(injected[0], 60)
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(
        Step.DEVICE_ADD, "QEMU error reply", f"duplicate device id: {text}; netdev deleted; clean"
    )


async def _manager(vm: GuestVM) -> QmpSession:
    return await QmpSession.connect(str(vm.qmp_path), connect_timeout=30)


async def test_device_add_bus_without_hotplug(
    guest_image: GuestImage, scene: Scene, tmp_path: Path
) -> None:
    port = "pcie-root-port,id=rpoff,bus=pcie.0,chassis=9,slot=9,hotplug=off"
    async with fresh_vm(guest_image, tmp_path, root_ports=0, extra_args=["-device", port]) as vm:
        before = await views(vm.qmp_path, vm.pid, scene.netns, scene.state_dir)
        err = await scene.plug_fails(scene.state(vm.mgmt_qmp_path), wait_guest=False)
        text = expect(err, Step.DEVICE_ADD, QmpCommandError, "does not support hotplugging")
        await assert_clean(before, scene.recorder.endpoint_id, vm.qmp_path, vm.pid, scene.state_dir)
    record(Step.DEVICE_ADD, "QEMU error reply", f"bad bus: {text}; clean")


async def test_device_add_no_free_slot(
    guest_image: GuestImage, scene: Scene, tmp_path: Path
) -> None:
    async with fresh_vm(guest_image, tmp_path, root_ports=0) as vm:
        before = await views(vm.qmp_path, vm.pid, scene.netns, scene.state_dir)
        err = await scene.plug_fails(scene.state(vm.mgmt_qmp_path), wait_guest=False)
        text = expect(err, Step.DEVICE_ADD, UnsupportedError, "no free hot-pluggable PCI slot")
        await assert_clean(before, scene.recorder.endpoint_id, vm.qmp_path, vm.pid, scene.state_dir)
    record(Step.DEVICE_ADD, "QEMU error reply", f"no free slot: {text}; clean")


# --- hot-plug: QEMU killed at the step -----------------------------------------------------------

PLUG_KILLS = [
    Step.VALIDATE,
    Step.OPEN_QUEUES,
    Step.PREPARE_LINKS,
    Step.SHAPE,
    Step.PASS_FDS,
    Step.NETDEV_ADD,
    Step.DEVICE_ADD,
    Step.WAIT_GUEST,
]


@pytest.mark.parametrize("step", PLUG_KILLS, ids=[s.value for s in PLUG_KILLS])
async def test_plug_qemu_killed(
    guest_image: GuestImage, scene: Scene, tmp_path: Path, step: Step
) -> None:
    async with fresh_vm(guest_image, tmp_path, root_ports=4) as vm:
        before = await views(vm.qmp_path, vm.pid, scene.netns, scene.state_dir)
        state = scene.state(vm.mgmt_qmp_path, None, at(step, Phase.BEGIN, kill(vm)))
        err = await scene.plug_fails(state)
        # A host step has no QMP call of its own: the first QMP step after it fails.
        failed = (
            step
            if step in (Step.PASS_FDS, Step.NETDEV_ADD, Step.DEVICE_ADD, Step.WAIT_GUEST)
            else Step.PASS_FDS
        )
        text = expect(err, failed, QmpDisconnectedError, "connection to QEMU lost")
        note = ""
        if journal_file(scene.state_dir) is not None:
            # an undo needed QEMU: the journal keeps the hot-plug until a reconcile
            report = await reconcile(scene.state(vm.mgmt_qmp_path))
            assert [a.outcome for a in report.actions] == [Outcome.DROPPED_QEMU_GONE]
            note = "journal kept → reconcile: dropped (QEMU gone); "
        await assert_clean(before, scene.recorder.endpoint_id, None, None, scene.state_dir)
    where = "" if failed is step else f"fails at {failed.value}: "
    record(step, "QEMU killed (SIGKILL)", f"{where}{text}; {note}host clean")


async def test_persist_qemu_killed(guest_image: GuestImage, scene: Scene, tmp_path: Path) -> None:
    async with fresh_vm(guest_image, tmp_path, root_ports=4) as vm:
        before = await views(vm.qmp_path, vm.pid, scene.netns, scene.state_dir)
        state = scene.state(vm.mgmt_qmp_path, None, at(Step.PERSIST, Phase.BEGIN, kill(vm)))
        ep = await scene.plug(state, wait_guest=False)
        assert saved_ids(scene.state_dir) == {ep.id: "plugged"}
        report = await reconcile(state)
        assert [a.outcome for a in report.actions] == [Outcome.DROPPED_QEMU_GONE]
        before.state = EMPTY
        await assert_clean(before, ep.id, None, None, scene.state_dir)
    record(
        Step.PERSIST,
        "QEMU killed (SIGKILL)",
        "no QMP in this step: the plug returns; reconcile drops it (QEMU gone); host clean",
    )


# --- hot-plug: timeouts --------------------------------------------------------------------------


async def test_wait_guest_timeout_stopped_guest(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)

    async def stop(_: Operation) -> None:
        await hmp(booted.qmp_path, "stop")

    cfg = config(guest_ready=3.0, unplug=2.0)
    state = scene.state(booted.mgmt_qmp_path, cfg, at(Step.DEVICE_ADD, Phase.BEGIN, stop))
    try:
        err = await scene.plug_fails(state)
        text = expect(err, Step.WAIT_GUEST, QmpTimeoutError, "within 3 s")
        # The undo's device_del cannot complete while the guest is stopped: the device is
        # still in QEMU and the journal keeps the hot-plug.
        assert f"{scene.recorder.endpoint_id}-dev" in (await qemu_view(booted.qmp_path)).devices
        assert journal_file(scene.state_dir) is not None
        assert saved_ids(scene.state_dir) == {}
    finally:
        await hmp(booted.qmp_path, "cont")
    report = await reconcile(scene.state(booted.mgmt_qmp_path, config()))
    assert [a.outcome for a in report.actions] == [Outcome.ROLLED_BACK], report.lines()
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(
        Step.WAIT_GUEST,
        "timeout",
        f"guest stopped: {text}; undo device_del pending → "
        "journal kept; after cont, reconcile rolled back; clean",
    )


HUNG_PLUG = [Step.PASS_FDS, Step.NETDEV_ADD, Step.DEVICE_ADD, Step.SET_LINK, Step.ANNOUNCE]


@pytest.mark.parametrize("step", HUNG_PLUG, ids=[s.value for s in HUNG_PLUG])
async def test_plug_qemu_hung(booted: GuestVM, scene: Scene, step: Step) -> None:
    """QEMU stopped (SIGSTOP) at the step: its command hits the deadline, so do the undo's.

    The journal keeps the hot-plug; once QEMU runs again it executes what was queued, and
    a reconcile rolls back whatever is left.
    """
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(
        booted.mgmt_qmp_path,
        config(command=1.0),
        at(step, Phase.BEGIN, lambda _: os.kill(booted.pid, signal.SIGSTOP)),
    )
    try:
        err = await scene.plug_fails(state, link=_link_for(step))
    finally:
        os.kill(booted.pid, signal.SIGCONT)
    text = expect(err, step, QmpTimeoutError, "no answer from QEMU within 1 s")
    assert journal_file(scene.state_dir) is not None, "the undo could not reach QEMU"
    report = await reconcile(scene.state(booted.mgmt_qmp_path))
    assert [a.outcome for a in report.actions] == [Outcome.ROLLED_BACK], report.lines()
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(
        step,
        "timeout",
        f"QEMU hung (SIGSTOP): {text}; undo timed out → journal kept; "
        "after SIGCONT, reconcile rolled back; clean",
    )


def _link_for(step: Step) -> LinkState:
    """The link a plug must ask for to reach ``step`` (set-link runs for a link set down)."""
    return LinkState.DOWN if step is Step.SET_LINK else LinkState.UP


STALLED_PLUG = [Step.NETDEV_ADD, Step.DEVICE_ADD]


@pytest.mark.parametrize("step", STALLED_PLUG, ids=[s.value for s in STALLED_PLUG])
async def test_plug_qemu_stalls_past_the_deadline_then_runs_the_command(
    booted: GuestVM, scene: Scene, step: Step
) -> None:
    """QEMU stops answering for 1.5 s, past the 1 s command deadline, then runs what was
    queued: the command that timed out still happens. Its undo must be there for it, so
    the plug's own rollback leaves nothing, with no reconcile needed."""
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    loop = asyncio.get_running_loop()

    def stall(_: Operation) -> None:
        os.kill(booted.pid, signal.SIGSTOP)
        loop.call_later(1.5, os.kill, booted.pid, signal.SIGCONT)

    state = scene.state(booted.mgmt_qmp_path, config(command=1.0), at(step, Phase.BEGIN, stall))
    try:
        err = await scene.plug_fails(state)
    finally:
        await asyncio.sleep(1.6)
        os.kill(booted.pid, signal.SIGCONT)
    text = expect(err, step, QmpTimeoutError, "no answer from QEMU within 1 s")
    assert journal_file(scene.state_dir) is None
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(step, "timeout", f"QEMU stalled 1.5 s, then ran it: {text}; undone; clean")


# --- persist: the state file cannot be written ---------------------------------------------------


def _state_path_taken(state_dir: Path) -> Callable[[Operation], None]:
    """Make ``state.json`` a directory, so the rename over it fails (EISDIR)."""

    def action(_: Operation) -> None:
        path = state_dir / "state.json"
        if path.exists():
            path.rename(state_dir / "state.json.aside")
        path.mkdir()

    return action


def _state_path_back(state_dir: Path) -> None:
    (state_dir / "state.json").rmdir()
    if (state_dir / "state.json.aside").exists():
        (state_dir / "state.json.aside").rename(state_dir / "state.json")


async def test_persist_state_unwritable(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state = scene.state(
        booted.mgmt_qmp_path,
        None,
        at(Step.PERSIST, Phase.BEGIN, _state_path_taken(scene.state_dir)),
    )
    err = await scene.plug_fails(state)
    text = expect(err, Step.PERSIST, StateError, "Is a directory")
    _state_path_back(scene.state_dir)
    await assert_clean(
        before, scene.recorder.endpoint_id, booted.qmp_path, booted.pid, scene.state_dir
    )
    record(
        Step.PERSIST,
        "netlink / host",
        f"state file unwritable: {text}; device, netdev, tap removed; clean",
    )


# --- hot-plug: the fake peer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "command", "desc"),
    [
        (Step.PASS_FDS, "getfd", "No file descriptor supplied via SCM_RIGHTS"),
        (
            Step.WAIT_GUEST,
            "x-query-virtio-status",
            "Path /machine/peripheral/x/virtio-backend is not a VirtIODevice",
        ),
        (Step.SET_LINK, "set_link", "Device 'x-dev' not found"),
        (Step.ANNOUNCE, "announce-self", "Parameter 'rounds' expects a positive number"),
    ],
    ids=["getfd", "virtio-status", "set-link", "announce"],
)
async def test_plug_error_reply_fake_peer(
    scene: Scene, tmp_path: Path, step: Step, command: str, desc: str
) -> None:
    fake = FakeQemu(tmp_path / "fake.sock")
    try:
        before = await views(None, None, scene.netns, scene.state_dir)
        fake.fail[command] = desc
        err = await scene.plug_fails(scene.state(tmp_path / "fake.sock"), link=_link_for(step))
        text = expect(err, step, QmpCommandError, desc)
        await fake.settled()
        assert not fake.fds
        assert not fake.netdevs
        assert not fake.devices
        await assert_clean(before, scene.recorder.endpoint_id, None, None, scene.state_dir)
    finally:
        fake.close()
    record(step, "fake QMP peer", f"{command} error: {text}; clean")


# --- unplug --------------------------------------------------------------------------------------


async def _plugged(
    scene: Scene, vm_mgmt: str | Path, cfg: Config | None = None, *inject: Callable[..., Any]
) -> tuple[NetworkState, Endpoint]:
    state = scene.state(vm_mgmt, cfg, *inject)
    ep = await scene.plug(state)
    return state, ep


async def test_device_del_timeout_stopped_guest(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)

    async def stop(_: Operation) -> None:
        await hmp(booted.qmp_path, "stop")

    state, ep = await _plugged(
        scene, booted.mgmt_qmp_path, config(unplug=2.0), at(Step.DEVICE_DEL, Phase.BEGIN, stop)
    )
    try:
        err = await scene.unplug_fails(state)
        text = expect(err, Step.DEVICE_DEL, UnplugTimeoutError, "no DEVICE_DELETED within 2 s")
        assert saved_ids(scene.state_dir) == {ep.id: "unplug-pending"}
        assert journal_file(scene.state_dir) is None
        assert f"{ep.id}-dev" in (await qemu_view(booted.qmp_path)).devices
    finally:
        await hmp(booted.qmp_path, "cont")
    report = await reconcile(state)
    assert [a.outcome for a in report.actions] == [Outcome.PENDING_COMPLETED], report.lines()
    before.state = EMPTY
    await assert_clean(before, ep.id, booted.qmp_path, booted.pid, scene.state_dir)
    record(
        Step.DEVICE_DEL,
        "timeout",
        f"guest stopped: {text}; entry unplug-pending; after cont, reconcile completed it; clean",
    )


@pytest.mark.parametrize(
    "step", [Step.DEVICE_DEL, Step.NETDEV_DEL], ids=["device-del", "netdev-del"]
)
async def test_unplug_qemu_killed(
    guest_image: GuestImage, scene: Scene, tmp_path: Path, step: Step
) -> None:
    # netdev-del comes after the guest released the device: that needs a running guest.
    async with fresh_vm(guest_image, tmp_path, root_ports=4, paused=step is Step.DEVICE_DEL) as vm:
        before = await views(vm.qmp_path, vm.pid, scene.netns, scene.state_dir)
        state = scene.state(vm.mgmt_qmp_path, None, at(step, Phase.BEGIN, kill(vm)))
        ep = await scene.plug(state, wait_guest=step is not Step.DEVICE_DEL)
        err = await scene.unplug_fails(state)
        text = expect(err, step, QmpDisconnectedError, "connection to QEMU lost")
        assert saved_ids(scene.state_dir) == {ep.id: "unplug-pending"}
        report = await reconcile(state)
        assert [a.outcome for a in report.actions] == [Outcome.DROPPED_QEMU_GONE]
        before.state = EMPTY
        await assert_clean(before, ep.id, None, None, scene.state_dir)
    record(
        step,
        "QEMU killed (SIGKILL)",
        f"{text}; entry unplug-pending → reconcile: dropped (QEMU gone); host clean",
    )


@pytest.mark.parametrize(
    ("step", "command", "desc"),
    [
        (Step.DEVICE_DEL, "device_del", "Bus 'rp0' does not support hotplugging"),
        (Step.NETDEV_DEL, "netdev_del", "Device 'x-net' is in use"),
    ],
    ids=["device_del", "netdev_del"],
)
async def test_unplug_error_reply_fake_peer(
    scene: Scene, tmp_path: Path, step: Step, command: str, desc: str
) -> None:
    fake = FakeQemu(tmp_path / "fake.sock")
    try:
        before = await views(None, None, scene.netns, scene.state_dir)
        state, ep = await _plugged(scene, tmp_path / "fake.sock")
        fake.fail[command] = desc
        err = await scene.unplug_fails(state)
        text = expect(err, step, QmpCommandError, desc)
        assert saved_ids(scene.state_dir) == {ep.id: "unplug-pending"}
        # nothing was torn down past the failed step: the tap still carries the NIC
        assert ep.host_link in ip_links(scene.netns)
        report = await reconcile(state)
        assert [a.outcome for a in report.actions] == [Outcome.PENDING_COMPLETED]
        await fake.settled()
        assert not fake.fds
        assert not fake.netdevs
        assert not fake.devices
        before.state = EMPTY
        await assert_clean(before, ep.id, None, None, scene.state_dir)
    finally:
        fake.close()
    record(
        step,
        "fake QMP peer",
        f"{command} error: {text}; entry unplug-pending → reconcile completed it; clean",
    )


async def test_netdev_del_qemu_hung(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state, ep = await _plugged(
        scene,
        booted.mgmt_qmp_path,
        config(command=1.0),
        at(Step.NETDEV_DEL, Phase.BEGIN, lambda _: os.kill(booted.pid, signal.SIGSTOP)),
    )
    try:
        err = await scene.unplug_fails(state)
    finally:
        os.kill(booted.pid, signal.SIGCONT)
    text = expect(err, Step.NETDEV_DEL, QmpTimeoutError, "no answer from QEMU within 1 s")
    assert saved_ids(scene.state_dir) == {ep.id: "unplug-pending"}
    report = await reconcile(scene.state(booted.mgmt_qmp_path))
    assert [a.outcome for a in report.actions] == [Outcome.PENDING_COMPLETED], report.lines()
    before.state = EMPTY
    await assert_clean(before, ep.id, booted.qmp_path, booted.pid, scene.state_dir)
    record(
        Step.NETDEV_DEL,
        "timeout",
        f"QEMU hung (SIGSTOP): {text}; entry unplug-pending; "
        "after SIGCONT, reconcile completed it; clean",
    )


async def test_remove_links_netns_deleted(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state, ep = await _plugged(
        scene,
        booted.mgmt_qmp_path,
        None,
        at(Step.NETDEV_DEL, Phase.DONE, lambda _: sh("ip", "netns", "del", ns_name(scene.netns))),
    )
    await state.remove_interface(MAC)  # a cleanup that finds nothing is not an error
    before.state = EMPTY
    await assert_clean(before, ep.id, booted.qmp_path, booted.pid, scene.state_dir, netns_gone=True)
    record(
        Step.REMOVE_LINKS,
        "netlink / host",
        "netns deleted mid-way: best effort, warning logged, unplug completes; clean",
    )


async def test_forget_state_unwritable(booted: GuestVM, scene: Scene) -> None:
    before = await views(booted.qmp_path, booted.pid, scene.netns, scene.state_dir)
    state, ep = await _plugged(
        scene,
        booted.mgmt_qmp_path,
        None,
        at(Step.FORGET, Phase.BEGIN, _state_path_taken(scene.state_dir)),
    )
    err = await scene.unplug_fails(state)
    text = expect(err, Step.FORGET, StateError, "Is a directory")
    _state_path_back(scene.state_dir)
    # QEMU and the host are done; the file could not say so, the journal still does.
    assert not (await qemu_view(booted.qmp_path)).has_any_of(ep.id)
    assert saved_ids(scene.state_dir) == {ep.id: "plugged"}
    assert journal_file(scene.state_dir) is not None
    report = await reconcile(state)
    assert [a.outcome for a in report.actions] == [Outcome.COMPLETED]
    before.state = EMPTY
    await assert_clean(before, ep.id, booted.qmp_path, booted.pid, scene.state_dir)
    record(
        Step.FORGET,
        "netlink / host",
        f"state file unwritable: {text}; journal kept → reconcile completed the unplug; clean",
    )
