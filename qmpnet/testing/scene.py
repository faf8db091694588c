"""Host scenery for tests, the demo and the benches: run-prefixed names, netns, veths.

No pytest here (the fixtures in :mod:`qmpnet.testing.fixtures` wrap these). Every host
object made with :func:`unique` carries the run prefix :data:`RUN`, so :func:`sweep` can
remove what a crashed run left.
"""

from __future__ import annotations

import itertools
import secrets
import subprocess
import time

import attrs

from qmpnet.testing import probe

#: Unique per test run; 4 characters, so names like ``{RUN}t12`` stay within IFNAMSIZ.
RUN = "q" + secrets.token_hex(2)[:3]
_counter = itertools.count()


def unique(kind: str) -> str:
    """A host object name with the run prefix: ``q1a2t7`` (≤ 15 bytes)."""
    return f"{RUN}{kind}{next(_counter)}"


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    """Run a host tool to set something up; a failure raises (CalledProcessError)."""
    return subprocess.run(cmd, capture_output=True, text=True, check=True)


def add_netns(name: str) -> str:
    """A named netns with ``lo`` up; returns its path."""
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    return f"/run/netns/{name}"


def del_netns(name: str) -> None:
    """Remove a netns, if it is there (teardown)."""
    subprocess.run(["ip", "netns", "del", probe.ns_name(name)], capture_output=True, check=False)


def del_link(name: str, netns: str = "") -> None:
    """Remove a link, if it is there (teardown)."""
    ns = probe.ns_name(netns)
    subprocess.run(
        ["ip", *(["-n", ns] if ns else []), "link", "del", name], capture_output=True, check=False
    )


def sweep(prefix: str = RUN) -> list[str]:
    """Remove every host link and netns carrying ``prefix``; return what was found."""
    found = []
    for name in probe.links():
        if name.startswith(prefix):
            found.append(name)
            del_link(name)
    for name in probe.netns_names():
        if name.startswith(prefix):
            found.append("netns " + name)
            del_netns(name)
    return found


@attrs.frozen
class VethPair:
    """A CNI-like veth: ``inner`` in the sandbox netns, ``outer`` in a far netns."""

    sandbox: str
    inner: str
    far: str
    outer: str
    mac: str
    far_ip: str


def cni_veth(sandbox: str, far: str, mac: str) -> VethPair:
    """The veth a CNI plugin would make: ``inner`` (with ``mac``) in ``sandbox``, the far end
    in ``far`` holding ``169.254.B.1/24`` (``B`` the MAC's last byte, as the guest expects)."""
    inner, outer = unique("v"), unique("w")
    far_ip = f"169.254.{int(mac.rsplit(':', 1)[1], 16)}.1"
    sb, fr = probe.ns_name(sandbox), probe.ns_name(far)
    run("ip", "-n", sb, "link", "add", inner, "type", "veth", "peer", "name", outer)
    run("ip", "-n", sb, "link", "set", inner, "address", mac)
    run("ip", "-n", sb, "link", "set", outer, "netns", fr)
    run("ip", "-n", fr, "addr", "add", f"{far_ip}/24", "dev", outer)
    run("ip", "-n", fr, "link", "set", outer, "up")
    return VethPair(sandbox, inner, far, outer, mac, far_ip)


def make_sandbox(netns: str, name: str, mac: str, timeout: float = 30.0) -> None:
    """The link a CNI plugin leaves in the sandbox: a veth, up, its peer in the netns too;
    returns once both ends have carrier."""
    ns = probe.ns_name(netns)
    link = ["ip", "-n", ns, "link"]
    run(*link, "add", name, "type", "veth", "peer", "name", name + "p")
    run(*link, "set", name, "address", mac)
    run(*link, "set", name + "p", "up")
    run(*link, "set", name, "up")  # CNI plugins leave it up
    deadline = time.monotonic() + timeout
    while not all(
        "LOWER_UP" in probe.links(netns).get(n, {}).get("flags", []) for n in (name, name + "p")
    ):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} got no carrier within {timeout:g} s")
        time.sleep(0.01)
