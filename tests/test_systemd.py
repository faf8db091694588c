"""The systemd handshake without systemd: LISTEN_* parsing and sd_notify datagrams."""

from __future__ import annotations

import os
import socket
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
