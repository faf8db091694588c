"""The distribution as a user gets it: the sdist and the wheel, the wheel installed into a
fresh venv with its dependencies from the package index, its three commands run from there;
and the man pages and shell completion ``make install-docs`` installs, read by ``man``,
``lexgrog``, bash and zsh rather than by looking at their text.

The source tree is copied first, so building writes nothing into the checkout; every
directory is a temporary one removed at the end, and pip keeps no cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpnet.cli import build_parser as qmpnet_parser
from qmpnet.cni.request import CNI, REQUIRED_ENV, NetConf
from qmpnet.cni.spec import Code
from qmpnet.cni.versions import LATEST, SUPPORTED_VERSIONS
from qmpnet.service.daemon import build_parser as qmpnetd_parser

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
LICENSE = (ROOT / "LICENSE").read_bytes()
#: not part of the source: the venv, caches, build output
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def run(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def commands(parser: argparse.ArgumentParser) -> list[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


def options(parser: argparse.ArgumentParser) -> list[str]:
    """The long options, but --help (which a man page does not list)."""
    return [
        o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"
    ]


@pytest.fixture(scope="module")
def dists() -> Iterator[tuple[Path, Path]]:
    """(sdist, wheel): the wheel built from the sdist, as ``python -m build`` does."""
    with tempfile.TemporaryDirectory(prefix="qmpnet-dist-") as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "dist")
        shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
        run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)])
        sdist, wheel = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
        assert len(sdist) == 1, sdist
        assert len(wheel) == 1, wheel
        yield sdist[0], wheel[0]


class Venv:
    """A fresh venv with the wheel installed; its commands run outside the source tree."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.bin = home / "bin"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update(
            PATH=f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            PIP_NO_CACHE_DIR="1",
            # no qmpnetd answers here: the commands must not find the machine's
            QMPNET_SOCKET=str(home / "absent.sock"),
            QMPNET_STATE_ROOT=str(home / "state"),
        )

    def run(
        self, prog: str, *args: str, env: dict[str, str] | None = None, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / prog), *args],
            check=False,
            env=self.env | (env or {}),
            cwd=self.home,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(self, prog: str, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> str:
        proc = self.run(prog, *args, env=env, stdin=stdin)
        assert proc.returncode == 0, f"{prog} {args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout


@pytest.fixture(scope="module")
def venv(dists: tuple[Path, Path]) -> Iterator[Venv]:
    with tempfile.TemporaryDirectory(prefix="qmpnet-venv-") as tmp:
        home = Path(tmp, "venv")
        run([sys.executable, "-m", "venv", str(home)])
        env = Venv(home)
        env.ok("python", "-m", "pip", "install", "-q", str(dists[1]))
        yield env


@pytest.fixture(scope="module")
def docs() -> Iterator[tuple[Path, Path]]:
    """(DOCS_DIR, DESTDIR): ``make install-docs PREFIX=/usr`` into a temporary root."""
    with tempfile.TemporaryDirectory(prefix="qmpnet-docs-") as tmp:
        out, dest = Path(tmp, "build"), Path(tmp, "root")
        make = ["make", "-s", "-C", str(ROOT), "install-docs"]
        run([*make, f"DOCS_DIR={out}", f"DESTDIR={dest}", "PREFIX=/usr"])
        yield out, dest


# --- the sdist and the wheel -------------------------------------------------------------


def test_sdist_has_license_units_and_docs_generator(dists: tuple[Path, Path]) -> None:
    top = f"qmpnet-{VERSION}"
    with tarfile.open(dists[0]) as tar:
        names = set(tar.getnames())
        license_file = tar.extractfile(f"{top}/LICENSE")
        assert license_file is not None
        assert license_file.read() == LICENSE
        pkg_info = tar.extractfile(f"{top}/PKG-INFO")
        assert pkg_info is not None
        metadata = pkg_info.read().decode()
    for path in (
        "README.md",
        "pyproject.toml",
        "qmpnet/py.typed",
        "qmpnet/cli.py",
        "contrib/systemd/qmpnetd.service",
        "contrib/systemd/qmpnetd.socket",
        "contrib/docs/manpages.py",
        "contrib/cni-shim/main.go",
        "contrib/cli-shim/main.go",
    ):
        assert f"{top}/{path}" in names
    assert not [n for n in names if "__pycache__" in n]
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata.splitlines()


def test_wheel_has_license_package_data_and_the_three_commands(dists: tuple[Path, Path]) -> None:
    info = f"qmpnet-{VERSION}.dist-info"
    with zipfile.ZipFile(dists[1]) as whl:
        names = set(whl.namelist())
        assert whl.read(f"{info}/licenses/LICENSE") == LICENSE
        metadata = whl.read(f"{info}/METADATA").decode().splitlines()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"qmpnet", info}
    assert {"qmpnet/py.typed", "qmpnet/testing/init.sh", "qmpnet/cni/entry.py"} <= names
    assert "qmpnet/output-schema-v1.json" in names
    assert "License-Expression: Apache-2.0" in metadata
    scripts = dict(re.findall(r"^(\S+) = (\S+)$", entry_points.split("[console_scripts]")[1], re.M))
    assert scripts == PROJECT["scripts"]


