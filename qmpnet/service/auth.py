"""Who is calling: a client's credentials from its socket, and what that caller may name.

Root may do anything. A member of the service's group is not root: it may act only on VMs
root registered or whose QMP peer is a QEMU the member does not own, on netns paths under
``/run/netns`` or a VM's registered sandbox, and may never name state paths or files for the
service to read — otherwise a member could make root hand tap fds to a socket it controls, or
plug links of namespaces it should not reach. Anyone else is refused before anything happens.
"""

from __future__ import annotations

import enum
import os
import socket
import struct

import attrs

from qmpnet.model import VmIdentity

#: where ``ip netns add`` puts named namespaces: the only ones a group member may name
NETNS_DIR = "/run/netns"


class Role(enum.Enum):
    ROOT = "root"
    MEMBER = "member"
    NONE = "none"


@attrs.frozen
class Peer:
    """A connected client, from SO_PEERCRED (the kernel's word, not the client's)."""

    pid: int
    uid: int
    gid: int
    #: supplementary groups of the process when it connected (``/proc/PID/status``)
    groups: frozenset[int] = frozenset()

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid, _groups(pid))


def _groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


@attrs.frozen
class Authority:
    """The service's rule: root, and members of ``group`` (a gid) when one is set."""

    group: int | None = None

    def role(self, peer: Peer) -> Role:
        if peer.uid == 0:
            return Role.ROOT
        if self.group is not None and (peer.gid == self.group or self.group in peer.groups):
            return Role.MEMBER
        return Role.NONE


def netns_allowed(path: str, sandboxes: frozenset[str]) -> bool:
    """May a group member name this netns path? Under /run/netns or a registered sandbox."""
    try:
        real = os.path.realpath(path)
        if real in {os.path.realpath(s) for s in sandboxes}:
            return True
    except OSError:  # a namespace link root may not even resolve: not the member's to name
        return False
    parent = os.path.dirname(real)
    return parent == NETNS_DIR and os.path.basename(real) not in ("", ".", "..")


def qemu_serves(identity: VmIdentity | None, caller_uid: int) -> bool:
    """Is the socket served by a QEMU process the caller does not own?

    A QEMU the member runs itself could be any program the member controls (and reads the
    fds it is handed), so only a ``qemu-system-*`` executable running as another user
    counts.
    """
    if identity is None:
        return False
    try:
        exe = os.path.basename(os.readlink(f"/proc/{identity.pid}/exe"))
        owner = os.stat(f"/proc/{identity.pid}").st_uid
    except OSError:
        return False
    return exe.startswith("qemu-system-") and owner != caller_uid
