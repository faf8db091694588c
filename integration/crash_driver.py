"""A driver process for the robustness tests, and the independent views they check with.

Run as a script, it is one qmpnet client process: it adds or removes one interface and,
with ``--kill-at STEP:PHASE``, SIGKILLs itself when the operation reaches that named step
(through a lifecycle observer, the public hook), so a test can crash it at any point. With
``--go FILE`` it waits for the file before starting, so two processes can be released at
once. It prints one JSON line: ``{"ok": true, "id": ..., "pci_path": ...}`` or the error.

Imported (the integration directory is on ``sys.path``), it gives the tests :func:`command`,
the argv that runs it; the views they check with are in :mod:`qmpnet.testing.probe`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from qmpnet.bandwidth import Bandwidth
from qmpnet.config import Config, Timeouts
from qmpnet.errors import QmpnetError
from qmpnet.lifecycle import Operation, Phase, Step
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.testing.steps import StepRecorder

HERE = Path(__file__).resolve().parent

# --- the driver process ------------------------------------------------------------------------


def _killer(step: str, phase: str) -> Any:
    def observe(op: Operation, at: Step, ph: Phase) -> None:
        if at.value == step and ph.value == phase:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return observe


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    config = Config(
        tap_name=args.tap_template,
        queues=args.queues,
        timeouts=Timeouts(unplug=args.unplug_timeout, connect=30.0),
    )
    state = NetworkState.open(args.state, args.qmp, config)
    if args.kill_at:
        state.observers.append(_killer(*args.kill_at.split(":")))
    # CLOCK_MONOTONIC is one clock for all processes: spans of two drivers compare.
    steps = StepRecorder()
    state.observers.append(steps)
    started = time.monotonic()
    if args.op == "add":
        desc = InterfaceDescription(
            name=args.name,
            hw_addr=args.mac,
            bandwidth=Bandwidth.from_libvirt(json.loads(args.bandwidth))
            if args.bandwidth
            else None,
        )
        ep = await state.add_interface(
            desc,
            model=InterworkingModel.parse(args.model),
            netns_path=args.netns,
            tap_name=args.tap_name or None,
            wait_guest=args.wait_guest,
        )
        return {
            "ok": True,
            "id": ep.id,
            "pci_path": ep.pci_path,
            "seconds": time.monotonic() - started,
            "span": list(steps.span()),
        }
    ep = await state.remove_interface(args.mac)
    return {"ok": True, "id": ep.id, "span": list(steps.span())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("op", choices=["add", "remove"])
    p.add_argument("--qmp", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--name", default="eth1")
    p.add_argument("--netns", default="")
    p.add_argument("--model", default="tcfilter")
    p.add_argument("--tap-name", default="")
    p.add_argument("--tap-template", default="tap{idx}_kata")
    p.add_argument("--queues", type=int, default=1)
    p.add_argument("--unplug-timeout", type=float, default=10.0)
    p.add_argument("--wait-guest", action="store_true")
    p.add_argument("--bandwidth", default="", help="libvirt's <bandwidth> as JSON")
    p.add_argument("--kill-at", default="", help="STEP:PHASE, e.g. device-add:done")
    p.add_argument("--go", default="", help="wait for this file before starting")
    args = p.parse_args()
    while args.go and not os.path.exists(args.go):
        time.sleep(0.002)
    try:
        result = asyncio.run(_main(args))
    except QmpnetError as err:
        result = {"ok": False, "error": str(err), "type": type(err).__name__}
    print(json.dumps(result), flush=True)


def command(*args: str) -> list[str]:
    """The argv that runs this driver with the test's interpreter."""
    return [sys.executable, str(HERE / "crash_driver.py"), *args]


if __name__ == "__main__":
    main()