# --- the wheel installed into a fresh venv -----------------------------------------------


def test_installed_package_is_the_wheels(venv: Venv) -> None:
    code = "import importlib.metadata as m, qmpnet; print(qmpnet.__file__, m.version('qmpnet'))"
    where, version = venv.ok("python", "-c", code).split()
    assert Path(where).is_relative_to(venv.home / "lib")
    assert version == VERSION


def test_the_installed_output_schema_loads(venv: Venv) -> None:
    code = "import qmpnet.schema as s; print(s.load()['$defs']['schema']['const'])"
    assert venv.ok("python", "-c", code) == "1\n"


def test_qmpnet_version(venv: Venv) -> None:
    out = venv.ok("qmpnet", "--version").splitlines()
    assert out[0] == f"qmpnet {VERSION}"
    assert out[1].startswith(f"qmpnetd: not reachable at {venv.env['QMPNET_SOCKET']}")
    assert len(out) == 2


def test_qmpnet_help_lists_every_command(venv: Venv) -> None:
    out = venv.ok("qmpnet", "--help")
    assert out.startswith("usage: qmpnet ")
    listed = re.findall(r"^    (\S+)\s", out, re.M)
    assert listed == commands(qmpnet_parser())
    assert "exit codes: 0 ok" in out


def test_qmpnetd_help_and_version(venv: Venv) -> None:
    out = venv.ok("qmpnetd", "--help")
    assert out.startswith("usage: qmpnetd ")
    for option in options(qmpnetd_parser()):
        assert option in out
    assert venv.ok("qmpnetd", "--version") == f"qmpnetd {VERSION}\n"


def test_qmpnet_cni_version(venv: Venv) -> None:
    # libcni's version query: dummy values for the other variables
    query = {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy"}
    query["CNI_PATH"] = "dummy"
    asked = venv.ok("qmpnet-cni", env=query, stdin='{"cniVersion": "1.0.0"}')
    supported = list(SUPPORTED_VERSIONS)
    assert json.loads(asked) == {"cniVersion": "1.0.0", "supportedVersions": supported}
    bare = venv.ok("qmpnet-cni", env=query)
    assert json.loads(bare) == {"cniVersion": LATEST, "supportedVersions": supported}


def test_qmpnet_cni_add_loads_the_plugin_with_its_dependencies(venv: Venv) -> None:
    """Past VERSION the whole plugin (pyroute2, qemu.qmp, cattrs) loads: error 4, not 199."""
    conf = '{"cniVersion": "1.0.0", "name": "n", "type": "qmpnet-cni"}'
    proc = venv.run("qmpnet-cni", env={"CNI_COMMAND": "ADD"}, stdin=conf)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "1.0.0",
        "code": Code.INVALID_ENV,
        "msg": "CNI_CONTAINERID is required for ADD",
    }


# --- man pages and completion as make install-docs installs them -------------------------

INSTALLED = {
    "usr/share/man/man1/qmpnet.1",
    "usr/share/man/man8/qmpnetd.8",
    "usr/share/man/man8/qmpnet-cni.8",
    "usr/share/bash-completion/completions/qmpnet",
    "usr/share/bash-completion/completions/qmpnetd",
    "usr/share/zsh/site-functions/_qmpnet",
    "usr/share/zsh/site-functions/_qmpnetd",
}


def test_install_docs_layout(docs: tuple[Path, Path]) -> None:
    out, dest = docs
    files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert files == INSTALLED
    for name in files:
        assert (dest / name).stat().st_mode & 0o777 == 0o644, name
    assert sorted(p.name for p in (out / "man").iterdir()) == [
        "qmpnet-cni.8",
        "qmpnet.1",
        "qmpnetd.8",
    ]


