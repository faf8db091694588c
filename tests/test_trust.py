"""A state directory and a link mark as an attacker meets them (kernel tier, root).

The attacker is a real unprivileged user (``nobody``) whose steps run in a child process
with that uid. Every file lives under a per-run directory in ``/tmp``; every link carries
the run prefix; both are removed at the end, also on failure.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from qmpnet import cni
from qmpnet.codec import dump_endpoint
from qmpnet.endpoints.tap import create_tap_endpoint
from qmpnet.errors import StateError
from qmpnet.store import STATE_VERSION, Store
from qmpnet.testing.scene import RUN, unique

EXIT_STATE = 8
ATTACKER = "nobody"


def _attacker() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(ATTACKER)
    except KeyError:
        pytest.skip(f"no {ATTACKER} user on this host")


def as_attacker(*cmd: str) -> None:
    """Run ``cmd`` as the unprivileged user (it must succeed)."""
    user = _attacker()
    subprocess.run(cmd, check=True, user=user.pw_uid, group=user.pw_gid, extra_groups=[])


def qmpnet(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from qmpnet.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, check=False
    )


def qmpnet_as_attacker(*args: str) -> tuple[int, str]:
    """The CLI run by the unprivileged user: (exit status, stderr).

    Forked from this process and then made that user, since the interpreter may live
    where the user cannot read (a pyenv under /root).
    """
    user = _attacker()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (pytest replaced it)
            os.setgroups([])
            os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
            os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
            from qmpnet.cli import main

            status = main(list(args))
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write)
    with os.fdopen(read) as fh:
        err = fh.read()
    _, wait = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait), err


def tree(path: Path) -> dict[str, Any]:
    """Every entry under ``path`` with its owner, mode and content: what "nothing changed" means."""
    out: dict[str, Any] = {}
    for entry in sorted(path.rglob("*")):
        info = entry.lstat()
        text = (
            entry.read_text()
            if stat.S_ISREG(info.st_mode)
            else os.readlink(entry)
            if entry.is_symlink()
            else ""
        )
        out[str(entry.relative_to(path))] = (info.st_uid, stat.S_IMODE(info.st_mode), text)
    return out


@pytest.fixture
def base(require_root: None) -> Iterator[Path]:
    """A per-run directory in /tmp, sticky and world-writable like /tmp itself."""
    path = Path("/tmp") / unique("trust")
    path.mkdir()
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tap(require_root: None) -> Iterator[str]:
    """Another program's tap (run-prefixed), removed at the end."""
    name = unique("ot")
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def link_exists(name: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", name], capture_output=True, check=False).returncode
        == 0
    )


def set_alias(name: str, alias: str) -> None:
    subprocess.run(["ip", "link", "set", name, "alias", alias], check=True)


def test_a_directory_another_user_made_is_refused_and_left_alone(base: Path) -> None:
    vm = base / "vm-x"
    as_attacker("mkdir", "-m", "0777", str(vm))
    as_attacker("chmod", "0777", str(vm))  # mkdir's mode is cut by the umask
    target = base / "target"
    as_attacker("ln", "-s", str(target), str(vm / "lock"))
    before = tree(base)
    for command in ("list-ifaces", "reconcile"):
        proc = qmpnet(command, "--qmp", str(base / "none.sock"), "--state", str(vm))
        assert proc.returncode == EXIT_STATE, proc.stderr
        assert str(vm) in proc.stderr
        assert f"owned by uid {_attacker().pw_uid}" in proc.stderr
    assert tree(base) == before, "nothing changed: no chmod, no lock, no target"
    assert not target.exists()


@pytest.mark.asyncio
async def test_an_ancestor_others_may_write_to_is_refused(base: Path) -> None:
    loose = base / "loose"
    as_attacker("mkdir", "-m", "0777", str(loose))
    as_attacker("chmod", "0777", str(loose))
    wide = base / "wide"  # root's, but anyone may replace what is in it
    wide.mkdir()
    wide.chmod(0o777)
    for above, why in ((loose, "owned by uid"), (wide, "writable by others")):
        store = Store(above / "vm")
        with pytest.raises(StateError, match=f"above the state directory .*{why}"):
            store.load()
        with pytest.raises(StateError, match=f"above the state directory .*{why}"):
            async with store.locked():
                pytest.fail("locked under a directory another user controls")
        assert not (above / "vm").exists()


def test_a_directory_of_ours_others_may_write_to_is_refused(base: Path) -> None:
    vm = base / "vm"
    vm.mkdir()
    vm.chmod(0o777)
    proc = qmpnet("reconcile", "--qmp", str(base / "none.sock"), "--state", str(vm))
    assert proc.returncode == EXIT_STATE, proc.stderr
    assert "writable by group or others" in proc.stderr
    assert list(vm.iterdir()) == []


def test_a_planted_lock_symlink_is_not_followed(base: Path) -> None:
    vm = base / "vm"
    vm.mkdir(mode=0o700)
    target = base / "etc-somefile"
    (vm / "lock").symlink_to(target)
    (vm / "state.json").symlink_to(target)
    proc = qmpnet("reconcile", "--qmp", str(base / "none.sock"), "--state", str(vm))
    assert proc.returncode == EXIT_STATE, proc.stderr
    assert "symbolic link" in proc.stderr
    assert not target.exists(), "root created the link's target"
    assert {p.name for p in vm.iterdir()} == {"lock", "state.json"}


