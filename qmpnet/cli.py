"""The ``qmpnet`` command: add, remove and list a VM's interfaces; reconcile; watch; demo.

Errors are one line on stderr naming what failed and why (QEMU's own message kept), with a
documented exit code; a traceback only with ``--debug``. Sub-commands import what they need
lazily, so ``qmpnet --help`` and ``list-ifaces`` start fast.

Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 QEMU/QMP failure, 5 host
(netlink/syscall) failure, 6 timeout (an unplug left pending included), 7 unsupported
request, 8 saved state unreadable or unwritable, 9 reconcile could not finish every cleanup.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qmpnet.config import Config
    from qmpnet.network import NetworkState

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_QEMU = 4
EXIT_HOST = 5
EXIT_TIMEOUT = 6
EXIT_UNSUPPORTED = 7
EXIT_STATE = 8
EXIT_INCOMPLETE = 9

STATE_ROOT = "/run/qmpnet"

log = logging.getLogger("qmpnet")


def exit_code_for(err: BaseException) -> int:
    """The documented exit code of an error (a PlugError by its cause)."""
    from qmpnet import errors

    if isinstance(err, errors.PlugError):
        return exit_code_for(err.cause)
    if isinstance(err, errors.NetnsError) and err.errno in (
        None,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EINVAL,
        errno.ENOTTY,  # a regular file or a directory: no namespace file
    ):
        return EXIT_INPUT  # a netns path that does not exist or is not a netns: bad input
    table: list[tuple[type[BaseException], int]] = [
        (errors.QmpTimeoutError, EXIT_TIMEOUT),
        (errors.InvalidInputError, EXIT_INPUT),
        (errors.UnsupportedError, EXIT_UNSUPPORTED),
        (errors.HostError, EXIT_HOST),
        (errors.QmpError, EXIT_QEMU),
        (errors.StateError, EXIT_STATE),
        (OSError, EXIT_HOST),
    ]
    for kind, code in table:
        if isinstance(err, kind):
            return code
    return EXIT_INTERNAL


def default_state_dir(qmp: str | None) -> str:
    """One state directory per VM, keyed by its QMP socket, unless told otherwise."""
    env = os.environ.get("QMPNET_STATE_DIR")
    if env:
        return env
    if not qmp:
        print("qmpnet: error: give --state DIR or --qmp SOCKET", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    digest = hashlib.sha256(os.path.realpath(qmp).encode()).hexdigest()[:16]
    return os.path.join(STATE_ROOT, f"vm-{digest}")


# --- logging ---------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(verbose: int, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("qmpnet: %(levelname)s: %(name)s: %(message)s"))
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbose < 3:
        # Our own --> / <-- lines carry the QMP traffic, and every failure is reported once,
        # as qmpnet's one-line error: qemu.qmp's own error logs would repeat it, pyroute2's
        # debug dumps every link. -vvv shows them all.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        logging.getLogger("pyroute2").setLevel(max(level, logging.INFO))
        logging.getLogger("asyncio").setLevel(max(level, logging.INFO))


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
    from qmpnet.config import check_seconds
    from qmpnet.errors import InvalidInputError, shown

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
        help=f"state directory (default: $QMPNET_STATE_DIR or {STATE_ROOT}/vm-<hash "
        "of the socket path>)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    for name in ("connect", "command", "unplug", "guest"):
        p.add_argument(
            f"--timeout-{name}", type=_seconds, metavar="SEC", help=f"deadline for {name} (seconds)"
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
    p.add_argument("--tap-name", metavar="NAME", help="host tap name (default: tap{idx}_kata)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmpnet",
        description="Hot-plug network interfaces into running QEMU VMs.",
        epilog="exit codes: 0 ok, 1 internal, 2 usage, 3 bad input, 4 QEMU/QMP, 5 host, "
        "6 timeout (unplug pending), 7 unsupported, 8 state, 9 reconcile incomplete",
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    add.add_argument("file", metavar="FILE|-", help="interface JSON (Kata agent style)")

    rm = sub.add_parser("del-iface", help="unplug the interface with a MAC")
    _vm_options(rm)
    group = rm.add_mutually_exclusive_group(required=True)
    group.add_argument("--mac", help="MAC of the interface to remove")
    group.add_argument(
        "file", nargs="?", metavar="FILE|-", help="interface JSON; its hwAddr selects the interface"
    )

    ls = sub.add_parser("list-ifaces", help="list the VM's interfaces from its saved state")
    _vm_options(ls, qmp_required=False)
    ls.add_argument("--json", action="store_true", help="machine-readable output")

    rec = sub.add_parser("reconcile", help="finish or roll back interrupted operations")
    _vm_options(rec)
    rec.add_argument("--json", action="store_true", help="machine-readable output")

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

    sub.add_parser("demo", help="boot the bundled guest, hot-plug, prove traffic, unplug")
    return parser


# --- commands --------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    import attrs

    from qmpnet.config import Config
    from qmpnet.model import InterworkingModel

    config = Config.load(args.config) if args.config else Config()
    timeouts = config.timeouts
    for name, field in (
        ("connect", "connect"),
        ("command", "command"),
        ("unplug", "unplug"),
        ("guest", "guest_ready"),
    ):
        value = getattr(args, f"timeout_{name}", None)
        if value is not None:
            timeouts = attrs.evolve(timeouts, **{field: value})
    changes: dict[str, Any] = {"timeouts": timeouts}
    if getattr(args, "model", None):
        changes["internetworking_model"] = InterworkingModel.parse(args.model)
    if getattr(args, "no_vhost", False):
        changes["disable_vhost_net"] = True
    if getattr(args, "queues", None):
        changes["queues"] = args.queues
    return attrs.evolve(config, **changes)


def _state(args: argparse.Namespace) -> NetworkState:
    from qmpnet.network import NetworkState
    from qmpnet.qmp import check_socket_path

    config = _config(args)  # all input is checked before anything is connected to
    directory = args.state or default_state_dir(args.qmp)
    if args.qmp and not os.path.isdir(directory):
        # No state for this socket yet: a mistyped path must not leave a directory behind.
        check_socket_path(args.qmp)
    return NetworkState.open(directory, args.qmp or "", config)


def _read_json(path: str) -> Any:
    """The interface JSON from a file or stdin, within the boundary's size and nesting caps."""
    from qmpnet.boundary import load_json, read_capped
    from qmpnet.errors import InvalidInputError

    try:
        if path == "-":
            raw = read_capped(sys.stdin.buffer, "interface file", path)
        else:
            with open(path, "rb") as fh:
                raw = read_capped(fh, "interface file", path)
    except OSError as err:
        raise InvalidInputError("interface file", path, err.strerror or str(err)) from err
    return load_json(raw, "interface file", path)


