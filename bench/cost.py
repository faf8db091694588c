"""Driver cost: import time, and the CLI's process wall time and peak RSS.

Every figure comes from fresh processes. The interpreter's own start-up is measured in
the same loop (``python -c pass``, alternated with the imports) so it can be told apart.
Peak RSS comes from GNU time, which forks the command itself (see :data:`bench.harness.GNU_TIME`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
from pathlib import Path

from bench.harness import (
    GUEST_TIMEOUT,
    Context,
    Proc,
    give_peer,
    mac,
    ms,
    name,
    nic_add_re,
    nic_del_re,
    spawn,
)
from bench.stats import Report

#: -X importtime's line: "import time:  self [us] | cumulative | name"
_IMPORTTIME = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s+(\S.*)$")


def _cumulative_us(stderr: str, module: str) -> int:
    for line in stderr.splitlines():
        match = _IMPORTTIME.match(line)
        if match and match.group(3).strip() == module:
            return int(match.group(2))
    raise LookupError(f"-X importtime printed no line for {module}")


def _top_level_us(stderr: str) -> int:
    """The sum of the cumulative times of the top-level imports: all a program imported."""
    total = 0
    for line in stderr.splitlines():
        match = _IMPORTTIME.match(line)
        # nested imports are indented past the one space after the last "|"
        if match and not line.rsplit("|", 1)[1].startswith("  "):
            total += int(match.group(2))
    return total


#: what the thin client (service mode: QMPNET_SOCKET set) imports before it sends a request
THIN_CLIENT = "import qmpnet.cli, qmpnet.service.client"


def _mib(p: Proc) -> float:
    assert p.maxrss_kib is not None
    return p.maxrss_kib / 1024


async def run(ctx: Context, report: Report) -> None:
    await _imports(ctx, report)
    await _cni_version(ctx, report)
    await _cni_add(ctx, report)
    await _cli(ctx, report)


#: Debian's Go CNI plugin, the yardstick for a plugin's process cost
BRIDGE = "/usr/lib/cni/bridge"
#: what libcni's version query sets besides CNI_COMMAND
LIBCNI_VERSION_ENV = {"CNI_NETNS": "dummy", "CNI_IFNAME": "dummy", "CNI_PATH": "dummy"}
CNI_VERSION_TARGET_MS = 40.0


async def _cni_version(ctx: Context, report: Report) -> None:
    """VERSION as libcni asks it: qmpnet-cni next to Debian's bridge, alternating."""
    import os

    table = report.table(
        "CNI VERSION, as libcni asks it (CNI_NETNS=dummy CNI_IFNAME=dummy CNI_PATH=dummy)",
        [
            "wall: spawn → exit of the whole plugin process, the two alternating",
            f"target: qmpnet-cni ≤ {CNI_VERSION_TARGET_MS:g} ms (median)",
            "the compiled front is what `make install-cni` puts in a node's CNI bin_dir",
        ],
    )
    env = {**os.environ, "CNI_COMMAND": "VERSION", **LIBCNI_VERSION_ENV}
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "qmpnet-cni"})
    plugins = {
        "qmpnet-cni": str(Path(sys.executable).with_name("qmpnet-cni")),
        "qmpnet-cni (compiled front)": str(await asyncio.to_thread(_compiled_front)),
    }
    if await asyncio.to_thread(os.path.exists, BRIDGE):
        plugins["bridge (Debian, Go)"] = BRIDGE
    for _ in range(ctx.pick(30, 5)):
        for label, path in plugins.items():
            p = (await spawn([path], stdin=conf, env=env)).check()
            assert json.loads(p.stdout)["cniVersion"] == "1.0.0", p.stdout
            table.row(f"wall: {label}").add(ms(p.wall))
        p = (await spawn([plugins["qmpnet-cni"]], stdin=conf, env=env, rss=True)).check()
        table.row("peak RSS: qmpnet-cni", "MiB").add(_mib(p))


CNI_ADD_TARGET = 2.0


def _compiled_front() -> Path:
    from qmpnet.testing.gobuild import cni_shim

    return cni_shim()


