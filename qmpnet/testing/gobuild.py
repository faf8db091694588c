"""Go programs the tests build offline with Debian's ``golang-go``, once per content.

A build lands in ``cache/<sha256 prefix>/<name>``, the prefix hashing the source, the build's
flags and its environment, and is reused until one of them changes; Go's own build cache sits
next to it, so the first build of a run pays for the standard library once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: the compiled CNI front, and the Python plugin it runs when no service takes a call
CHECKOUT = Path(__file__).resolve().parents[2]
SHIM_SOURCE = CHECKOUT / "contrib" / "cni-shim" / "main.go"
#: the compiled qmpnet front, and the Python qmpnet it runs for what the service does not take
CLI_SOURCE = CHECKOUT / "contrib" / "cli-shim" / "main.go"
PYTHON_CLI = Path(sys.executable).with_name("qmpnet")
#: where the tests keep their builds (and Go's build cache): inside the venv, so `make clean`
#: drops them with it
CACHE = CHECKOUT / ".venv" / "cache" / "go"
#: the Python plugin the compiled front runs in the direct mode: this venv's console script
PYTHON_PLUGIN = Path(sys.executable).with_name("qmpnet-cni")


def go_build(
    source: Path,
    cache: Path,
    name: str,
    *,
    env: dict[str, str] | None = None,
    ldflags: str = "",
) -> Path:
    """``go build`` of one file (no modules, nothing downloaded); the binary's path."""
    go = shutil.which("go")
    assert go, "go is missing: make setup installs golang-go"
    extra = {"GO111MODULE": "off", "GOFLAGS": "", **(env or {})}
    key = source.read_bytes() + repr((ldflags, sorted(extra.items()))).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    binary = cache / digest / name
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    built = subprocess.run(
        [go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(partial), str(source)],
        env={**os.environ, **extra, "GOCACHE": str(cache / "go-build")},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert built.returncode == 0, f"go build of {source} failed:\n{built.stderr}"
    partial.rename(binary)
    for stale in cache.iterdir():  # earlier builds of this name
        if stale.name not in (digest, "go-build") and (stale / name).exists():
            shutil.rmtree(stale)
    return binary


def cni_shim(cache: Path = CACHE, full_plugin: Path = PYTHON_PLUGIN) -> Path:
    """The compiled ``qmpnet-cni`` front, built as ``make cni-shim`` builds it."""
    return go_build(
        SHIM_SOURCE, cache, "qmpnet-cni", ldflags=f"-s -w -X main.fullPlugin={full_plugin}"
    )


def cli_shim(cache: Path = CACHE, full_cli: Path = PYTHON_CLI, name: str = "qmpnet") -> Path:
    """The compiled ``qmpnet`` front, built as ``make cli-shim`` builds it (``name``: one
    build per name is kept, so a test's variant does not replace the others)."""
    return go_build(CLI_SOURCE, cache, name, ldflags=f"-s -w -X main.fullCli={full_cli}")
