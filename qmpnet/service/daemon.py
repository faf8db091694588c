"""``qmpnetd``: the node service, in the foreground, as a supervisor expects.

Start-up settles every VM it finds under the state root (a journal left by a killed service
or CLI is finished or rolled back, a VM that is gone has its host side cleaned), opens the
kept sessions, and only then listens: a client never reaches a service that is still
recovering. SIGTERM or SIGINT stops accepting, lets the requests in flight finish or undo
themselves (bounded by ``--stop-timeout``), stops the watches (their NICs stay plugged),
closes the sessions and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence

from qmpnet import layout
from qmpnet.config import Config
from qmpnet.errors import QmpnetError
from qmpnet.exits import EXIT_HOST, EXIT_INPUT, EXIT_OK, EXIT_UNSUPPORTED, exit_code_for
from qmpnet.lifecycle import Observer
from qmpnet.service import protocol
from qmpnet.service.auth import Authority
from qmpnet.service.methods import Service, package_version
from qmpnet.service.registry import Registry, VmHandle
from qmpnet.service.server import Server
from qmpnet.service.systemd import ActivationError, Notifier, activated_socket

log = logging.getLogger("qmpnetd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qmpnetd", description="qmpnet's node service: hot-plug NICs for every VM of the node."
    )
    p.add_argument(
        "--socket",
        default=protocol.DEFAULT_SOCKET,
        metavar="PATH",
        help="the socket to listen on (default: %(default)s); under socket activation keep "
        "it equal to ListenStream=, the path status reports",
    )
    p.add_argument(
        "--group",
        metavar="NAME",
        help="members of this group may use the service too (socket 0660, directory 0750)",
    )
    p.add_argument(
        "--state-root",
        default=layout.DEFAULT_ROOT,
        metavar="DIR",
        help="where every VM's state directory lives (default: %(default)s)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration (the requests' default)")
    p.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        metavar="SEC",
        help="on SIGTERM, how long requests in flight may take to finish",
    )
    p.add_argument(
        "--metrics-listen",
        type=_listen_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP there (off by default; needs qmpnet[metrics])",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="info is logged by default; -vv debug with QMP traffic, -vvv everything",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one object per line, with vm, mac, step and container_id where known",
    )
    p.add_argument("--version", action="version", version=f"qmpnetd {package_version()}")
    return p


class MetricsAddressError(Exception):
    """The metrics address could not be bound."""


def _listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too; an empty host is 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _listen(path: str, gid: int | None) -> socket.socket:
    """The listening socket: its directory 0700 (0750 root:group), the socket 0600 (0660)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if gid is not None:
        os.chown(directory, 0, gid)
        os.chmod(directory, 0o750)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a dead service's socket
            else:
                raise SystemExit(f"qmpnetd: another service listens on {path}")
            finally:
                probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177 if gid is None else 0o117)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)
    sock.listen(128)
    return sock


async def startup(registry: Registry, notifier: Notifier | None = None) -> None:
    """Settle every VM under the root, then open the sessions of those that run."""
    from qmpnet.reconcile import reconcile

    registry.load()
    if notifier is not None:
        notifier.status(f"reconciling {len(registry.handles())} VMs")
    for handle in registry.handles():
        try:
            report = await reconcile(handle.state)
        except QmpnetError as err:
            log.warning("%s: start-up reconcile failed: %s", handle.id, err)
            continue
        for line in report.lines():
            log.info("%s: %s", handle.id, line)
        if not report.qemu_running:
            await _forget_if_empty(registry, handle)
        else:
            await handle.ensure_session()
    await registry.save()


async def _forget_if_empty(registry: Registry, handle: VmHandle) -> None:
    snap = handle.state.store.load()
    store = handle.state.store
    if not (snap.entries or snap.unknown or store.journal()):
        await store.remove_all()
        if not handle.by_root:
            await registry.remove(handle.id)


async def serve(args: argparse.Namespace, observers: Sequence[Observer] = ()) -> int:
    """Run the service until SIGTERM/SIGINT; ``observers`` see every VM's operations."""
    gid = grp.getgrnam(args.group).gr_gid if args.group else None
    config = Config.load(args.config) if args.config else Config()
    metrics = None
    if args.metrics_listen:
        from qmpnet.service.metrics import Metrics

        metrics = Metrics()
        observers = [*observers, metrics.observe]
    registry = Registry(args.state_root, config, list(observers))
    notifier = Notifier()
    # systemd's socket, taken over as is (its unit sets the mode and owner), or our own
    sock = activated_socket()
    activated = sock is not None
    await startup(registry, notifier)
    service = Service(registry, args.socket)
    service.cni.load()
    server = Server(service, Authority(gid))
    if metrics is not None:
        metrics.watch(service)
        try:
            metrics.serve(*args.metrics_listen)
        except OSError as err:  # the address taken, or not ours to bind
            raise MetricsAddressError(f"--metrics-listen: {err.strerror or err}") from err
        log.info("metrics on http://%s:%d/metrics", *args.metrics_listen)
    if sock is None:
        sock = _listen(args.socket, gid)
    listener = await asyncio.start_unix_server(server.handle, sock=sock, limit=protocol.LINE_MAX)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "qmpnetd %s ready on %s (state root %s, %d VM(s))",
        package_version(),
        args.socket,
        args.state_root,
        len(registry.handles()),
    )
    print(f"qmpnetd: ready on {args.socket}", file=sys.stderr, flush=True)
    notifier.ready(f"ready: {len(registry.handles())} VMs")
    service.cni.start()  # pending attachments whose socket is (or comes) there get plugged
    await stop.wait()
    log.info("stopping")
    notifier.stopping()
    listener.close()
    await server.drain(args.stop_timeout)
    await service.watches.stop_all()
    await service.cni.close()
    for handle in registry.handles():
        await handle.close()
    if not activated:  # systemd's socket stays for the next activation
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
    notifier.close()
    log.info("stopped")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, observers: Sequence[Observer] = ()) -> int:
    """The ``qmpnetd`` command; a launcher may pass lifecycle ``observers``."""
    from qmpnet.logs import setup_logging

    args = build_parser().parse_args(argv)
    args.state_root = os.path.abspath(args.state_root)
    args.socket = os.path.abspath(args.socket)
    setup_logging(max(args.verbose, 1), args.log_format, prefix="qmpnetd")
    if args.metrics_listen:
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            print(
                "qmpnetd: error: --metrics-listen needs prometheus-client: "
                "pip install 'qmpnet[metrics]'",
                file=sys.stderr,
            )
            return EXIT_UNSUPPORTED
    try:
        return asyncio.run(serve(args, observers))
    except KeyError as err:
        print(f"qmpnetd: error: no such group: {err}", file=sys.stderr)
        return EXIT_INPUT
    except ActivationError as err:
        print(f"qmpnetd: error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except MetricsAddressError as err:
        print(f"qmpnetd: error: {err}", file=sys.stderr)
        return EXIT_HOST
    except QmpnetError as err:
        print(f"qmpnetd: error: {err}", file=sys.stderr)
        return exit_code_for(err)


if __name__ == "__main__":
    sys.exit(main())
