"""Where state lives under a state root, shared by the direct mode and qmpnetd.

``ROOT/vm-<hash of the QMP socket's real path>/`` is a VM's state directory (:mod:`.store`),
whichever mode made it, so the two modes find the same files and take the same lock.
``ROOT/held/vm-<hash>`` says that qmpnetd holds the VM's QMP monitor: a monitor serves one
client at a time, so a direct-mode call for that VM fails at once instead of waiting for a
greeting that cannot come. ``ROOT/registry.json`` is the service's list of registered VMs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

DEFAULT_ROOT = "/run/qmpnet"
HELD_DIR = "held"
REGISTRY_FILE = "registry.json"


def state_root(option: str | None = None) -> str:
    """The state root: the option, else ``$QMPNET_STATE_ROOT``, else ``/run/qmpnet``."""
    return option or os.environ.get("QMPNET_STATE_ROOT") or DEFAULT_ROOT


def vm_key(qmp: str) -> str:
    """A VM's directory name under the root, from its QMP socket's real path."""
    digest = hashlib.sha256(os.path.realpath(qmp).encode()).hexdigest()[:16]
    return f"vm-{digest}"


def vm_dir(root: str, qmp: str) -> str:
    return os.path.join(root, vm_key(qmp))


def hold_path(root: str, qmp: str) -> str:
    return os.path.join(root, HELD_DIR, vm_key(qmp))


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            line = fh.read()
    except OSError:
        return None
    return int(line[line.rindex(b")") + 2 :].split()[19])


def write_hold(root: str, qmp: str) -> None:
    """Say that this process holds the VM's monitor (the directory is root's, 0700)."""
    directory = os.path.join(root, HELD_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    pid = os.getpid()
    path = hold_path(root, qmp)
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w", encoding="ascii") as fh:
        json.dump({"pid": pid, "start_time": _start_time(pid), "qmp": qmp}, fh)
    os.replace(tmp, path)


def drop_hold(root: str, qmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(hold_path(root, qmp))


def holder(root: str, qmp: str) -> int | None:
    """The pid of a live process (not this one) that holds the VM's monitor, if any.

    A hold left by a service that died is ignored: its pid is gone or belongs to another
    process now (the start time tells).
    """
    try:
        with open(hold_path(root, qmp), encoding="ascii") as fh:
            data = json.load(fh)
        pid, start = int(data["pid"]), data.get("start_time")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or _start_time(pid) != start:
        return None
    return pid