async def _cni_add(ctx: Context, report: Report) -> None:
    """A pod's ADD as containerd runs it: Debian's bridge first, then qmpnet-cni through
    qmpnetd into a sandbox whose VM is not there yet (the first-network case: checked,
    answered and kept pending), each a whole process, in the same loop."""
    import os
    import shutil

    from qmpnet.testing.cni import bridge_config
    from qmpnet.testing.service import ServiceProcess

    table = report.table(
        "CNI ADD of a pod: Debian's bridge, then qmpnet-cni chained through qmpnetd",
        [
            "wall: spawn → exit of the whole plugin process, bridge measured first each cycle",
            "qmpnet-cni's VM is not there yet: the ADD is checked (netns, the pod's link) and "
            "kept pending; a plug into a running VM adds the protocol request of "
            "`python -m bench service`",
            f"target: qmpnet-cni ADD ≤ {CNI_ADD_TARGET:g} x bridge ADD (median)",
            "both fronts each cycle: the Python console script, and the compiled front "
            "(`make install-cni`) a node installs; each ADD is undone by its DEL",
        ],
    )
    if not await asyncio.to_thread(os.path.exists, BRIDGE):
        table.row("skipped: Debian's bridge plugin is not installed", "n/a")
        return
    work = ctx.scratch("cniadd")
    fronts = {
        "qmpnet-cni": str(Path(sys.executable).with_name("qmpnet-cni")),
        "compiled front": str(await asyncio.to_thread(_compiled_front)),
    }
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "QMPNET_"))}
    async with await ServiceProcess.start(work, verbose=1) as svc:
        for i in range(ctx.pick(30, 5)):
            netns, bridge, container = name("n"), name("b"), name("c")
            await spawn(["ip", "netns", "add", netns])
            env = {
                **base,
                "CNI_CONTAINERID": container,
                "CNI_NETNS": f"/run/netns/{netns}",
                "CNI_IFNAME": "eth0",
                "CNI_PATH": "/usr/lib/cni",
            }
            conf = bridge_config(
                "benchnet", bridge, f"169.254.{200 + i % 40}.0/24", work / f"ipam{i}"
            )
            ours = {
                "cniVersion": conf["cniVersion"],
                "name": "benchnet",
                "type": "qmpnet-cni",
                "qmpnetd": str(svc.socket),
                "stateDir": f"{work}/cni/{{containerId}}",
            }
            try:
                p = await spawn([BRIDGE], json.dumps(conf), {**env, "CNI_COMMAND": "ADD"})
                table.row("wall: bridge ADD").add(ms(p.check().wall))
                prev = json.loads(p.stdout)
                chained = json.dumps({**ours, "prevResult": prev})
                order = list(fronts.items())
                for label, plugin in order if i % 2 else reversed(order):
                    q = await spawn([plugin], chained, {**env, "CNI_COMMAND": "ADD"})
                    table.row(f"wall: {label} ADD (pending)").add(ms(q.check().wall))
                    table.row(f"ratio: {label} / bridge", "x").add(q.wall / p.wall)
                    d = await spawn([plugin], chained, {**env, "CNI_COMMAND": "DEL"})
                    table.row(f"wall: {label} DEL (cancels it)").add(ms(d.check().wall))
            finally:
                await spawn([BRIDGE], json.dumps(conf), {**env, "CNI_COMMAND": "DEL"})
                await spawn(["ip", "link", "del", bridge])
                await spawn(["ip", "netns", "del", netns])
                shutil.rmtree(work / f"ipam{i}", ignore_errors=True)


