"""The shipped systemd units: valid for systemd, and in step with qmpnetd's own defaults.

``systemd-analyze verify`` reads the units as systemd would (unknown directives, a missing
ExecStart binary, a broken socket/service pairing); it needs no running systemd. The
``systemd`` package that carries it is in ``make setup``'s set; where it is missing the test
fails saying so, never skips.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qmpnet import layout
from qmpnet.service import protocol

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"


def _install(dest: Path) -> Path:
    qmpnetd = Path(sys.executable).with_name("qmpnetd")
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "install-units",
            f"DESTDIR={dest}",
            "UNIT_DIR=/units",
            f"QMPNETD={qmpnetd}",
        ],
        check=True,
        capture_output=True,
    )
    return dest / "units"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_units_verify_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: `make setup` installs the systemd package")
    units = _install(tmp_path)
    done = subprocess.run(
        [analyze, "verify", str(units / "qmpnetd.socket"), str(units / "qmpnetd.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "qmpnetd" not in done.stdout + done.stderr  # no warning about our units


def test_units_match_the_daemons_defaults(tmp_path: Path) -> None:
    units = _install(tmp_path)
    socket = _unit(units / "qmpnetd.socket")
    service = _unit(units / "qmpnetd.service")
    assert socket["Socket"]["ListenStream"] == protocol.DEFAULT_SOCKET
    exec_start = service["Service"]["ExecStart"].split()
    assert Path(exec_start[0]) == Path(sys.executable).with_name("qmpnetd")
    assert exec_start[exec_start.index("--socket") + 1] == protocol.DEFAULT_SOCKET
    assert exec_start[exec_start.index("--state-root") + 1] == layout.DEFAULT_ROOT
    assert service["Service"]["Type"] == "notify"  # READY=1 after the start-up reconcile
