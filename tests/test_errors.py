"""The error tree: every error pickles with its type, message and fields intact.

Errors cross the service's socket and process boundaries; an error that cannot be rebuilt
there (or comes back without its fields) is a second failure on top of the first. The test
walks the whole tree, so a new subclass without a sample here fails until it has one.
"""

from __future__ import annotations

import copy
import errno
import importlib
import pickle
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest

import qmpnet
from qmpnet import errors
from qmpnet.errors import (
    ConnectFailure,
    HostError,
    InvalidInputError,
    PlugError,
    QmpCommandError,
    QmpConnectError,
    QmpnetError,
    UnknownValueError,
    UnplugRefusedError,
    UnplugTimeoutError,
    shown,
)


def _subclasses(cls: type[QmpnetError]) -> Iterator[type[QmpnetError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _all_classes() -> list[type[QmpnetError]]:
    """Every error class qmpnet defines, wherever it is defined (all modules imported)."""
    for module in pkgutil.walk_packages(qmpnet.__path__, "qmpnet."):
        importlib.import_module(module.name)
    return [
        QmpnetError,
        *(c for c in _subclasses(QmpnetError) if c.__module__.startswith("qmpnet.")),
    ]


#: class name -> constructor arguments of samples, as qmpnet builds them (every argument used).
SAMPLES: dict[str, list[tuple[Any, ...]]] = {
    "QmpnetError": [("plain message",)],
    "InvalidInputError": [("mtu", 70000, "above the kernel's 65535")],
    "UnknownValueError": [("model", "vdpa", ("macvtap", "tcfilter"))],
    "NoSuchInterfaceError": [("mac", "52:54:00:00:00:01", "no interface has this MAC")],
    "UnsupportedError": [("tap endpoint tap0", "cold plug", "taps are hot-plugged only")],
    "HostError": [
        ("create link", "tap0 (netns /run/netns/x)", errno.EPERM),
        ("wait for link", "eth1", None, "still missing after 5 s"),
    ],
    "LinkExistsError": [("tap0",)],
    "NotOursError": [("delete link", "eth0")],
    "TapGoneError": [("qn0123456789-dev", "tap0_kata")],
    "QemuHoldsError": [("eth1",)],
    "NetnsError": [("open netns", "/run/netns/gone", errno.ENOENT)],
    "QmpError": [("something between us and QEMU",)],
    "QmpConnectError": [
        ("/run/vm/qmp.sock", "no such socket", ConnectFailure.ABSENT),
        ("/run/vm/qmp.sock", "cannot connect"),
    ],
    "MonitorHeldError": [("/run/vm/qmp.sock", 4242)],
    "DeniedError": [("uid 1000", "not root and not in the service's group")],
    "QmpCommandError": [
        ("device_add", {"id": "qn1", "bus": "rp0"}, "GenericError", "Bus 'rp0' not found")
    ],
    "QmpDisconnectedError": [("netdev_add", "EOFError")],
    "QmpTimeoutError": [("query-pci", 2.5)],
    "UnplugTimeoutError": [("qn1-dev", 5)],
    "UnplugRefusedError": [("qn1-dev", "/machine/peripheral/qn1-dev")],
    "PlugError": [
        (
            "hot-plug",
            "device_add",
            "eth1",
            QmpCommandError("device_add", {}, "GenericError", "no slot"),
        ),
        ("unplug", "delete link", "eth2", OSError(errno.EBUSY, "Device or resource busy")),
        (
            "hot-plug",
            "wait guest",
            "eth3",
            PlugError("hot-plug", "inner", "eth3", UnplugTimeoutError("d", 1)),
        ),
    ],
    "StateError": [("/var/lib/qmpnet/vm/state.json", "write: No space left on device")],
    "CniError": [(11, "the QMP monitor is busy", "try again later"), (7, "bad config")],
}

ALL_CLASSES = _all_classes()
CASES = [
    pytest.param(cls, args, id=f"{cls.__name__}-{i}")
    for cls in ALL_CLASSES
    for i, args in enumerate(SAMPLES.get(cls.__name__, [None]))
]


def _same(a: Any, b: Any) -> bool:
    """Equal values; errors (which compare by identity) by type, args and fields."""
    if isinstance(a, BaseException):
        return (
            type(a) is type(b) and a.args == b.args and str(a) == str(b) and _same(vars(a), vars(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def test_every_error_class_has_a_sample() -> None:
    assert [c.__name__ for c in ALL_CLASSES if c.__name__ not in SAMPLES] == []
    assert {c.__name__ for c in ALL_CLASSES} >= {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, QmpnetError)
    }


@pytest.mark.parametrize(("cls", "args"), CASES)
def test_error_pickles_with_message_and_fields(
    cls: type[QmpnetError], args: tuple[Any, ...] | None
) -> None:
    assert args is not None, f"no sample for {cls.__name__} in SAMPLES"
    err = cls(*args)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(err, protocol))
        assert type(back) is cls
        assert str(back) == str(err)
        assert back.args == err.args
        assert vars(back).keys() == vars(err).keys()
        assert _same(vars(back), vars(err)), (vars(back), vars(err))
    assert _same(copy.deepcopy(err), err)


def test_plug_error_cause_survives_with_its_own_fields() -> None:
    cause = QmpCommandError("device_add", {"id": "x"}, "GenericError", "Duplicate ID")
    back = pickle.loads(pickle.dumps(PlugError("hot-plug", "device_add", "eth1", cause)))
    assert isinstance(back.cause, QmpCommandError)
    assert (back.cause.error_class, back.cause.desc) == ("GenericError", "Duplicate ID")
    oserr = pickle.loads(pickle.dumps(PlugError("hot-plug", "s", "e", OSError(errno.EIO, "EIO"))))
    assert isinstance(oserr.cause, OSError)
    assert oserr.cause.errno == errno.EIO


def test_messages_are_unchanged() -> None:
    assert (
        str(UnknownValueError("model", "x", ("a", "b"))) == "Unknown model x: valid values are a, b"
    )
    assert str(UnplugTimeoutError("d1", 5)) == (
        "device_del d1: no DEVICE_DELETED within 5 s (guest paused, busy or without "
        "hot-plug support); the unplug is pending"
    )
    assert str(UnplugRefusedError("d1", "/machine/peripheral/d1")) == (
        "device_del d1: the guest refused to release the device (DEVICE_UNPLUG_GUEST_ERROR "
        "for /machine/peripheral/d1); it stays plugged"
    )
    assert str(HostError("create link", "t", errno.EEXIST)) == "create link t: EEXIST: File exists"
    assert str(QmpConnectError("/q", "busy", ConnectFailure.BUSY)) == "QMP monitor /q: busy"


@pytest.mark.parametrize(
    ("kind", "gone"),
    [
        (ConnectFailure.ABSENT, True),
        (ConnectFailure.CLOSED, True),
        (ConnectFailure.BUSY, False),
        (ConnectFailure.NOT_A_SOCKET, False),
        (ConnectFailure.OTHER, False),
    ],
)
def test_connect_failure_says_whether_qemu_is_gone(kind: ConnectFailure, gone: bool) -> None:
    err = QmpConnectError("/q", "why", kind)
    assert err.gone is gone
    assert pickle.loads(pickle.dumps(err)).kind is kind
    assert QmpConnectError("/q", "why").kind is ConnectFailure.OTHER


# --- echoed values and QEMU's messages are bounded ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "x" * 10_000_000,
        list(range(1_000_000)),
        {str(i): i for i in range(100_000)},
        10**5000,  # Python refuses to print an int of more than 4300 digits
        "a\nb\x1b[31m" * 1000,
    ],
    ids=["10 MB string", "million-item list", "large object", "5000-digit int", "controls"],
)
def test_an_echoed_value_is_cut_with_its_size_and_escaped(value: object) -> None:
    err = InvalidInputError("mtu", value, "must be an integer from 68 to 65535")
    text = str(err)
    assert len(text) < 500
    assert "\n" not in text
    assert "\x1b" not in text
    if isinstance(value, str | list | dict):
        assert f"{len(value)} " in text  # its size is stated
    assert err.value is value  # the field keeps the whole value


def test_an_unknown_value_is_cut_too() -> None:
    text = str(UnknownValueError("model", "m\n" * 100_000, ("macvtap", "tcfilter")))
    assert len(text) < 500
    assert "\n" not in text
    assert text.endswith("valid values are macvtap, tcfilter")


def test_qemu_error_text_is_one_capped_line_and_kept_whole() -> None:
    desc = "Bus 'x' not found\n" * 120_000  # about 2 MB
    err = QmpCommandError("device_add", {"id": "qn0-dev"}, "GenericError", desc)
    assert "\n" not in str(err)
    assert len(str(err)) < 600
    assert str(len(desc)) in str(err)
    assert err.desc == desc
    short = QmpCommandError("netdev_del", {}, "DeviceNotFound", "Device 'x' not found")
    assert str(short) == "netdev_del failed: DeviceNotFound: Device 'x' not found"


def test_a_short_value_is_shown_as_its_repr() -> None:
    assert shown("eth0") == "'eth0'"
    assert shown(70000) == "70000"
    assert shown([1, 2]) == "[1, 2]"
