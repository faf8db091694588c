"""What the figures were measured on: CPUs, kernel, QEMU, libvirt, Python, memory."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from typing import Any


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    return 0.0


def describe() -> dict[str, Any]:
    """The machine, as printed at the top of the run and saved in every JSON."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "memory_gib": _mem_total_gib(),
        "qemu": _first_line(["qemu-system-x86_64", "--version"]),
        "libvirt": _first_line(["libvirtd", "--version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "python": sys.version.split()[0],
        "kvm_device": os.path.exists("/dev/kvm"),
    }
