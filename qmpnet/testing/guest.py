"""Build the tiny guest that qmpnet's integration tests and benchmarks boot.

The guest is made from Debian packages only, so building it needs apt and nothing else
(no network beyond the archive, no root, no host kernel): the Debian kernel's ``vmlinuz``
plus the few virtio/net drivers it ships as modules, ``busybox-static`` as the whole
userland with :file:`init.sh` as ``/init``, and ``iperf3`` with the shared libraries the
dynamic loader lists for it, so that a benchmark can talk to ``iperf3 -s`` in the guest.
Only the needed files are pulled out of the packages (the kernel package alone unpacks
to ~400 MB), and busybox's own ``cpio`` packs the initramfs, because hosts often lack one.

Address convention (kept by ``init.sh`` and by the host side of every test): a NIC whose
MAC ends in the byte ``B`` (as a decimal number) gets ``169.254.B.2/24`` in the guest,
and its host-side peer is expected at ``169.254.B.1``. Link-local addresses never leave
the links a test made; NICs of one guest need distinct last MAC bytes.

Builds are cached under ``$QMPNET_GUEST_CACHE`` or ``~/.cache/qmpnet/guest``, one
directory per hash of the inputs (package versions, the init script, this builder's
version), so a new kernel or a changed ``init.sh`` rebuilds and nothing else does. A
build happens in a temporary directory that is renamed into place, under a file lock,
so concurrent test processes neither collide nor see half a guest.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import attrs

__all__ = [
    "GUEST_MODULES",
    "GuestBuildError",
    "GuestImage",
    "build_guest",
    "default_cache_dir",
    "guest_ip_for_mac",
    "host_ip_for_mac",
]

_log = logging.getLogger(__name__)

#: Bump when the layout of the built guest changes, to invalidate old cache entries.
BUILDER_VERSION = "1"

#: Kernel modules the guest loads, in dependency order (each needs the ones before it).
GUEST_MODULES = (
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)

_KERNEL_META = "linux-image-amd64"
_BUSYBOX = "busybox-static"
_IPERF = "iperf3"
#: Packages holding iperf3's shared libraries; the loader's own list checks it is complete.
_LIB_PACKAGES = ("libiperf0", "libc6", "libssl3", "libsctp1")
_LOADER = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
_MAC_RE = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", re.IGNORECASE)


class GuestBuildError(Exception):
    """The guest could not be built; ``detail`` holds the failing tool's output."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(f"{message}\n{detail}".rstrip())
        self.detail = detail


class _StaleIndexError(GuestBuildError):
    """apt does not know a package (version): its lists need an ``apt-get update``."""


@attrs.frozen(kw_only=True)
class GuestImage:
    """A built guest: what ``-kernel`` and ``-initrd`` take."""

    #: The Debian kernel image (bzImage).
    kernel: Path
    #: The gzip'ed newc initramfs with busybox, the modules, init.sh and iperf3.
    initrd: Path
    #: The kernel release, as ``uname -r`` prints it in the guest.
    kernel_version: str


def _last_mac_byte(mac: str) -> int:
    if not _MAC_RE.fullmatch(mac):
        raise ValueError(f"not a MAC address: {mac!r}")
    return int(mac.rsplit(":", 1)[1], 16)


def guest_ip_for_mac(mac: str) -> str:
    """The address the guest gives the NIC with this MAC: ``169.254.<last byte>.2``."""
    return f"169.254.{_last_mac_byte(mac)}.2"


def host_ip_for_mac(mac: str) -> str:
    """The address the guest expects on the host side of that NIC's link: ``.1``."""
    return f"169.254.{_last_mac_byte(mac)}.1"


def default_cache_dir() -> Path:
    """``$QMPNET_GUEST_CACHE``, else ``~/.cache/qmpnet/guest``."""
    env = os.environ.get("QMPNET_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qmpnet" / "guest"


def _run(args: Sequence[str | Path], *, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "LC_ALL": "C"},
        check=False,
    )
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(map(str, args))} exited with {proc.returncode}",
            detail=proc.stderr.strip(),
        )
    return proc.stdout


