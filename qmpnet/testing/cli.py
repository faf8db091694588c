"""The ``qmpnet`` console script as a user runs it, from a test's event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

#: the console script of the interpreter the tests run under (the venv's)
QMPNET = str(Path(sys.executable).with_name("qmpnet"))


async def run_qmpnet(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 180.0,
    binary: str = QMPNET,
) -> subprocess.CompletedProcess[str]:
    """``qmpnet ARGS`` in a new process, on a thread so the loop goes on; ``env`` is added to
    this process's environment; ``binary``: another front (the compiled one). Its status is the
    caller's to check."""
    return await asyncio.to_thread(
        subprocess.run,
        [binary, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
