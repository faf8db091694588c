"""The ``qmpnet`` command: add, remove and list a VM's interfaces; reconcile; watch; demo.

Two modes, one output. When qmpnetd's socket exists (``--socket``, ``$QMPNET_SOCKET`` or
``/run/qmpnet/qmpnetd.sock``) the command is a thin client: it reads its input, sends one
request (:mod:`qmpnet.service.client`) and prints the reply, importing nothing beyond the
standard library. Otherwise, or with ``--direct``, it does the work in-process through the
library, under the same state root and locks; a user the service refuses falls back to the
direct mode with a note. Errors are one line on stderr naming what failed and why (QEMU's own
message kept), with a documented exit code (:mod:`qmpnet.exits`); a traceback only with
``--debug``.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 QEMU/QMP failure (a guest
refusing an unplug included: the NIC stays plugged), 5 host (netlink/syscall) failure,
6 timeout (an unplug left pending included), 7 unsupported request, 8 saved state unreadable
or unwritable, 9 reconcile could not finish every cleanup,
10 the service went away mid-request or speaks another protocol, 11 the VM's monitor is held
by qmpnetd (a direct call), 12 refused by qmpnetd.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from contextvars import ContextVar

from qmpnet.exits import (
    EXIT_CODES_TEXT,
    EXIT_DENIED,
    EXIT_HELD,
    EXIT_INCOMPLETE,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_QEMU,
    EXIT_SERVICE,
    EXIT_STATE,
    EXIT_TIMEOUT,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    exit_code_for,
)

#: mypy reads any name ``TYPE_CHECKING`` as true; at run time ``typing`` (~5 ms) is not imported
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    from typing import Any

    from qmpnet.config import Config
    from qmpnet.network import NetworkState
    from qmpnet.service.client import Client

__all__ = [
    "EXIT_DENIED",
    "EXIT_HELD",
    "EXIT_INCOMPLETE",
    "EXIT_INPUT",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_QEMU",
    "EXIT_SERVICE",
    "EXIT_STATE",
    "EXIT_TIMEOUT",
    "EXIT_UNSUPPORTED",
    "EXIT_USAGE",
    "build_parser",
    "exit_code_for",
    "main",
]

STATE_ROOT = "/run/qmpnet"
#: the most of an interface file the thin client reads (boundary.DOCUMENT_MAX + 1: the
#: service refuses what is over the cap, with the direct mode's own message)
_READ_MAX = (1 << 20) + 1


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("qmpnet")


def default_state_dir(qmp: str | None, root: str | None = None) -> str:
    """One state directory per VM, keyed by its QMP socket, unless told otherwise."""
    env = os.environ.get("QMPNET_STATE_DIR")
    if env:
        return env
    if not qmp:
        print("qmpnet: error: give --state DIR or --qmp SOCKET", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    from qmpnet import layout

    return layout.vm_dir(layout.state_root(root), qmp)


def setup_logging(verbose: int, fmt: str) -> None:
    from qmpnet.logs import setup_logging as setup

    setup(verbose, fmt)


# --- argument parsing ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    from qmpnet.errors import shown

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {shown(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return value


def _seconds(text: str) -> float:
    from qmpnet.errors import InvalidInputError, shown
    from qmpnet.limits import check_seconds

    try:
        return check_seconds("seconds", float(text))
    except ValueError as err:  # InvalidInputError is one too
        why = err.reason if isinstance(err, InvalidInputError) else "not a number of seconds"
        raise argparse.ArgumentTypeError(f"{why}: {shown(text)}") from None


def _vm_options(p: argparse.ArgumentParser, qmp_required: bool = True) -> None:
    p.add_argument(
        "--qmp",
        required=qmp_required,
        metavar="SOCKET",
        help="the VM's QMP unix socket (a monitor free for qmpnet)",
    )
    p.add_argument(
        "--state",
        metavar="DIR",
        help="state directory (default: $QMPNET_STATE_DIR or STATE_ROOT/vm-<hash of the "
        "socket path>; through the service, the service's own)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for name in ("connect", "command", "unplug", "guest"):
        p.add_argument(
            f"--timeout-{name}", type=_seconds, metavar="SEC", help=f"deadline for {name} (seconds)"
        )


def _announce_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-announce",
        action="store_true",
        help="do not announce the NIC (QMP announce-self) once its link is up",
    )
    p.add_argument(
        "--announce-rounds",
        type=_positive_int,
        metavar="N",
        help="announcement rounds (default: from config, else 5)",
    )


def _plug_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        choices=["none", "tcfilter", "macvtap", "bridged", "default"],
        help="interworking model (default: from config, else tcfilter)",
    )
    p.add_argument(
        "--netns",
        metavar="PATH",
        default="",
        help="network namespace of the interface (default: this one)",
    )
    p.add_argument(
        "--queues",
        type=_positive_int,
        metavar="N",
        help="queue pairs (default: from config, else one per guest vCPU)",
    )
    p.add_argument("--no-vhost", action="store_true", help="never use vhost-net")
    _announce_options(p)
    p.add_argument("--tap-name", metavar="NAME", help="host tap name (default: tap{idx}_kata)")


def _bandwidth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bandwidth",
        metavar="JSON",
        default="",
        help='libvirt\'s <bandwidth> as JSON: {"inbound": {"average": kB/s, "peak": kB/s, '
        '"burst": kB}, "outbound": {...}}; inbound is what the guest receives',
    )
    for way, what in (("inbound", "receives"), ("outbound", "sends")):
        p.add_argument(
            f"--{way}",
            metavar="AVG[,PEAK[,BURST]]",
            default="",
            help=f"shape what the guest {what}: kB/s (1000 bytes/s) and kB (1024 bytes), "
            "as virsh domiftune takes them",
        )


def _add_iface_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add = sub.add_parser("add-iface", help="hot-plug an interface described by JSON")
    _vm_options(add)
    _plug_options(add)
    add.add_argument(
        "--allow-foreign-link",
        action="store_true",
        help="let a NetPair join a link of the host's namespace or a bridge's port "
        "(refused by default, exit 3)",
    )
    add.add_argument(
        "--wait-guest",
        action="store_true",
        help="return only when the guest driver has the NIC (DRIVER_OK)",
    )
    add.add_argument(
        "--link",
        choices=["up", "down"],
        default="up",
        help="the NIC's link as the guest first sees it (default up; see set-link)",
    )
    _bandwidth_options(add)
    add.add_argument(
        "--trust-guest-rx-filters",
        action="store_true",
        help="macvtap model: the macvtap follows the guest's receive filter (its MAC, "
        "multicast groups, promiscuity); needs qmpnetd (refused in the direct mode, exit 7)",
    )
    add.add_argument("file", metavar="FILE|-", help="interface JSON (Kata agent style)")


def _del_iface_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rm = sub.add_parser("del-iface", help="unplug the interface with a MAC")
    _vm_options(rm)
    group = rm.add_mutually_exclusive_group(required=True)
    group.add_argument("--mac", help="MAC of the interface to remove")
    group.add_argument(
        "file", nargs="?", metavar="FILE|-", help="interface JSON; its hwAddr selects the interface"
    )


def _set_link_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    link = sub.add_parser(
        "set-link", help="set a plugged NIC's link up or down: the guest sees its carrier"
    )
    _vm_options(link)
    link.add_argument("--mac", required=True, help="MAC of the interface")
    _announce_options(link)
    link.add_argument("link_state", metavar="up|down", choices=["up", "down"])


def _set_mtu_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    mtu = sub.add_parser("set-mtu", help="set the MTU of a plugged NIC's host links, live")
    _vm_options(mtu)
    mtu.add_argument("--mac", required=True, help="MAC of the interface")
    mtu.add_argument("mtu", type=int, metavar="MTU")


def _set_bandwidth_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bw = sub.add_parser(
        "set-bandwidth",
        help="shape a plugged NIC's traffic live (the whole of it: a direction not given is "
        "not shaped), or --clear it",
    )
    _vm_options(bw)
    bw.add_argument("--mac", required=True, help="MAC of the interface")
    _bandwidth_options(bw)
    bw.add_argument("--clear", action="store_true", help="take every limit away")


def _stats_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    stats = sub.add_parser("stats", help="each NIC's host-link counters, queues and link")
    _vm_options(stats, qmp_required=False)
    stats.add_argument("--mac", help="only the interface with this MAC")
    stats.add_argument("--json", action="store_true", help="machine-readable output")


def _list_ifaces_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ls = sub.add_parser("list-ifaces", help="list the VM's interfaces from its saved state")
    _vm_options(ls, qmp_required=False)
    ls.add_argument("--json", action="store_true", help="machine-readable output")


def _reconcile_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rec = sub.add_parser("reconcile", help="finish or roll back interrupted operations")
    _vm_options(rec)
    rec.add_argument("--json", action="store_true", help="machine-readable output")


def _watch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watch = sub.add_parser("watch", help="hot-plug every interface that appears in a netns")
    _vm_options(watch)
    watch.add_argument("--netns", required=True, metavar="PATH", help="netns to follow")
    watch.add_argument(
        "--model",
        choices=["tcfilter", "macvtap", "bridged", "default"],
        help="interworking model for the NetPairs",
    )
    watch.add_argument(
        "--debounce",
        type=_seconds,
        default=0.5,
        metavar="SEC",
        help="ignore links that do not stay this long (default 0.5)",
    )
    watch.add_argument(
        "--unplug-on-exit", action="store_true", help="unplug what was plugged when stopped"
    )


def _watches_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    watches = sub.add_parser("watches", help="list the watches qmpnetd runs (service only)")
    watches.add_argument("--json", action="store_true", help="machine-readable output")


def _unwatch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    unwatch = sub.add_parser("unwatch", help="stop a watch qmpnetd runs (service only)")
    unwatch.add_argument("id", help="the watch's id, as `qmpnet watches` lists it")


def _vm_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="register, unregister and list VMs with qmpnetd")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True, metavar="ACTION")
    reg = vm_sub.add_parser("register", help="make a VM known to the service")
    reg.add_argument("--qmp", required=True, metavar="SOCKET", help="the VM's QMP socket")
    reg.add_argument("--id", default="", help="the VM's id (a sandbox's container id)")
    reg.add_argument("--sandbox", default="", metavar="NETNS", help="the VM's sandbox netns")
    unreg = vm_sub.add_parser("unregister", help="forget a VM (its NICs stay plugged)")
    unreg.add_argument("id")
    vm_list = vm_sub.add_parser("list", help="the VMs the service knows")
    vm_list.add_argument("--json", action="store_true", help="machine-readable output")


def _status_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="the service: version, VMs, sessions, pending work")
    status.add_argument("--json", action="store_true", help="machine-readable output")


def _demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("demo", help="boot the bundled guest, hot-plug, prove traffic, unplug")


#: each command's sub-parser, in the order ``--help`` lists them
_PARSERS = {
    "add-iface": _add_iface_parser,
    "del-iface": _del_iface_parser,
    "set-link": _set_link_parser,
    "set-mtu": _set_mtu_parser,
    "set-bandwidth": _set_bandwidth_parser,
    "list-ifaces": _list_ifaces_parser,
    "stats": _stats_parser,
    "reconcile": _reconcile_parser,
    "watch": _watch_parser,
    "watches": _watches_parser,
    "unwatch": _unwatch_parser,
    "vm": _vm_parser,
    "status": _status_parser,
    "demo": _demo_parser,
}
#: global options that take a value (``_command_in`` steps over it)
_GLOBAL_VALUED = ("--socket", "--state-root", "--log-format")


def _command_in(argv: Sequence[str]) -> str | None:
    """The command an argument list names, if it plainly names one of ours."""
    tokens = iter(argv)
    for token in tokens:
        if token in _GLOBAL_VALUED:
            next(tokens, None)
        elif not token.startswith("-"):
            return token if token in _PARSERS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with ``only`` the global options and that one command's parser.

    The thin client parses its one command with a parser of one command: building all of
    them costs more than the request (a few ms). Any other argument list (``--help``, an
    unknown or abbreviated command) gets the whole parser and its own messages.
    """
    parser = argparse.ArgumentParser(
        prog="qmpnet",
        description="Hot-plug network interfaces into running QEMU VMs.",
        epilog=f"exit codes: {EXIT_CODES_TEXT}",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="qmpnetd's socket (default: $QMPNET_SOCKET or /run/qmpnet/qmpnetd.sock); "
        "used when it exists",
    )
    parser.add_argument(
        "--direct", action="store_true", help="do the work in this process, never via qmpnetd"
    )
    parser.add_argument(
        "--state-root",
        metavar="DIR",
        help="where VM state directories live in the direct mode (default: "
        f"$QMPNET_STATE_ROOT or {STATE_ROOT}); the service's own root in service mode",
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version (and the service's) and exit"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more logging (-v info, -vv debug with QMP traffic, -vvv "
        "everything); give it before the command",
    )
    parser.add_argument("--log-format", choices=["text", "json"], default="text")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add in _PARSERS.items():
        if only is None or name == only:
            add(sub)
    return parser


# --- commands, direct mode ------------------------------------------------------------------

_TIMEOUT_NAMES = ("connect", "command", "unplug", "guest")


def _timeouts(args: argparse.Namespace) -> dict[str, float]:
    return {
        name: value
        for name in _TIMEOUT_NAMES
        if (value := getattr(args, f"timeout_{name}", None)) is not None
    }


def _config(args: argparse.Namespace) -> Config:
    from qmpnet.config import Config, with_options

    config = Config.load(args.config) if args.config else Config()
    return with_options(
        config,
        model=getattr(args, "model", None),
        no_vhost=getattr(args, "no_vhost", False),
        queues=getattr(args, "queues", None),
        timeouts=_timeouts(args),
        no_announce=getattr(args, "no_announce", False),
        announce_rounds=getattr(args, "announce_rounds", None),
    )


def _state(args: argparse.Namespace) -> NetworkState:
    from qmpnet import layout
    from qmpnet.errors import MonitorHeldError
    from qmpnet.network import NetworkState
    from qmpnet.qmp import check_socket_path

    config = _config(args)  # all input is checked before anything is connected to
    directory = args.state or default_state_dir(args.qmp, args.state_root)
    if args.qmp:
        holder = layout.holder(layout.state_root(args.state_root), args.qmp)
        if holder is not None:
            raise MonitorHeldError(args.qmp, holder)
    if args.qmp and not os.path.isdir(directory):
        # No state for this socket yet: a mistyped path must not leave a directory behind.
        check_socket_path(args.qmp)
    return NetworkState.open(directory, args.qmp or "", config)


class Pending(Exception):
    """A forwarded command line needs what its runner (qmpnetd's cli.exec) must fetch first;
    the runner fetches it and runs the line again from the start."""


class NeedFile(Pending):
    """A forwarded command line reads a file its caller has not sent yet (qmpnetd asks)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class Origin:
    """Where a command line's relative paths and files are: this process's, or the caller's.

    qmpnetd runs a compiled front's command line (``cli.exec``) with the caller's working
    directory and the files the caller read itself, in the caller's mount namespace and with
    the caller's rights; the command's code is the same either way.
    """

    def __init__(
        self, cwd: str | None = None, files: dict[str, bytes | OSError] | None = None
    ) -> None:
        self.cwd = cwd
        self.files = files

    def abspath(self, path: str) -> str:
        if self.cwd is None:
            return os.path.abspath(path)
        return os.path.normpath(os.path.join(self.cwd, path))

    def read(self, path: str) -> bytes:
        """A file's bytes (``-``: stdin), no further than the cap; OSError as reading gives."""
        if self.files is not None:
            if path not in self.files:
                raise NeedFile(path)
            got = self.files[path]
            if isinstance(got, OSError):
                raise got
            return got[:_READ_MAX]
        if path == "-":
            return sys.stdin.buffer.read(_READ_MAX)
        with open(path, "rb") as fh:
            return fh.read(_READ_MAX)


#: this process's own paths; qmpnetd's cli.exec sets the caller's for the command it runs
_here = Origin()
ORIGIN: ContextVar[Origin] = ContextVar("qmpnet_cli_origin", default=_here)


def _read_file(path: str, what: str, stdin: bool = False) -> bytes:
    """A file's bytes; ``-`` is stdin only where ``stdin`` says so (the interface file),
    elsewhere a file of that name, as the direct mode's config loader reads it."""
    from qmpnet.errors import InvalidInputError

    where = os.path.join(".", path) if path == "-" and not stdin else path
    try:
        return ORIGIN.get().read(where)
    except OSError as err:
        raise InvalidInputError(what, path, err.strerror or str(err)) from err


def _read_input(path: str) -> bytes:
    """The interface JSON's bytes from a file or stdin, read no further than the cap allows."""
    return _read_file(path, "interface file", stdin=True)


def _read_json(path: str) -> Any:
    """The interface JSON from a file or stdin, within the boundary's size and nesting caps."""
    from qmpnet.boundary import load_json

    return load_json(_read_input(path), "interface file", path)


def versioned(doc: dict[str, Any]) -> dict[str, Any]:
    from qmpnet.schema import versioned as with_version

    return with_version(doc)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=1))


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def cmd_add(args: argparse.Namespace) -> int:
    from qmpnet.bandwidth import from_options
    from qmpnet.model import InterfaceDescription, check_ifname, with_bandwidth
    from qmpnet.network import interface_of

    desc = with_bandwidth(
        InterfaceDescription.from_json(_read_json(args.file)),
        from_options(args.bandwidth, args.inbound, args.outbound),
    )
    if args.tap_name is not None:
        check_ifname("--tap-name", args.tap_name)
    state = _state(args)
    started = time.perf_counter()
    endpoint = await state.add_interface(
        desc,
        netns_path=args.netns,
        tap_name=args.tap_name,
        wait_guest=args.wait_guest,
        allow_foreign_link=args.allow_foreign_link,
        link=args.link,
        trust_rx_filters=args.trust_guest_rx_filters,
    )
    _log().info(
        "plugged %s (%s) at %s in %.1f ms",
        endpoint.name,
        endpoint.hardware_addr,
        endpoint.pci_path,
        (time.perf_counter() - started) * 1000,
    )
    _print_json(interface_of(endpoint).to_json())
    return EXIT_OK


