"""Bad and oversized input at every boundary ends as a typed error, never as "internal error".

The CLI's interface JSON (file or stdin) and TOML config, its command-line names and MACs, and
the CNI plugin's stdin are fed hostile documents and random raw bytes: the answer is exit 3 (the
CNI's decode or invalid-config code), one short line naming the cap or the reason, never exit 1,
CNI code 199 or a traceback, and nothing is connected to (the QMP path does not exist, so an
input that got past the checks would be told as exit 4, not 3).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qmpnet import cli
from qmpnet.boundary import DEPTH_MAX, DOCUMENT_MAX
from qmpnet.cni.main import run as cni_run
from qmpnet.cni.spec import Code

NO_QEMU = "/nonexistent/qmp.sock"
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """cli.main() sets up the process's logging; give the next test the logging it had."""
    root = logging.getLogger()
    names = ("qemu.qmp", "pyroute2", "asyncio")
    saved = root.handlers[:], root.level, [logging.getLogger(n).level for n in names]
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in zip(names, saved[2], strict=True):
        logging.getLogger(name).setLevel(level)


def _cli(
    capsys: pytest.CaptureFixture[str], argv: list[str], stdin: bytes | None = None
) -> tuple[int, str]:
    if stdin is not None:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
            code = cli.main(argv)
    else:
        code = cli.main(argv)
    return code, capsys.readouterr().err


def _add(tmp_path: Path, *extra: str) -> list[str]:
    return ["add-iface", "--state", str(tmp_path / "st"), "--qmp", NO_QEMU, *extra]


def _assert_one_short_line(err: str) -> None:
    assert err.count("\n") == 1, err[:2000]
    assert len(err) < 1000, err[:2000]
    assert "Traceback" not in err
    assert "internal error" not in err


HOSTILE_JSON: dict[str, tuple[bytes, str]] = {
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, f"cap of {DEPTH_MAX} levels"),
    "nested past the cap": (b'{"device":' + b"[" * 40 + b"]" * 40 + b"}", "levels"),
    "UTF-16": ('{"mtu": 1500}'.encode("utf-16"), "not UTF-8"),
    "not UTF-8": (b'{"device": "\xff\xfe"}', "not UTF-8"),
    "5000-digit mtu": (b'{"mtu": ' + b"9" * 5000 + b"}", "digits"),
    "5000-digit mask": (
        b'{"IPAddresses": [{"address": "10.0.0.1", "mask": "' + b"9" * 5000 + b'"}]}',
        "prefix length",
    ),
    "10 MB array": (b"[" + b"1," * 5_000_000 + b"1]", f"cap of {DOCUMENT_MAX} bytes"),
    "large array": (b"[" + b"1," * 300_000 + b"1]", "300001 items in all"),
    "long string": (b'{"device": "' + b"x" * 900_000 + b'"}', "900000 characters in all"),
}


@pytest.mark.parametrize("doc", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
@pytest.mark.parametrize("via", ["file", "stdin"])
def test_hostile_interface_json_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: tuple[bytes, str], via: str
) -> None:
    raw, said = doc
    if via == "file":
        (tmp_path / "if.json").write_bytes(raw)
        code, err = _cli(capsys, _add(tmp_path, str(tmp_path / "if.json")))
    else:
        code, err = _cli(capsys, _add(tmp_path, "-"), stdin=raw)
    assert code == cli.EXIT_INPUT, err[:500]
    assert said in err
    _assert_one_short_line(err)
    assert not (tmp_path / "st").exists()


HOSTILE_TOML: dict[str, tuple[bytes, str]] = {
    "deeply nested": (b"[network]\nx = " + b"[" * 3000 + b"1" + b"]" * 3000 + b"\n", "levels"),
    "5000-digit queues": (b"[network]\nqueues = " + b"9" * 5000 + b"\n", "not valid TOML"),
    "400-digit queues": (b"[network]\nqueues = " + b"9" * 400 + b"\n", "digits"),
    "not UTF-8": (b"[network]\nqueues = 2\n# \xff\n", "not UTF-8"),
    "UTF-16": ("[network]\nqueues = 2\n".encode("utf-16"), "not UTF-8"),
    "too large": (b"[network]\n" + b"#" * (DOCUMENT_MAX + 1), "cap of"),
}


@pytest.mark.parametrize("doc", HOSTILE_TOML.values(), ids=HOSTILE_TOML.keys())
def test_hostile_toml_config_is_bad_input_before_any_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: tuple[bytes, str]
) -> None:
    raw, said = doc
    (tmp_path / "qmpnet.toml").write_bytes(raw)
    (tmp_path / "if.json").write_text('{"device": "eth0"}')
    code, err = _cli(
        capsys, _add(tmp_path, "--config", str(tmp_path / "qmpnet.toml"), str(tmp_path / "if.json"))
    )
    assert code == cli.EXIT_INPUT, err[:500]
    assert said in err
    _assert_one_short_line(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["--tap-name", "tap\udcff"],  # a non-UTF-8 argv byte, as Python decodes it
        ["--tap-name", "tap0\n"],
        ["--tap-name", ""],
    ],
    ids=["non-UTF-8 tap name", "trailing newline", "empty"],
)
def test_bad_tap_name_is_bad_input_before_any_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    (tmp_path / "if.json").write_text('{"device": "eth0"}')
    code, err = _cli(capsys, _add(tmp_path, *argv, str(tmp_path / "if.json")))
    assert code == cli.EXIT_INPUT, err
    assert "--tap-name" in err
    _assert_one_short_line(err)