def test_a_state_directory_that_is_a_symlink_is_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o700)
    (base / "vm").symlink_to(real)
    proc = qmpnet("reconcile", "--qmp", str(base / "none.sock"), "--state", str(base / "vm"))
    assert proc.returncode == EXIT_STATE, proc.stderr
    assert "symbolic link" in proc.stderr
    assert list(real.iterdir()) == []


def test_a_user_on_roots_lock_gets_a_state_error(base: Path) -> None:
    vm = base / "vm"
    vm.mkdir(mode=0o700)
    (vm / "lock").write_text("")
    for command in ("reconcile", "list-ifaces"):
        status, err = qmpnet_as_attacker(
            command, "--qmp", str(base / "none.sock"), "--state", str(vm)
        )
        assert status == EXIT_STATE, err
        assert "permission denied" in err
        assert "Errno" not in err


def _forge(vm: Path, name: str, endpoint_id: str) -> None:
    ep = create_tap_endpoint(0, tap_name=name)
    ep = attrs.evolve(ep, tap_interface=attrs.evolve(ep.tap_interface, id=endpoint_id))
    state = {
        "version": STATE_VERSION,
        "endpoints": [{"status": "plugged", "endpoint": dump_endpoint(ep)}],
    }
    (vm / "state.json").write_text(json.dumps(state))


@pytest.mark.asyncio
@pytest.mark.parametrize("copied", ["legacy", "tagged"])
async def test_a_forged_state_file_cannot_make_reconcile_delete_a_link(
    base: Path, tap: str, copied: str
) -> None:
    """The alias is copied from ``ip link`` (world-readable): it proves nothing."""
    vm = base / "vm"
    store = Store(vm)
    async with store.locked():  # a live directory: it has its key
        pass
    endpoint_id = "qn" + "ab" * 5
    set_alias(tap, f"qmpnet:{endpoint_id}" + (":0123456789abcdef" if copied == "tagged" else ""))
    _forge(vm, tap, endpoint_id)
    proc = qmpnet("reconcile", "--qmp", str(base / "none.sock"), "--state", str(vm))
    assert proc.returncode == 0, proc.stderr
    assert link_exists(tap), "reconcile deleted another program's tap"


@pytest.fixture
def second_tap(require_root: None) -> Iterator[str]:
    name = unique("ot")
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def test_a_link_of_an_earlier_release_is_still_removed_by_its_recorded_name(
    base: Path, tap: str, second_tap: str
) -> None:
    """State of a release without the key: its NIC's tap, named as recorded, may go; a link
    that only wears the same untagged mark under another name stays."""
    vm = base / "vm"
    vm.mkdir(mode=0o700)
    endpoint_id = "qn" + "cd" * 5
    set_alias(tap, f"qmpnet:{endpoint_id}")
    set_alias(second_tap, f"qmpnet:{endpoint_id}")
    _forge(vm, tap, endpoint_id)
    proc = qmpnet("reconcile", "--qmp", str(base / "none.sock"), "--state", str(vm))
    assert proc.returncode == 0, proc.stderr
    assert not link_exists(tap)
    assert link_exists(second_tap)


def test_temp_files_of_a_killed_write_are_removed_by_the_next_operation(base: Path) -> None:
    vm = base / "vm"
    vm.mkdir(mode=0o700)
    (vm / "state.json").write_text(json.dumps({"version": STATE_VERSION, "endpoints": []}))
    for name in (".state.json.k1ll3d00", ".journal.json.k1ll3d01", ".mark.key.k1ll3d02"):
        (vm / name).write_text("{half")
    (vm / ".other.k1ll3d03").write_text("not ours")
    proc = qmpnet("reconcile", "--qmp", str(base / "none.sock"), "--state", str(vm))
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in vm.iterdir()} <= {"state.json", "lock", "mark.key", ".other.k1ll3d03"}
    assert (vm / ".other.k1ll3d03").exists()


# --- the CNI plugin's stateDir -----------------------------------------------------------


def _cni_env(command: str, netns: str, container: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }


@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_cni_refuses_a_symlinked_state_dir_and_deletes_nothing_in_its_target(
    base: Path, netns: str, command: str
) -> None:
    target = base / "target"
    target.mkdir(mode=0o700)
    for name in ("lock", "cni.lock", "state.json", "journal.json"):
        (target / name).write_text("keep")
    container = f"{RUN}c"
    (base / container).symlink_to(target)
    conf = {
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "qmpnet-cni",
        "qmpSocket": str(base / "qmp.sock"),
        "stateDir": str(base / "{containerId}"),
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "52:54:00:00:00:05", "sandbox": netns}],
            "ips": [],
        },
    }
    before = tree(base)
    status, out = cni.run(json.dumps(conf).encode(), _cni_env(command, netns, container))
    assert status != 0, out
    reply = json.loads(out)
    assert reply["code"] == cni.Code.IO_FAILURE, reply
    assert "symbolic link" in reply["msg"]
    assert tree(base) == before, "nothing in the target was touched"