async def _imports(ctx: Context, report: Report) -> None:
    py = sys.executable
    runs = ctx.pick(15, 4)
    table = report.table(
        "import cost (a fresh interpreter per sample)",
        [
            "process wall: spawn → exit of `python -c ...`; `pass` is the bare interpreter",
            "peak RSS: the process's own, from GNU time in a separate run",
            "-X importtime: the cumulative time Python itself reports for the module;"
            " `import qmpnet` loads its public names lazily, on first use",
            "qmpnet.cli is what the `qmpnet` command imports before parsing its arguments;"
            " qmpnet.network (pyroute2, qemu.qmp, attrs, cattrs) is loaded by add/del-iface"
            " in the direct mode",
            "thin client: what `qmpnet` imports in service mode (qmpnet.cli and"
            " qmpnet.service.client, stdlib only); its -X importtime row sums every top-level"
            " import the program made, the interpreter's own start-up imports excluded",
        ],
    )
    programs = {
        "pass": "pass",
        "import qmpnet": "import qmpnet",
        "import qmpnet.cli": "import qmpnet.cli",
        "import qmpnet.network": "import qmpnet.network",
        "thin client": THIN_CLIENT,
    }
    for _ in range(runs):
        for label, code in programs.items():
            p = (await spawn([py, "-c", code])).check()
            table.row(f"process wall: {label}").add(ms(p.wall))
            p = (await spawn([py, "-c", code], rss=True)).check()
            table.row(f"peak RSS: {label}", "MiB").add(_mib(p))
        for module in ("qmpnet", "qmpnet.cli", "qmpnet.network"):
            p = (await spawn([py, "-X", "importtime", "-c", f"import {module}"])).check()
            table.row(f"-X importtime cumulative: {module}").add(
                _cumulative_us(p.stderr, module) / 1000
            )
        # -X importtime also lists the interpreter's own start-up imports (encodings, site):
        # those of `pass` are subtracted, so the row is what the thin client adds
        base = (await spawn([py, "-X", "importtime", "-c", "pass"])).check()
        p = (await spawn([py, "-X", "importtime", "-c", THIN_CLIENT])).check()
        table.row("-X importtime cumulative: thin client (service mode)").add(
            (_top_level_us(p.stderr) - _top_level_us(base.stderr)) / 1000
        )


async def _cli(ctx: Context, report: Report) -> None:
    cycles = ctx.pick(15, 3)
    table = report.table(
        "qmpnet CLI processes against a running q35 guest (1 queue)",
        [
            "wall: spawn → exit, including interpreter start-up, imports, QMP connect, the"
            " plug or unplug and the JSON it prints; add-iface does not wait for the guest",
            "peak RSS: the process's own, from GNU time, in separate plug/unplug cycles",
        ],
    )
    qmpnet_bin = str(Path(sys.executable).with_name("qmpnet"))
    async with contextlib.AsyncExitStack() as stack:
        vm = await ctx.boot(stack, machine="q35", root_ports=4)
        vm_args = ["--qmp", str(vm.mgmt_qmp_path), "--state", str(ctx.scratch("state"))]
        for _ in range(cycles):
            for rss in (False, True):
                p = (await spawn([qmpnet_bin, "--help"], rss=rss)).check()
                if rss:
                    table.row("peak RSS: qmpnet --help", "MiB").add(_mib(p))
                else:
                    table.row("wall: qmpnet --help").add(ms(p.wall))
                hw, tap = mac(50), name("x")
                cursor = vm.console_cursor()
                p = (
                    await spawn(
                        [
                            qmpnet_bin,
                            "add-iface",
                            *vm_args,
                            "--model",
                            "none",
                            "--queues",
                            "1",
                            "--tap-name",
                            tap,
                            "--no-vhost",
                            "-",
                        ],
                        stdin=json.dumps({"name": "eth1", "hwAddr": hw}),
                        rss=rss,
                    )
                ).check()
                if rss:
                    table.row("peak RSS: qmpnet add-iface", "MiB").add(_mib(p))
                else:
                    table.row("wall: qmpnet add-iface").add(ms(p.wall))
                await give_peer(tap, hw)
                await vm.wait_for(nic_add_re(hw), GUEST_TIMEOUT, since=cursor)
                cursor = vm.console_cursor()
                p = (await spawn([qmpnet_bin, "del-iface", *vm_args, "--mac", hw], rss=rss)).check()
                if rss:
                    table.row("peak RSS: qmpnet del-iface", "MiB").add(_mib(p))
                else:
                    table.row("wall: qmpnet del-iface").add(ms(p.wall))
                await vm.wait_for(nic_del_re(hw), GUEST_TIMEOUT, since=cursor)
