"""``python -m bench [NAME ...]``: run the benches, print their tables, save their JSON.

``QMPNET_BENCH_QUICK=1`` (or ``--quick``) runs a few cycles of each, to check that the whole
run works. Nothing here asserts on time; the exit status is 1 when any bench raised.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import cost, datapath, floor, plug, scale, service, versus
from bench.harness import PREFIX, Context, sweep_links
from bench.machine import describe
from bench.stats import Report
from qmpnet.testing.guest import build_guest

#: name -> the coroutine that fills a report, in the order they run.
BENCHES: dict[str, Callable[[Context, Report], Awaitable[None]]] = {
    "plug": plug.run,
    "floor": floor.run,
    "versus": versus.run,
    "service": service.run,
    "scale": scale.run,
    "datapath": datapath.run,
    "cost": cost.run,
}
RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benches to run (default: all): {', '.join(BENCHES)}",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("QMPNET_BENCH_QUICK", "") not in ("", "0"),
        help="a few cycles each (also QMPNET_BENCH_QUICK=1)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log qmpnet at info level")
    args = p.parse_args(argv)
    if unknown := [n for n in args.names if n not in BENCHES]:
        p.error(f"unknown bench {unknown[0]!r}; known: {', '.join(BENCHES)}")
    return args


async def _main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    machine = describe()
    print("# qmpnet benchmarks" + (" (QUICK: a few cycles each)" if args.quick else ""))
    for key, value in machine.items():
        print(f"  {key}: {value}")
    image = await asyncio.to_thread(build_guest)
    print(f"  guest kernel: {image.kernel_version}")
    RESULTS.mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="qmpnet-bench-", dir="/tmp"))
    ctx = Context(image=image, workdir=workdir, quick=args.quick)
    failed = []
    try:
        for bench_name in args.names or BENCHES:
            report = Report(bench_name)
            t0 = time.monotonic()
            print(f"\n# {bench_name}", flush=True)
            try:
                await BENCHES[bench_name](ctx, report)
            except Exception as err:
                report.error = traceback.format_exc()
                report.error_line = (
                    "".join(traceback.format_exception_only(err)).strip().splitlines()[0]
                )
                failed.append(bench_name)
                print(report.error, file=sys.stderr)
            finally:
                report.seconds = time.monotonic() - t0
                machine["accel"] = ", ".join(sorted(ctx.accels)) or "none"
                saved = report.save(RESULTS, machine, args.quick)
            print(report.render())
            print(
                f"  ({report.seconds:.0f} s, accel {machine['accel']}, saved {saved})", flush=True
            )
    finally:
        left = sweep_links()
        if left:
            print(f"swept leftover links with prefix {PREFIX}: {left}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.monotonic() - started
    print(f"\n# done in {total:.0f} s; accelerator: {', '.join(sorted(ctx.accels)) or 'none'}")
    if failed:
        print(f"# FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    args = _parse(sys.argv[1:])
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())