async def cmd_del(args: argparse.Namespace) -> int:
    from qmpnet.errors import InvalidInputError
    from qmpnet.model import InterfaceDescription, check_mac
    from qmpnet.network import interface_of

    if args.mac is not None:  # an empty --mac is a bad MAC, not "read the file"
        mac = check_mac("--mac", args.mac)
    else:
        mac = InterfaceDescription.from_json(_read_json(args.file)).hw_addr
        if not mac:
            raise InvalidInputError("hwAddr", "", "the interface JSON must name the MAC")
    endpoint = await _state(args).remove_interface(mac)
    _print_json(interface_of(endpoint).to_json())
    return EXIT_OK


async def cmd_set_link(args: argparse.Namespace) -> int:
    from qmpnet.model import check_mac
    from qmpnet.views import entry_document

    entry = await _state(args).set_link(check_mac("--mac", args.mac), args.link_state)
    _print_json(versioned({"interface": entry_document(entry)}))
    return EXIT_OK


def _print_stats(doc: dict[str, Any], as_json: bool) -> None:
    from qmpnet.views import stats_rows

    if as_json:
        _print_json(versioned(doc))
    else:
        _print_table(stats_rows(doc))


async def cmd_set_mtu(args: argparse.Namespace) -> int:
    from qmpnet.model import check_mac
    from qmpnet.views import entry_document

    entry = await _state(args).set_mtu(check_mac("--mac", args.mac), args.mtu)
    _print_json(versioned({"interface": entry_document(entry)}))
    return EXIT_OK


