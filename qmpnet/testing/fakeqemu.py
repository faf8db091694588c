"""A minimal QMP peer on a unix socket, for what real QEMU cannot be made to do.

Only for those cases: an error reply QEMU never gives a correct client (to ``getfd``,
``x-query-virtio-status`` of a device that exists, ``device_del``/``netdev_del`` of a NIC
that is plugged), an event cutting into the handshake, which real QEMU sends only now and
then, or an event x86 QEMU never sends for a NIC (DEVICE_UNPLUG_GUEST_ERROR: only ppc's
spapr and ACPI memory unplug emit it; :func:`refuse_unplug` plays a guest that refuses).
Everything else is tested against real QEMU. The peer serves one client at a time, as
QEMU does; it keeps the fds it is given, so a leak shows in ``/proc/self/fd``.

Commands are dispatched through :attr:`FakeQemu.commands` (name -> handler); a test changes
one by assigning to it, and ``fail[command] = desc`` makes the next such command fail once.
A command without a handler gets QEMU's ``CommandNotFound``. A handler sends an event at
once with :meth:`Client.event`, or after its reply (as QEMU announces what the guest did
later) with :meth:`Client.later`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"},
        "capabilities": [],
    }
}


class Reply(Exception):
    """Raised by a handler to answer with a QMP error."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


class Client:
    """One connected client: its socket and the fds it passed and nobody took yet."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.pending: list[int] = []
        #: events a handler queued to follow its command's reply
        self.after_reply: list[tuple[str, dict[str, Any]]] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.conn.sendall(json.dumps(obj).encode() + b"\r\n")

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        self.send(
            {"event": name, "data": data or {}, "timestamp": {"seconds": 0, "microseconds": 0}}
        )

    def later(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send the event just after the reply of the command being handled."""
        self.after_reply.append((name, data or {}))

    def take_fd(self) -> int:
        if not self.pending:
            raise Reply("No file descriptor supplied via SCM_RIGHTS")
        return self.pending.pop(0)


#: (peer, client, arguments) -> the ``return`` value; raise :class:`Reply` for an error.
Handler = Callable[["FakeQemu", Client, dict[str, Any]], Any]


