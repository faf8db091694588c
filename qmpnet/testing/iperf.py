"""iperf3 from the host (or a netns) to the bundled guest's ``iperf3 -s``: what the receiver saw.

The guest's server takes one client at a time and may still be finishing the last one, so a
refused or failed run is tried again, up to three times. The client binds to a link when
asked (``--bind-dev``), so another link with the same subnet cannot take the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from qmpnet.testing.probe import ns_name


async def throughput(
    guest_ip: str,
    *,
    reverse: bool = False,
    seconds: int = 3,
    streams: int = 1,
    bind_dev: str = "",
    netns: str = "",
) -> float:
    """Mbit/s the receiver saw; ``reverse``: the guest sends (iperf3 ``-R``)."""
    argv = [
        *(["ip", "netns", "exec", ns_name(netns)] if netns else []),
        "iperf3",
        "-c",
        guest_ip,
        *(["--bind-dev", bind_dev] if bind_dev else []),
        "-t",
        str(seconds),
        "-O",
        "1",
        "-J",
        "-P",
        str(streams),
        "--connect-timeout",
        "5000",
        *(["-R"] if reverse else []),
    ]
    last = ""
    for _ in range(3):
        p = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await p.communicate()
        with contextlib.suppress(ValueError):
            doc = json.loads(out or b"{}")
            if p.returncode == 0 and "error" not in doc:
                return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e6
            last = str(doc.get("error", ""))
        last = last or err.decode(errors="replace").strip() or f"exit {p.returncode}"
        await asyncio.sleep(1.0)
    raise RuntimeError(f"iperf3 to {guest_ip} failed: {last}")