def man(page: Path) -> str:
    """The page as ``man`` renders it, with groff's warnings failing the test."""
    env = os.environ | {"MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    proc = run(["man", "--warnings", "-l", str(page)], env=env)
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def whatis(page: Path) -> str:
    """The NAME line as mandb indexes it for whatis and apropos."""
    out = run(["lexgrog", str(page)]).stdout
    match = re.fullmatch(rf'{re.escape(str(page))}: "(.*)"\n', out)
    assert match, out
    return match.group(1)


def test_qmpnet_man_page(docs: tuple[Path, Path]) -> None:
    page = docs[1] / "usr/share/man/man1/qmpnet.1"
    assert whatis(page) == "qmpnet - hot-plug network interfaces into running QEMU virtual machines"
    text = man(page)
    assert text.startswith("QMPNET(1)")
    for command in commands(qmpnet_parser()):
        assert f"COMMAND 'qmpnet {command}'" in text
    for option in ("--socket PATH", "--direct", "--qmp SOCKET", "--wait-guest", "--mac MAC"):
        assert option in text
    assert re.search(r"^EXIT STATUS\n\s+0\s+ok\n", text, re.M)
    assert re.search(r"^\s+12\s+refused by qmpnetd$", text, re.M)
    for variable in ("QMPNET_SOCKET", "QMPNET_STATE_ROOT", "QMPNET_STATE_DIR"):
        assert re.search(rf"^ENVIRONMENT\n(.*\n)*\s+{variable}$", text, re.M)
    assert f"qmpnet {VERSION}" in text.splitlines()[-1]


def test_qmpnetd_man_page(docs: tuple[Path, Path]) -> None:
    page = docs[1] / "usr/share/man/man8/qmpnetd.8"
    assert whatis(page).startswith("qmpnetd - qmpnet's node service")
    text = man(page)
    assert text.startswith("QMPNETD(8)")
    for option in options(qmpnetd_parser()):
        assert re.search(rf"^\s+(-\w, )?{option}\b", text, re.M), option
    for section in ("SIGNALS", "EXIT STATUS", "ENVIRONMENT", "FILES", "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.M), section
    assert "NOTIFY_SOCKET" in text


def test_qmpnet_cni_man_page(docs: tuple[Path, Path]) -> None:
    page = docs[1] / "usr/share/man/man8/qmpnet-cni.8"
    assert whatis(page).startswith("qmpnet-cni - CNI plugin")
    text = man(page)
    assert text.startswith("QMPNET-CNI(8)")
    status = text.split("\nEXIT STATUS\n")[1].split("\nFILES\n")[0]
    assert [int(c) for c in re.findall(r"^ {7}(\d+) +\S", status, re.M)] == [0] + [
        int(c) for c in Code
    ]
    for command in REQUIRED_ENV:
        assert re.search(rf"^ {{7}}{command}\b", text, re.M), command
    keys = CNI.unstructure(NetConf(cni_version=LATEST, name="n"))
    for key in [*keys, "CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"]:
        assert re.search(rf"^ {{7}}{key}\b", text, re.M), key
    assert ", ".join(SUPPORTED_VERSIONS) in " ".join(text.split())


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for ``words`` (the last one being completed), as readline would ask."""
    driver = (
        'source "$1"; shift; spec=$(complete -p "$1"); fn=${spec##*-F }; fn=${fn%% *}; '
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; '
        '"$fn" "$1" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"; '
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = run(["bash", "--norc", "--noprofile", "-c", driver, "bash", str(script), *words]).stdout
    return sorted(filter(None, out.splitlines()))


@pytest.mark.parametrize("prog", ["qmpnet", "qmpnetd"])
def test_bash_completion_registers(docs: tuple[Path, Path], prog: str) -> None:
    script = docs[1] / "usr/share/bash-completion/completions" / prog
    spec = run(["bash", "--norc", "--noprofile", "-c", f'source "{script}"; complete -p {prog}'])
    assert spec.stdout.strip().endswith(f" {prog}")
    assert " -F " in spec.stdout


def test_bash_completes_qmpnet(docs: tuple[Path, Path]) -> None:
    script = docs[1] / "usr/share/bash-completion/completions/qmpnet"
    assert complete(script, "qmpnet", "") == sorted(commands(qmpnet_parser()))
    assert complete(script, "qmpnet", "add-iface", "--mo") == ["--model"]
    assert complete(script, "qmpnet", "add-iface", "--model", "") == sorted(
        ["none", "tcfilter", "macvtap", "bridged", "default"]
    )
    assert complete(script, "qmpnet", "vm", "") == ["list", "register", "unregister"]


def test_bash_completes_qmpnetd(docs: tuple[Path, Path]) -> None:
    script = docs[1] / "usr/share/bash-completion/completions/qmpnetd"
    assert complete(script, "qmpnetd", "--st") == ["--state-root", "--stop-timeout"]


def test_zsh_completion_registers(docs: tuple[Path, Path]) -> None:
    functions = docs[1] / "usr/share/zsh/site-functions"
    for path in sorted(functions.iterdir()):
        run(["zsh", "-n", str(path)])
    script = (
        f"fpath=({functions} $fpath); autoload -Uz compinit; compinit -u -D; "
        "print -r -- $_comps[qmpnet] $_comps[qmpnetd]"
    )
    assert run(["zsh", "-f", "-c", script]).stdout == "_qmpnet _qmpnetd\n"