class _Apt:
    """apt look-ups and downloads, with at most one ``apt-get update`` per build."""

    def __init__(self) -> None:
        self.updated = False

    def update(self) -> None:
        _log.info("apt lists look stale: running apt-get update")
        self.updated = True
        _run(["apt-get", "update"])

    def kernel_package(self) -> str:
        out = self._query(["apt-cache", "depends", _KERNEL_META])
        found = re.findall(r"^\s*Depends:\s*(linux-image-\S+)$", out, re.MULTILINE)
        if not found:
            raise _StaleIndexError(f"{_KERNEL_META} names no kernel package", detail=out)
        return str(found[0])

    def candidates(self, packages: Sequence[str]) -> dict[str, str]:
        """The version ``apt-get download`` would fetch, per package (one slow call)."""
        out = self._query(["apt-cache", "policy", *packages])
        found: dict[str, str] = {}
        package = ""
        for line in out.splitlines():
            if re.fullmatch(r"\S+:", line):
                package = line[:-1]
            elif (match := re.fullmatch(r"\s+Candidate:\s*(\S+)", line)) and match[1] != "(none)":
                found[package] = match[1]
        if missing := [p for p in packages if p not in found]:
            raise _StaleIndexError(f"apt has no candidate for {missing}", detail=out)
        return found

    def download(self, pins: Sequence[tuple[str, str]], dest: Path) -> None:
        # The sandbox user cannot write into our private temp dir; we only download.
        args = ["apt-get", "-o", "APT::Sandbox::User=root", "download"]
        try:
            _run([*args, *(f"{p}={v}" for p, v in pins)], cwd=dest)
        except GuestBuildError as err:
            raise _StaleIndexError("apt-get download failed", detail=err.detail) from err

    @staticmethod
    def _query(args: list[str]) -> str:
        try:
            return _run(args)
        except GuestBuildError as err:
            raise _StaleIndexError(str(err), detail=err.detail) from err