@pytest.mark.parametrize("mac", ["", "52:54:00:12:34:56\n", "\n"], ids=["empty", "newline", "nl"])
def test_bad_del_iface_mac_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mac: str
) -> None:
    argv = ["del-iface", "--state", str(tmp_path / "st"), "--qmp", NO_QEMU, "--mac", mac]
    code, err = _cli(capsys, argv)
    assert code == cli.EXIT_INPUT, err
    assert "--mac" in err
    _assert_one_short_line(err)


# --- the CNI plugin's stdin ----------------------------------------------------------------

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/nonexistent/netns",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/nonexistent",
}
_BASE = (
    '{"cniVersion": "1.0.0", "name": "net", "type": "qmpnet", "qmpSocket": "' + NO_QEMU + '", '
    '"stateDir": "/nonexistent/{containerId}", '
)


def _conf(tail: str) -> bytes:
    return (_BASE + tail + "}").encode()


HOSTILE_CNI: dict[str, tuple[bytes, int]] = {
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, Code.DECODE),
    "nested prevResult": (_conf('"prevResult": ' + '{"a": ' * 900 + "1" + "}" * 900), Code.DECODE),
    "prevResult past the cap": (_conf('"prevResult": ' + "[" * 40 + "]" * 40), Code.DECODE),
    "UTF-16": (_conf('"mtu": 1500').decode().encode("utf-16"), Code.DECODE),
    "not UTF-8": (_conf('"logFile": "\xff"').replace(b"\xc3\xbf", b"\xff"), Code.DECODE),
    "5000-digit mtu": (_conf('"mtu": ' + "9" * 5000), Code.DECODE),
    "50-digit mtu": (_conf('"mtu": ' + "9" * 50), Code.INVALID_CONFIG),
    "10 MB array": (_conf('"x": [' + "1," * 5_000_000 + "1]"), Code.DECODE),
    "name with a newline": (
        _conf('"mtu": 1500').replace(b'"net"', b'"net\\n"'),
        Code.INVALID_CONFIG,
    ),
}


def _cni(raw: bytes, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    status, out = cni_run(raw, env or ENV)
    assert "\n" not in out
    assert len(out) < 2000, out[:2000]
    return status, json.loads(out) if out else {}, out


@pytest.mark.parametrize("doc", HOSTILE_CNI.values(), ids=HOSTILE_CNI.keys())
def test_hostile_cni_stdin_is_a_decode_or_config_error(doc: tuple[bytes, int]) -> None:
    raw, code = doc
    status, answer, out = _cni(raw)
    assert status == 1
    assert answer["code"] == code, out


def test_cni_container_id_with_a_newline_is_refused() -> None:
    status, answer, _ = _cni(_conf('"mtu": 1500'), {**ENV, "CNI_CONTAINERID": "c1\n"})
    assert (status, answer["code"]) == (1, Code.INVALID_ENV)


# --- random raw bytes, not only JSON values ------------------------------------------------


def _json_doc(value: object) -> bytes:
    return json.dumps(value).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mangled(draw: Callable[..., Any], valid: bytes) -> bytes:
    """A valid document with bytes flipped, cut, inserted, or wrapped in a BOM or nesting."""
    raw = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(raw)))
        how = draw(st.sampled_from(["flip", "cut", "insert"]))
        if how == "flip" and at < len(raw):
            raw[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del raw[at:]
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
    wrap = draw(st.sampled_from(["", "bom", "utf16", "nest"]))
    if wrap == "bom":
        return b"\xef\xbb\xbf" + bytes(raw)
    if wrap == "utf16":
        return bytes(raw).decode("utf-8", "replace").encode("utf-16")
    if wrap == "nest":
        depth = draw(st.integers(1, 200))
        return b"[" * depth + bytes(raw) + b"]" * depth
    return bytes(raw)


_INTERFACE = _json_doc(
    {
        "device": "eth0",
        "name": "eth0",
        "mtu": 1500,
        "hwAddr": "52:54:00:12:34:56",
        "IPAddresses": [{"family": 4, "address": "10.0.0.2", "mask": "24"}],
    }
)
interface_bytes = st.one_of(
    st.binary(max_size=300), json_values.map(_json_doc), mangled(_INTERFACE)
)


@PROPERTY
@given(raw=interface_bytes)
@example(raw=b"\xff\xfe{\x00}\x00")
@example(raw=b'{"mtu": 1' + b"0" * 4400 + b"}")
def test_raw_bytes_on_add_iface_stdin_never_end_as_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes
) -> None:
    code, err = _cli(capsys, _add(tmp_path, "-"), stdin=raw)
    # bad input (3), or input good enough to get as far as the missing monitor (4)
    assert code in (cli.EXIT_INPUT, cli.EXIT_QEMU), err
    _assert_one_short_line(err)
    assert not (tmp_path / "st").exists()


_NETCONF = _conf(
    '"model": "tcfilter", "mtu": 1500, "prevResult": {"cniVersion": "1.0.0", '
    '"interfaces": [{"name": "eth0", "mac": "52:54:00:12:34:56", "sandbox": "/x"}], '
    '"ips": [{"address": "10.0.0.2/24", "interface": 0}]}'
)
cni_bytes = st.one_of(st.binary(max_size=300), json_values.map(_json_doc), mangled(_NETCONF))


@PROPERTY
@given(raw=cni_bytes, command=st.sampled_from(["ADD", "CHECK", "DEL", "VERSION"]))
@example(raw=_NETCONF, command="ADD")
def test_raw_bytes_on_cni_stdin_never_end_as_internal_error(raw: bytes, command: str) -> None:
    status, answer, out = _cni(raw, {**ENV, "CNI_COMMAND": command})
    if status:
        assert answer["code"] != Code.INTERNAL, out
        assert "internal error" not in answer["msg"]