def _wanted_bandwidth(args: argparse.Namespace) -> Any:
    """set-bandwidth's: what its options say, or None for --clear (one of the two)."""
    from qmpnet.bandwidth import from_options
    from qmpnet.errors import InvalidInputError

    want = from_options(args.bandwidth, args.inbound, args.outbound)
    if (want is None) != args.clear:
        raise InvalidInputError(
            "--clear", args.clear, "give --clear, or --bandwidth or --inbound/--outbound"
        )
    return want


async def cmd_set_bandwidth(args: argparse.Namespace) -> int:
    from qmpnet.model import check_mac
    from qmpnet.views import entry_document

    want = _wanted_bandwidth(args)
    entry = await _state(args).set_bandwidth(check_mac("--mac", args.mac), want)
    _print_json(versioned({"interface": entry_document(entry)}))
    return EXIT_OK


async def cmd_stats(args: argparse.Namespace) -> int:
    from qmpnet.views import stats_document

    _print_stats(stats_document(await _state(args).stats(args.mac)), args.json)
    return EXIT_OK


def _print_list(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(versioned({k: doc[k] for k in ("interfaces", "unreadable")}))
        return
    _print_table(doc["rows"])
    for note in doc["notes"]:
        print(note)


async def cmd_list(args: argparse.Namespace) -> int:
    from qmpnet.views import interface_rows, list_document

    state = _state(args)
    entries = await state.list_interfaces()
    unknown = state.store.load().unknown
    doc = {
        **list_document(entries, unknown),
        "rows": interface_rows(entries),
        "notes": [f"unreadable entry kept as is: {u.reason}" for u in unknown],
    }
    _print_list(doc, args.json)
    return EXIT_OK


def _print_reconcile(report: dict[str, Any], lines: list[str], ok: bool, as_json: bool) -> int:
    if as_json:
        _print_json(versioned(report))
    else:
        for line in lines:
            print(line)
    return EXIT_OK if ok else EXIT_INCOMPLETE


async def cmd_reconcile(args: argparse.Namespace) -> int:
    from qmpnet.reconcile import reconcile

    state = _state(args)
    report = await reconcile(state)
    if report.ok and not report.qemu_running:
        snap = state.store.load()
        if not (snap.entries or snap.unknown or state.store.journal()):
            await state.store.remove_all()  # the VM is gone and nothing of it is left
    return _print_reconcile(report.to_json(), report.lines(), report.ok, args.json)


async def cmd_watch(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from qmpnet.model import InterworkingModel
    from qmpnet.watch import watch

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from qmpnet.qmp import check_socket_path

    check_socket_path(args.qmp)  # fail fast (exit 4) rather than retry a typo forever
    state = _state(args)
    model = InterworkingModel.parse(args.model) if args.model else None
    await watch(
        state,
        args.netns,
        model=model,
        debounce=args.debounce,
        stop=stop,
        unplug_on_exit=args.unplug_on_exit,
    )
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace) -> int:
    from qmpnet.demo import run_demo

    return await run_demo()


COMMANDS = {
    "add-iface": cmd_add,
    "del-iface": cmd_del,
    "set-link": cmd_set_link,
    "set-mtu": cmd_set_mtu,
    "set-bandwidth": cmd_set_bandwidth,
    "list-ifaces": cmd_list,
    "stats": cmd_stats,
    "reconcile": cmd_reconcile,
    "watch": cmd_watch,
    "demo": cmd_demo,
}
#: commands only the service can do
SERVICE_ONLY = ("watches", "unwatch", "vm", "status")


# --- commands, service mode --------------------------------------------------------------------


def _vm_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    origin = ORIGIN.get()
    if getattr(args, "qmp", None):
        params["qmp"] = origin.abspath(args.qmp)
    if getattr(args, "state", None):
        params["state"] = origin.abspath(args.state)
    config = getattr(args, "config", None)
    if config:
        params["config"] = _read_file(config, "config file").decode("utf-8", "surrogateescape")
        params["config_source"] = config
    timeouts = _timeouts(args)
    if timeouts:
        params["timeouts"] = timeouts
    for name in ("model", "queues"):
        value = getattr(args, name, None)
        if value:
            params[name] = value
    if getattr(args, "no_vhost", False):
        params["no_vhost"] = True
    if getattr(args, "no_announce", False):
        params["no_announce"] = True
    if getattr(args, "announce_rounds", None):
        params["announce_rounds"] = args.announce_rounds
    return params


def _interface_param(path: str) -> str:
    # bytes that are not UTF-8 survive the trip: the service refuses them as the direct mode does
    return _read_input(path).decode("utf-8", "surrogateescape")


def svc_add(client: Client, args: argparse.Namespace) -> int:
    params = _vm_params(args)
    params.update(
        interface=_interface_param(args.file),
        source=args.file,
        netns=args.netns,
        wait_guest=args.wait_guest,
        allow_foreign_link=args.allow_foreign_link,
        link=args.link,
        **_bandwidth_params(args),
    )
    if args.trust_guest_rx_filters:
        params["trust_rx_filters"] = True
    if args.tap_name is not None:
        params["tap_name"] = args.tap_name
    _print_json(client.call("iface.add", params))
    return EXIT_OK


def svc_del(client: Client, args: argparse.Namespace) -> int:
    params = _vm_params(args)
    if args.mac is not None:
        params["mac"] = args.mac
    else:
        params.update(interface=_interface_param(args.file), source=args.file)
    _print_json(client.call("iface.remove", params))
    return EXIT_OK


def svc_set_link(client: Client, args: argparse.Namespace) -> int:
    params = {**_vm_params(args), "mac": args.mac, "link": args.link_state}
    _print_json(versioned(client.call("iface.set_link", params)))
    return EXIT_OK


def svc_set_mtu(client: Client, args: argparse.Namespace) -> int:
    params = {**_vm_params(args), "mac": args.mac, "mtu": args.mtu}
    _print_json(versioned(client.call("iface.set_mtu", params)))
    return EXIT_OK


def _bandwidth_params(args: argparse.Namespace) -> dict[str, str]:
    """The bandwidth options as given: the service reads them as the direct mode does."""
    return {k: getattr(args, k) for k in ("bandwidth", "inbound", "outbound") if getattr(args, k)}


def svc_set_bandwidth(client: Client, args: argparse.Namespace) -> int:
    params = {**_vm_params(args), "mac": args.mac, **_bandwidth_params(args)}
    if args.clear:
        params["clear"] = True
    _print_json(versioned(client.call("iface.set_bandwidth", params)))
    return EXIT_OK


def svc_stats(client: Client, args: argparse.Namespace) -> int:
    params = _vm_params(args)
    if args.mac is not None:
        params["mac"] = args.mac
    _print_stats(client.call("iface.stats", params), args.json)
    return EXIT_OK


def svc_list(client: Client, args: argparse.Namespace) -> int:
    _print_list(client.call("iface.list", _vm_params(args)), args.json)
    return EXIT_OK


def svc_reconcile(client: Client, args: argparse.Namespace) -> int:
    reply = client.call("reconcile", _vm_params(args))
    return _print_reconcile(reply["report"], reply["lines"], reply["ok"], args.json)


def svc_watch(client: Client, args: argparse.Namespace) -> int:
    params = _vm_params(args)
    params.pop("model", None)
    params.update(
        netns=args.netns,
        debounce=args.debounce,
        unplug_on_exit=args.unplug_on_exit,
    )
    if args.model:
        params["watch_model"] = args.model
    reply = client.call("watch.start", params)
    print(f"watch {reply['id']} started in qmpnetd (stop it with `qmpnet unwatch {reply['id']}`)")
    return EXIT_OK


def svc_watches(client: Client, args: argparse.Namespace) -> int:
    reply = client.call("watch.list")
    if args.json:
        _print_json(versioned(reply))
        return EXIT_OK
    rows = [["ID", "VM", "NETNS", "MODEL", "RUNNING", "LAST EVENT"]]
    for w in reply["watches"]:
        last = w["events"][-1] if w["events"] else {}
        event = " ".join(str(v) for v in last.values()) or w["error"] or "-"
        rows.append([w["id"], w["vm"], w["netns"], w["model"], str(w["running"]).lower(), event])
    _print_table(rows)
    return EXIT_OK


def svc_unwatch(client: Client, args: argparse.Namespace) -> int:
    client.call("watch.stop", {"id": args.id})
    return EXIT_OK


def _print_vms(vms: list[dict[str, Any]]) -> None:
    rows = [["ID", "QMP", "SESSION", "QEMU PID", "BY ROOT", "SANDBOX"]]
    for v in vms:
        rows.append(
            [
                v["id"],
                v["qmp"],
                v["session"],
                str(v["qemu_pid"] or "-"),
                str(v["registered_by_root"]).lower(),
                v["sandbox"] or "-",
            ]
        )
    _print_table(rows)


def svc_vm(client: Client, args: argparse.Namespace) -> int:
    if args.vm_command == "register":
        qmp = ORIGIN.get().abspath(args.qmp)
        params = {"qmp": qmp, "id": args.id, "sandbox": args.sandbox}
        _print_json(versioned(client.call("vm.register", params)))
    elif args.vm_command == "unregister":
        _print_json(versioned(client.call("vm.unregister", {"id": args.id})))
    else:
        reply = client.call("vm.list")
        if args.json:
            _print_json(versioned(reply))
        else:
            _print_vms(reply["vms"])
    return EXIT_OK


def svc_status(client: Client, args: argparse.Namespace) -> int:
    reply = client.call("status")
    if args.json:
        _print_json(versioned(reply))
        return EXIT_OK
    print(f"qmpnetd {reply['version']} (protocol {reply['protocol']}), pid {reply['pid']}")
    print(f"  up {reply['uptime']:.0f} s on {reply['socket']}, state root {reply['state_root']}")
    print(f"  requests in flight: {reply['requests_in_flight']}")
    print()
    _print_vms(reply["vms"])
    print()
    print(f"pending unplugs: {len(reply['pending_unplugs'])}")
    for p in reply["pending_unplugs"]:
        print(f"  {p.get('vm')}  {p.get('mac', '')}  {p.get('name', p.get('error', ''))}")
    attachments = reply.get("pending_attachments", [])
    print(f"pending CNI attachments: {len(attachments)}")
    for a in attachments:
        waits = a.get("qmp") or "registration"
        why = f"  {a['error']}" if a.get("error") else ""
        print(f"  {a['container_id']}  {a['ifname']}  {a['network']}  {a['status']}  {waits}{why}")
    print(f"watches: {len(reply['watches'])}")
    for w in reply["watches"]:
        print(f"  {w['id']}  {w['vm']}  {w['netns']}  running={str(w['running']).lower()}")
    print(f"recent errors: {len(reply['recent_errors'])}")
    for e in reply["recent_errors"]:
        print(f"  {e['method']}  {e['vm']}  {e['error']}: {e['message']}")
    return EXIT_OK


SERVICE_COMMANDS = {
    "add-iface": svc_add,
    "del-iface": svc_del,
    "set-link": svc_set_link,
    "set-mtu": svc_set_mtu,
    "set-bandwidth": svc_set_bandwidth,
    "list-ifaces": svc_list,
    "stats": svc_stats,
    "reconcile": svc_reconcile,
    "watch": svc_watch,
    "watches": svc_watches,
    "unwatch": svc_unwatch,
    "vm": svc_vm,
    "status": svc_status,
}


# --- the two modes -----------------------------------------------------------------------------


def _note(text: str) -> None:
    print(f"qmpnet: note: {text}", file=sys.stderr)


def _fail(args: argparse.Namespace, code: int, kind: str, message: str) -> int:
    word = "internal error" if code == EXIT_INTERNAL else "error"
    if args.log_format == "json":
        # the shape of every other record (qmpnet.logs), with the error's class and exit code
        import logging

        from qmpnet.logs import JsonFormatter

        record = logging.LogRecord("qmpnet", logging.ERROR, "", 0, message, None, None)
        record.error, record.exit = kind, code
        for name in ("qmp", "mac"):
            if isinstance(getattr(args, name, None), str) and getattr(args, name):
                setattr(record, "vm" if name == "qmp" else name, getattr(args, name))
        print(JsonFormatter().format(record), file=sys.stderr)
    else:
        print(f"qmpnet: {word}: {message}", file=sys.stderr)
    return code


def _via_service(args: argparse.Namespace) -> int | None:
    """Run the command through qmpnetd; None to do it in the direct mode instead."""
    from qmpnet.service.client import Client, ServiceUnavailable, socket_path

    explicit = bool(args.socket or os.environ.get("QMPNET_SOCKET"))
    path = socket_path(args.socket)
    needs_service = args.command in SERVICE_ONLY
    if not explicit and not needs_service and not os.path.exists(path):
        return None
    client = Client(path)
    try:
        client.connect()
    except ServiceUnavailable as err:
        if needs_service or (explicit and not err.denied):
            return _fail(args, EXIT_SERVICE, "ServiceUnavailable", str(err))
        _note(f"{err}; doing it in this process (direct mode)")
        return None
    return serve(args, client)


def serve(args: argparse.Namespace, client: Client) -> int | None:
    """A parsed command through a connected client; None: do it in the direct mode instead.

    The thin client and qmpnetd's ``cli.exec`` (a compiled front's command line) both run
    commands here, so the two print the same bytes and exit with the same codes.
    """
    from qmpnet.service.client import ServiceError, ServiceLost

    needs_service = args.command in SERVICE_ONLY
    try:
        with client:
            return SERVICE_COMMANDS[args.command](client, args)
    except ServiceError as err:
        if err.refused_caller and not needs_service:
            _note(f"{err}; doing it in this process (direct mode) for your own VMs")
            return None
        return _fail(args, err.exit_code, str(err.data.get("type", "ServiceError")), str(err))
    except ServiceLost as err:
        return _fail(args, EXIT_SERVICE, "ServiceLost", str(err))
    except Pending:
        raise
    except Exception as err:  # input the client reads itself (the interface file)
        return _fail(args, exit_code_for(err), type(err).__name__, str(err))


def _print_version(args: argparse.Namespace) -> int:
    from qmpnet.service.client import Client, ServiceError, ServiceUnavailable, socket_path

    try:
        from importlib.metadata import version

        mine = version("qmpnet")
    except Exception:  # a source tree without metadata
        mine = "unknown"
    print(f"qmpnet {mine}")
    if args.direct:
        return EXIT_OK
    path = socket_path(args.socket)
    try:
        with Client(path, timeout=5.0) as client:
            reply = client.call("version")
        print(f"qmpnetd {reply['version']} (protocol {reply['protocol']}) at {path}")
    except (ServiceUnavailable, ServiceError, OSError) as err:
        print(f"qmpnetd: not reachable at {path} ({err})")
    return EXIT_OK


def _direct(args: argparse.Namespace) -> int:
    import asyncio

    setup_logging(args.verbose, args.log_format)
    try:
        return asyncio.run(COMMANDS[args.command](args))
    except KeyboardInterrupt:
        print("qmpnet: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        code = exit_code_for(err)
        if args.debug or code == EXIT_INTERNAL:
            _log().debug("traceback", exc_info=True)
        if args.debug:
            import traceback

            traceback.print_exc()
        return _fail(args, code, type(err).__name__, str(err))


#: qmpnetd's parsers for forwarded command lines, by the command each parses alone
_kept_parsers: dict[str | None, argparse.ArgumentParser] = {}


def forwardable(argv: Sequence[str]) -> argparse.Namespace | None:
    """A command line qmpnetd can run for a compiled front (``cli.exec``), parsed; None for
    one this program must run itself: help, a usage error, ``--version``, ``--direct``, demo.
    """
    only = _command_in(argv)
    parser = _kept_parsers.get(only)
    if parser is None:  # built once per command: a parse does not change its parser
        parser = _kept_parsers[only] = build_parser(only)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        return None
    if args.version or args.command is None or args.direct or args.command == "demo":
        return None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.version:
        return _print_version(args)
    if args.command is None:
        parser.error("the following arguments are required: COMMAND")
    if args.command != "demo" and not args.direct:
        done = _via_service(args)
        if done is not None:
            return done
    if args.command in SERVICE_ONLY:
        return _fail(args, EXIT_USAGE, "UsageError", f"{args.command} needs qmpnetd (no --direct)")
    return _direct(args)


if __name__ == "__main__":
    sys.exit(main())