class FakeQemu:
    """The fake peer: a listening socket served on a thread, and what the client gave it."""

    def __init__(
        self, path: Path, on_connect: Callable[[FakeQemu, Client], None] | None = None
    ) -> None:
        self.path = path
        self.commands: dict[str, Handler] = dict(COMMANDS)
        self.fail: dict[str, str] = {}
        #: runs before the greeting of each connection (e.g. to send an event first)
        self.on_connect = on_connect
        self.fds: dict[str, int] = {}
        self.netdevs: dict[str, list[int]] = {}
        self.devices: set[str] = set()
        #: every command received, in order
        self.received: list[str] = []
        self.connections = 0
        self.busy = threading.Event()
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._server.settimeout(0.1)
        self._thread = threading.Thread(target=self._serve, name="fake-qemu", daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._server.close()
        for fd in [*self.fds.values(), *(f for fds in self.netdevs.values() for f in fds)]:
            os.close(fd)
        self.fds.clear()
        self.netdevs.clear()

    async def settled(self) -> None:
        """Wait until the client left and the fake closed its end (its fds count too)."""
        for _ in range(600):
            if not self.busy.is_set():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the fake QMP peer still has a client")

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self.busy.set()
            self.connections += 1
            with conn:
                conn.settimeout(0.1)
                self._session(Client(conn))
            self.busy.clear()

    def _session(self, client: Client) -> None:
        try:
            if self.on_connect is not None:
                self.on_connect(self, client)
            client.send(GREETING)
            buf = ""
            decoder = json.JSONDecoder()
            while not self._stop.is_set():
                try:
                    data, anc, _, _ = client.conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                except TimeoutError:
                    continue
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        client.pending.extend(
                            int.from_bytes(payload[i : i + 4], "little")
                            for i in range(0, len(payload) - len(payload) % 4, 4)
                        )
                if not data:
                    return
                buf += data.decode()
                while buf.strip():
                    try:
                        msg, end = decoder.raw_decode(buf.lstrip())
                    except json.JSONDecodeError:
                        break  # the rest has not arrived yet
                    buf = buf.lstrip()[end:]
                    self._handle(client, msg)
        except OSError:
            return  # the client went away mid-reply
        finally:
            for fd in client.pending:
                os.close(fd)
            client.pending.clear()

    def _handle(self, client: Client, msg: dict[str, Any]) -> None:
        cmd, args, mid = msg["execute"], msg.get("arguments", {}), msg.get("id")
        self.received.append(cmd)
        try:
            if cmd in self.fail:
                if cmd == "getfd" and client.pending:
                    os.close(client.pending.pop(0))
                raise Reply(self.fail.pop(cmd))
            handler = self.commands.get(cmd)
            if handler is None:
                raise Reply(f"The command {cmd} has not been found", "CommandNotFound")
            value = handler(self, client, args)
        except Reply as err:
            client.send({"error": {"class": err.cls, "desc": err.desc}, "id": mid})
        else:
            client.send({"return": {} if value is None else value, "id": mid})
        events, client.after_reply = client.after_reply, []
        for name, data in events:
            client.event(name, data)


# --- the command table -------------------------------------------------------------------


def _nothing(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    return None


def _getfd(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    fd = client.take_fd()
    old = peer.fds.pop(args["fdname"], None)
    if old is not None:
        os.close(old)
    peer.fds[args["fdname"]] = fd


def _closefd(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    fd = peer.fds.pop(args["fdname"], None)
    if fd is None:
        raise Reply(f"File descriptor named '{args['fdname']}' not found")
    os.close(fd)


def _netdev_add(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    names = args["fds"].split(":") if "fds" in args else [args["fd"]]
    peer.netdevs[args["id"]] = [peer.fds.pop(n) for n in names]


def _netdev_del(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    fds = peer.netdevs.pop(args["id"], None)
    if fds is None:
        raise Reply(f"Device '{args['id']}' not found", "DeviceNotFound")
    for fd in fds:
        os.close(fd)


def _device_add(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    peer.devices.add(args["id"])


def _device_del(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    if args["id"] not in peer.devices:
        raise Reply(f"Device '{args['id']}' not found", "DeviceNotFound")
    peer.devices.discard(args["id"])
    client.later("DEVICE_DELETED", {"device": args["id"], "path": peripheral(args["id"])})


def refuse_unplug(peer: FakeQemu, client: Client, args: dict[str, Any]) -> None:
    """``device_del`` as QEMU answers it when the guest refuses the unplug.

    QEMU accepts the request; the guest then reports an error, and QEMU withdraws the
    request, keeps the device and sends DEVICE_UNPLUG_GUEST_ERROR (qapi/qdev.json, 6.2+).
    """
    if args["id"] not in peer.devices:
        raise Reply(f"Device '{args['id']}' not found", "DeviceNotFound")
    client.later(
        "DEVICE_UNPLUG_GUEST_ERROR", {"device": args["id"], "path": peripheral(args["id"])}
    )


def peripheral(device_id: str) -> str:
    """The QOM path QEMU gives a device with an id."""
    return f"/machine/peripheral/{device_id}"


def _qom_list(peer: FakeQemu, client: Client, args: dict[str, Any]) -> list[dict[str, str]]:
    if args["path"] == "/machine/peripheral":
        return [
            {"name": "type", "type": "string"},
            {"name": "rp0", "type": "child<pcie-root-port>"},
            *({"name": d, "type": "child<virtio-net-pci>"} for d in peer.devices),
        ]
    if args["path"] == "/machine/peripheral/rp0/rp0":
        return [
            {"name": f"child[{i}]", "type": "child<virtio-net-pci>"}
            for i, _ in enumerate(peer.devices)
        ]
    return []


def _qom_get(peer: FakeQemu, client: Client, args: dict[str, Any]) -> int:
    return 8 if args["path"] == "/machine/peripheral/rp0" else 0


def _query_pci(peer: FakeQemu, client: Client, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "bus": 0,
            "devices": [
                {"slot": 0, "function": 0, "qdev_id": "", "id": {"device": 0x29C0}},
                {
                    "slot": 1,
                    "function": 0,
                    "qdev_id": "rp0",
                    "id": {"device": 12},
                    "pci_bridge": {"devices": [{"qdev_id": d} for d in sorted(peer.devices)]},
                },
            ],
        }
    ]


def _virtio_status(peer: FakeQemu, client: Client, args: dict[str, Any]) -> dict[str, Any]:
    return {"status": {"statuses": ["VIRTIO_CONFIG_S_DRIVER_OK: Driver setup"]}}


def _hmp(peer: FakeQemu, client: Client, args: dict[str, Any]) -> str:
    if args.get("command-line") != "info network":
        return ""
    return "".join(f"{n}: index=0,type=tap,fd={fds[0]}\r\n" for n, fds in peer.netdevs.items())


def _cpus(peer: FakeQemu, client: Client, args: dict[str, Any]) -> list[dict[str, int]]:
    return [{"cpu-index": 0}, {"cpu-index": 1}]


def _rx_filter(peer: FakeQemu, client: Client, args: dict[str, Any]) -> list[dict[str, Any]]:
    return []  # the fake's NICs have no rx-filter view


def _set_link(peer: FakeQemu, client: Client, args: dict[str, Any]) -> dict[str, Any]:
    if args["name"] not in peer.devices and args["name"] not in peer.netdevs:
        raise Reply(f"Device '{args['name']}' not found", "DeviceNotFound")
    return {}


def _announce(peer: FakeQemu, client: Client, args: dict[str, Any]) -> dict[str, Any]:
    return {}  # the fake's NICs have no wire to announce on


def _status(peer: FakeQemu, client: Client, args: dict[str, Any]) -> dict[str, Any]:
    return {"status": "running", "running": True}


COMMANDS: dict[str, Handler] = {
    "qmp_capabilities": _nothing,
    "query-status": _status,
    "getfd": _getfd,
    "closefd": _closefd,
    "netdev_add": _netdev_add,
    "netdev_del": _netdev_del,
    "device_add": _device_add,
    "device_del": _device_del,
    "qom-list": _qom_list,
    "qom-get": _qom_get,
    "query-pci": _query_pci,
    "x-query-virtio-status": _virtio_status,
    "human-monitor-command": _hmp,
    "query-cpus-fast": _cpus,
    "query-rx-filter": _rx_filter,
    "set_link": _set_link,
    "announce-self": _announce,
}