@attrs.frozen
class _Inputs:
    """Everything the built guest depends on; its hash names the cache entry."""

    kernel_package: str
    #: (package, version) pairs, kernel first.
    pins: tuple[tuple[str, str], ...]
    init_script: str

    @property
    def key(self) -> str:
        blob = json.dumps([BUILDER_VERSION, self.pins, GUEST_MODULES, self.init_script]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _init_script() -> str:
    return resources.files(__package__ or "qmpnet.testing").joinpath("init.sh").read_text()


def _resolve_inputs(apt: _Apt) -> _Inputs:
    kernel = apt.kernel_package()
    packages = (kernel, _BUSYBOX, _IPERF, *_LIB_PACKAGES)
    versions = apt.candidates(packages)
    pins = tuple((p, versions[p]) for p in packages)
    return _Inputs(kernel_package=kernel, pins=pins, init_script=_init_script())


def _deb_for(debs: Path, package: str) -> Path:
    found = sorted(debs.glob(f"{package}_*.deb"))
    if len(found) != 1:
        raise GuestBuildError(f"expected one downloaded .deb of {package}, got {found}")
    return found[0]


def _extract(deb: Path, dest: Path, patterns: Sequence[str]) -> None:
    """Unpack only the members matching ``patterns`` (GNU tar wildcards) of ``deb``."""
    dest.mkdir(parents=True, exist_ok=True)
    with subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", str(deb)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as deb_proc:
        assert deb_proc.stdout is not None
        tar = subprocess.run(
            ["tar", "-x", "-C", str(dest), "--wildcards", *patterns],
            stdin=deb_proc.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        deb_proc.stdout.close()
        deb_err = deb_proc.communicate()[1].decode(errors="replace")
    if tar.returncode != 0 or deb_proc.returncode != 0:
        raise GuestBuildError(
            f"extracting {patterns} from {deb.name} failed",
            detail=f"{tar.stderr}{deb_err}".strip(),
        )


def _copy_into(src: Path, root: Path, guest_path: str, mode: int = 0o644) -> None:
    dest = root / guest_path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)  # follows symlinks: the guest gets plain files
    dest.chmod(mode)


def _add_iperf(debs: Path, work: Path, root: Path) -> None:
    """Put iperf3 and every library the loader resolves for it into ``root``."""
    libroot = work / "libs"
    _extract(_deb_for(debs, _IPERF), libroot, ["*/bin/iperf3"])
    for package in _LIB_PACKAGES:
        _extract(_deb_for(debs, package), libroot, ["*.so*"])
    binary = libroot / "usr/bin/iperf3"
    libdirs = [libroot / "lib/x86_64-linux-gnu", libroot / "usr/lib/x86_64-linux-gnu"]
    listing = _run(
        [
            libroot / _LOADER,
            "--library-path",
            ":".join(map(str, libdirs)),
            "--list",
            binary,
        ]
    )
    _copy_into(binary, root, "/usr/bin/iperf3", 0o755)
    for line in listing.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow:
            continue  # linux-vdso.so.1: provided by the kernel
        src = Path(rest.split(" (", 1)[0])
        if not src.is_absolute():
            src = libroot / _LOADER  # the interpreter line names the loader we ran
        if not src.exists() or not src.resolve().is_relative_to(libroot.resolve()):
            raise GuestBuildError(
                f"iperf3 needs {name}, which no package in {_LIB_PACKAGES} provides",
                detail=listing,
            )
        guest_path = name if name.startswith("/") else "/" + str(src.relative_to(libroot))
        _copy_into(src, root, guest_path, 0o755)


def _pack_initramfs(busybox: Path, root: Path, out: Path) -> None:
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        if rel != Path("."):
            names.append(str(rel))
        names.extend(str(rel / f) for f in sorted(filenames))
    proc = subprocess.run(
        [str(busybox), "cpio", "-o", "-H", "newc"],
        cwd=root,
        input="\n".join(names).encode() + b"\n",
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GuestBuildError("busybox cpio failed", detail=proc.stderr.decode(errors="replace"))
    out.write_bytes(gzip.compress(proc.stdout, compresslevel=9, mtime=0))


def _build_into(out: Path, work: Path, inputs: _Inputs, apt: _Apt) -> None:
    """Download, extract and pack the guest; write its files into ``out``."""
    debs, kx, root = work / "debs", work / "kernel", work / "root"
    for d in (debs, root, out):
        d.mkdir(parents=True)
    apt.download(inputs.pins, debs)

    module_patterns = [f"*/modules/*/{m}.ko" for m in GUEST_MODULES]
    _extract(_deb_for(debs, inputs.kernel_package), kx, ["*/boot/vmlinuz-*", *module_patterns])
    releases = [p.name for p in (kx / "lib/modules").iterdir()]
    if len(releases) != 1:
        raise GuestBuildError(f"expected one kernel release in the package, got {releases}")
    release = releases[0]
    shutil.copyfile(kx / f"boot/vmlinuz-{release}", out / "vmlinuz")

    bb = work / "busybox"
    _extract(_deb_for(debs, _BUSYBOX), bb, ["*/bin/busybox"])
    busybox = bb / "bin/busybox"

    for name in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run"):
        (root / name).mkdir(parents=True, exist_ok=True)
    _copy_into(busybox, root, "/bin/busybox", 0o755)
    (root / "bin/sh").symlink_to("busybox")
    (root / "init").write_text(inputs.init_script)
    (root / "init").chmod(0o755)
    # init.sh loads /lib/modules/*.ko in glob order: the numbers keep GUEST_MODULES' order.
    for i, module in enumerate(GUEST_MODULES):
        (src,) = kx.glob(f"lib/modules/{release}/kernel/**/{module}.ko")
        _copy_into(src, root, f"/lib/modules/{i:02d}-{module}.ko")
    _add_iperf(debs, work, root)

    _pack_initramfs(busybox, root, out / "initrd.gz")
    manifest = {"kernel_version": release, "key": inputs.key, "packages": dict(inputs.pins)}
    (out / "guest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _load(entry: Path) -> GuestImage | None:
    try:
        manifest = json.loads((entry / "guest.json").read_text())
    except FileNotFoundError:
        return None
    return GuestImage(
        kernel=entry / "vmlinuz",
        initrd=entry / "initrd.gz",
        kernel_version=str(manifest["kernel_version"]),
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_cached(cache_dir: Path, apt: _Apt) -> GuestImage:
    inputs = _resolve_inputs(apt)
    entry = cache_dir / inputs.key
    image = _load(entry)
    if image is not None:
        return image
    with _locked(cache_dir / ".lock"):
        image = _load(entry)  # another process may have built it while we waited
        if image is not None:
            return image
        for stale in cache_dir.glob(".build-*"):  # left by a build that died; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            started = time.monotonic()
            _log.info("building guest %s from %s", inputs.key, dict(inputs.pins))
            _build_into(work / "out", work, inputs, apt)
            (work / "out").rename(entry)
            _log.info("built guest %s in %.1f s", inputs.key, time.monotonic() - started)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    image = _load(entry)
    assert image is not None
    return image


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the cached guest for the current Debian packages, building it if needed.

    Blocking (it runs apt and tar): call it from a thread when inside an event loop.
    """
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    apt = _Apt()
    try:
        return _build_cached(cache, apt)
    except _StaleIndexError as err:
        _log.debug("first attempt failed: %s", err)
        apt.update()
        return _build_cached(cache, apt)


def main() -> None:
    """``python -m qmpnet.testing.guest [CACHE_DIR]``: build and print the paths."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    image = build_guest(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"kernel:         {image.kernel}")
    print(f"initrd:         {image.initrd}")
    print(f"kernel_version: {image.kernel_version}")
    print(f"took:           {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
