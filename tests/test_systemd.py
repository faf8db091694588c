"""The systemd handshake without systemd: LISTEN_* parsing and sd_notify datagrams."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmpnet.service.systemd import ActivationError, Notifier, listen_fds


def test_listen_fds_of_another_process_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert listen_fds(env) == []
    assert env == {}


def test_listen_fds_of_this_process_are_named() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert listen_fds(env) == [(3, "a"), (4, "b")]
    assert env == {}


def test_a_bad_count_is_refused() -> None:
    with pytest.raises(ActivationError, match="LISTEN_FDS"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "zero"})


def test_no_variables_no_sockets() -> None:
    assert listen_fds({}) == []


def test_notify_sends_one_datagram_and_unsets_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        env = {"NOTIFY_SOCKET": str(path)}
        notifier = Notifier(env)
        assert env == {}
        assert notifier.ready("ready: 0 VMs")
        assert server.recv(4096) == b"READY=1\nSTATUS=ready: 0 VMs"
        assert notifier.stopping()
        assert server.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        notifier.close()


def test_notify_to_an_abstract_socket() -> None:
    name = f"qmpnet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.status("reconciling 2 VMs")
        assert server.recv(4096) == b"STATUS=reconciling 2 VMs"
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready("x")


QMPNETD = str(Path(sys.executable).with_name("qmpnetd"))
QMPNET = str(Path(sys.executable).with_name("qmpnet"))
#: systemd sets LISTEN_PID after fork, to the child's own pid: a shell's $$ before its exec
#: (bash: dash refuses an fd above 9 in a redirection)
ACTIVATE = 'exec 3<&{fd}; exec env LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=qmpnetd.socket "$@"'


def test_qmpnetd_socket_activated_and_notifying(tmp_path: Path) -> None:
    """fd 3 and NOTIFY_SOCKET exactly as systemd passes them: READY after start-up, the
    client served through the inherited socket, STOPPING on SIGTERM, exit 0."""
    path = tmp_path / "qmpnetd.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    fd = listening.fileno()
    daemon = [QMPNETD, "--socket", str(path), "--state-root", str(tmp_path / "root")]
    with (tmp_path / "stderr").open("w") as log:
        proc = subprocess.Popen(
            ["bash", "-c", ACTIVATE.format(fd=fd), "bash", *daemon],
            pass_fds=[fd],
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
            stderr=log,
        )
    try:
        listening.close()  # the service alone holds it now
        messages = [notify.recv(4096)]
        while b"READY=1" not in messages[-1]:
            messages.append(notify.recv(4096))
        assert messages == [b"STATUS=reconciling 0 VMs", b"READY=1\nSTATUS=ready: 0 VMs"]
        status = subprocess.run(
            [QMPNET, "--socket", str(path), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
        assert proc.wait(60) == 0
        assert path.exists()  # systemd's socket is left for the next activation
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        notify.close()


def test_a_passed_fd_that_is_not_a_listening_unix_socket_is_refused(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
        fd = inet.fileno()
        daemon = [QMPNETD, "--socket", str(tmp_path / "s"), "--state-root", str(tmp_path / "r")]
        proc = subprocess.run(
            ["bash", "-c", ACTIVATE.format(fd=fd), "bash", *daemon],
            pass_fds=[fd],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 3, proc.stderr
    assert "needs a listening AF_UNIX stream socket" in proc.stderr
    assert "Traceback" not in proc.stderr
