"""The ``qmpnet-cni`` console script: VERSION at once, everything else by :mod:`.main`.

The package's ``__init__`` imports nothing eagerly, so this module costs the interpreter, json
and itself: VERSION answers in the time a Python process starts.
"""

from __future__ import annotations

import json
import os
import sys

from qmpnet.cni.versions import READ_MAX, version_answer


def main() -> None:
    if os.environ.get("CNI_COMMAND") == "VERSION":
        try:
            raw = sys.stdin.buffer.read(READ_MAX)
        except OSError:
            raw = b""
        sys.stdout.write(json.dumps(version_answer(raw)) + "\n")
        sys.stdout.flush()
        sys.exit(0)
    from qmpnet.cni.main import main as full

    full()