async def cmd_add(args: argparse.Namespace) -> int:
    from qmpnet.model import InterfaceDescription, check_ifname
    from qmpnet.network import interface_of

    desc = InterfaceDescription.from_json(_read_json(args.file))
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
    )
    log.info(
        "plugged %s (%s) at %s in %.1f ms",
        endpoint.name,
        endpoint.hardware_addr,
        endpoint.pci_path,
        (time.perf_counter() - started) * 1000,
    )
    print(json.dumps(interface_of(endpoint).to_json(), indent=1))
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
    print(json.dumps(interface_of(endpoint).to_json(), indent=1))
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    from qmpnet.network import host_link

    state = _state(args)
    entries = await state.list_interfaces()
    unknown = state.store.load().unknown
    if args.json:
        from qmpnet.codec import dump_endpoint

        print(
            json.dumps(
                {
                    "interfaces": [
                        {"status": e.status.value, "endpoint": dump_endpoint(e.endpoint)}
                        for e in entries
                    ],
                    "unreadable": [{"reason": u.reason, "entry": u.raw} for u in unknown],
                },
                indent=1,
            )
        )
        return EXIT_OK
    rows = [("NAME", "TYPE", "MAC", "MODEL", "PCI", "QUEUES", "HOST LINK", "NETNS", "STATUS")]
    for e in entries:
        ep = e.endpoint
        pair = ep.network_pair
        rows.append(
            (
                ep.name,
                ep.type.value,
                ep.hardware_addr,
                pair.model.value if pair else "none",
                ep.pci_path or "-",
                str(ep.queues or "-"),
                host_link(ep) or "-",
                ep.netns_path or "(host)",
                e.status.value,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for u in unknown:
        print(f"unreadable entry kept as is: {u.reason}")
    return EXIT_OK


async def cmd_reconcile(args: argparse.Namespace) -> int:
    from qmpnet.reconcile import reconcile

    state = _state(args)
    report = await reconcile(state)
    if report.ok and not report.qemu_running:
        snap = state.store.load()
        if not (snap.entries or snap.unknown or state.store.journal()):
            await state.store.remove_all()  # the VM is gone and nothing of it is left
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for line in report.lines():
            print(line)
    return EXIT_OK if report.ok else EXIT_INCOMPLETE


async def cmd_watch(args: argparse.Namespace) -> int:
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
    "list-ifaces": cmd_list,
    "reconcile": cmd_reconcile,
    "watch": cmd_watch,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    try:
        return asyncio.run(COMMANDS[args.command](args))
    except KeyboardInterrupt:
        print("qmpnet: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        code = exit_code_for(err)
        if args.debug or code == EXIT_INTERNAL:
            log.debug("traceback", exc_info=True)
        if args.debug:
            import traceback

            traceback.print_exc()
        kind = "internal error" if code == EXIT_INTERNAL else "error"
        if args.log_format == "json":
            print(
                json.dumps(
                    {"level": "error", "error": type(err).__name__, "msg": str(err), "exit": code}
                ),
                file=sys.stderr,
            )
        else:
            print(f"qmpnet: {kind}: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
