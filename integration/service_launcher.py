"""qmpnetd with a crash drill: the service, killed by its own observer at a named step.

Run as a script, it runs :func:`qmpnet.service.daemon.main` with one lifecycle observer
(the public hook every VM's operations get) that signals this very process when an
operation reaches ``--kill-at STEP:PHASE`` — SIGKILL by default, or ``--signal TERM`` —
the same semantics as ``crash_driver.py``'s killer. Its own options are taken out; every
other argument is qmpnetd's. With no ``--kill-at`` it is a plain qmpnetd.

Imported (the integration directory is on ``sys.path``), it gives the tests
:func:`launcher`, the argv prefix ``ServiceProcess.start(..., launcher=...)`` takes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qmpnet.lifecycle import Operation, Phase, Step

HERE = Path(__file__).resolve().parent


def _killer(step: str, phase: str, signum: int) -> Any:
    fired = False

    def observe(op: Operation, at: Step, ph: Phase) -> None:
        nonlocal fired
        if at.value == step and ph.value == phase and not fired:
            fired = True  # SIGTERM lets the operation go on: signal once
            sys.stderr.flush()
            os.kill(os.getpid(), signum)

    return observe


def main(argv: Sequence[str] | None = None) -> int:
    from qmpnet.service.daemon import main as qmpnetd

    p = argparse.ArgumentParser(description=__doc__, add_help=False)
    p.add_argument("--kill-at", default="", help="STEP:PHASE, e.g. device-add:done")
    p.add_argument("--signal", default="KILL", help="KILL (default) or TERM")
    ours, rest = p.parse_known_args(argv)
    observers = []
    if ours.kill_at:
        step, phase = ours.kill_at.split(":")
        Step(step), Phase(phase)  # a typo fails here, not as a drill that never fires
        observers.append(_killer(step, phase, signal.Signals[f"SIG{ours.signal}"]))
    return qmpnetd(rest, observers=observers)


def launcher(*args: str) -> list[str]:
    """The argv prefix that runs this launcher (with ``args``) in the test's interpreter."""
    return [sys.executable, str(HERE / "service_launcher.py"), *args]


if __name__ == "__main__":
    sys.exit(main())
