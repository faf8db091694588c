"""Write the man pages: qmpnet(1) and qmpnetd(8) from their argparse parsers (argparse-manpage),
qmpnet-cni(8) from the plugin's own tables (its CNI_* variables, configuration keys and
error codes), so that none of them repeats by hand what the code decides.

    python contrib/docs/manpages.py OUTDIR

A table below that misses a name the code has (or names one it no longer has) stops the
build: the pages cannot drift from the code silently.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from argparse_manpage.compat import get_reproducible_date
from argparse_manpage.manpage import Manpage

from qmpnet import cli, layout
from qmpnet.cli import build_parser as qmpnet_parser
from qmpnet.cni import versions
from qmpnet.cni.request import CNI, REQUIRED_ENV, NetConf
from qmpnet.cni.spec import (
    ARG_MAC,
    ARG_QMP,
    ATTACHMENTS_FILE,
    DEBUG_ENV,
    DEFAULT_STATE_DIR,
    GC_KEYS,
    LOCK_FILE,
    Code,
)
from qmpnet.exits import EXIT_CODES_TEXT
from qmpnet.service import daemon, protocol
from qmpnet.service.daemon import build_parser as qmpnetd_parser
from qmpnet.service.methods import package_version

MANUAL = "qmpnet manual"


class DocsDriftError(Exception):
    """A table here no longer matches the names the code has."""


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in text.splitlines())


def tagged(items: Iterable[tuple[str, str]], bold: bool = True) -> str:
    """A ``.TP`` list: each tag (bold) with its indented paragraph."""
    font = "\\fB{}\\fR" if bold else "{}"
    return "\n".join(f".TP\n{font.format(roff(tag))}\n{roff(body)}" for tag, body in items)


def _same_names(what: str, documented: Iterable[str], actual: Iterable[str]) -> None:
    missing, stale = set(actual) - set(documented), set(documented) - set(actual)
    if missing or stale:
        raise DocsDriftError(
            f"{what}: undocumented {sorted(missing)}, documented but gone {sorted(stale)}"
        )


def exit_codes() -> list[tuple[str, str]]:
    """qmpnet's exit codes, from the text its own ``--help`` prints."""
    return re.findall(r"(\d+) (.+?)(?:, (?=\d+ )|$)", EXIT_CODES_TEXT)


# --- qmpnet(1) and qmpnetd(8): argparse-manpage, plus what a parser cannot say ------------

QMPNET_ENVIRONMENT = {
    "QMPNET_SOCKET": "qmpnetd's socket when --socket is not given "
    f"(default {protocol.DEFAULT_SOCKET}); the command uses the service when it exists.",
    "QMPNET_STATE_ROOT": "where VM state directories live in the direct mode when --state-root "
    f"is not given (default {layout.DEFAULT_ROOT}).",
    "QMPNET_STATE_DIR": "a VM's state directory when --state is not given "
    "(default STATE_ROOT/vm-<hash of the QMP socket's path>).",
}

QMPNETD_ENVIRONMENT = {
    "LISTEN_FDS, LISTEN_PID": "socket activation: with LISTEN_FDS=1 and LISTEN_PID its own pid, "
    "qmpnetd takes fd 3 over as its listening socket (it must be a listening AF_UNIX stream "
    "socket, else exit 3) and leaves the socket file to systemd; both are unset then.",
    "NOTIFY_SOCKET": "readiness: STATUS= while the start-up reconcile runs, READY=1 after it, "
    "STOPPING=1 on SIGTERM.",
}


def _described(page: Manpage, parser: argparse.ArgumentParser, doc: str | None) -> None:
    """DESCRIPTION: the parser's own, then the second paragraph of the module's docstring."""
    paragraph = (doc or "").split("\n\n")[1]
    text = " ".join(re.sub(r"(?::\w+:)?`+([^`]+)`+", r"\1", paragraph).split())
    page.add_section("description", "=", f"{roff(parser.description or '')}\n.PP\n{roff(text)}")
    parser.description = None  # said above


def qmpnet_page() -> str:
    parser = qmpnet_parser()
    parser.epilog = None  # the exit codes it lists get a section of their own
    page = Manpage(parser)
    page.section = 1
    page.manual = MANUAL
    page.source = f"qmpnet {package_version()}"
    page.description = "hot-plug network interfaces into running QEMU virtual machines"
    _described(page, parser, cli.__doc__)
    page.add_section("exit status", "=", tagged(exit_codes()))
    page.add_section("environment", "=", tagged(QMPNET_ENVIRONMENT.items()))
    page.add_section(
        "files",
        "=",
        tagged(
            [
                (protocol.DEFAULT_SOCKET, "qmpnetd's socket, by default."),
                (
                    f"{layout.DEFAULT_ROOT}/vm-*/",
                    "a VM's state directory (0700): its interfaces, journal and mark key; "
                    "the same in the direct mode and under qmpnetd.",
                ),
            ]
        ),
    )
    page.add_section("see also", "=", "\\fBqmpnetd\\fR(8), \\fBqmpnet\\-cni\\fR(8)")
    return str(page)


def qmpnetd_page() -> str:
    parser = qmpnetd_parser()
    page = Manpage(parser)
    page.section = 8
    page.manual = MANUAL
    page.source = f"qmpnet {package_version()}"
    page.description = "qmpnet's node service: hot-plug NICs for every VM of the node"
    _described(page, parser, daemon.__doc__)
    page.add_section(
        "signals",
        "=",
        tagged(
            [
                (
                    "SIGTERM, SIGINT",
                    "stop accepting, let the requests in flight finish or undo themselves "
                    "(at most --stop-timeout), stop the watches (their NICs stay plugged), "
                    "close the sessions and exit 0.",
                )
            ]
        ),
    )
    page.add_section(
        "exit status",
        "=",
        roff(
            "0 after a clean stop; 3 for a group that does not exist or a socket handed over "
            "that is not a listening unix stream socket; 5 when the metrics address cannot "
            "be bound; 7 for --metrics-listen without prometheus-client; otherwise the exit "
            "code of the error, as in qmpnet(1)."
        ),
    )
    page.add_section("environment", "=", tagged(QMPNETD_ENVIRONMENT.items()))
    page.add_section(
        "files",
        "=",
        tagged(
            [
                (protocol.DEFAULT_SOCKET, "the socket, by default (0600; 0660 with --group)."),
                (f"{layout.DEFAULT_ROOT}/vm-*/", "each VM's state directory."),
                (f"{layout.DEFAULT_ROOT}/{layout.REGISTRY_FILE}", "the registered VMs."),
                (f"{layout.DEFAULT_ROOT}/{layout.HELD_DIR}/", "the monitors the service holds."),
            ]
        ),
    )
    page.add_section("see also", "=", "\\fBqmpnet\\fR(1), \\fBqmpnet\\-cni\\fR(8)")
    return str(page)


# --- qmpnet-cni(8): no argv, so a description of its own ----------------------------------

CNI_ENVIRONMENT = {
    "CNI_COMMAND": "one of " + ", ".join(REQUIRED_ENV) + " (see COMMANDS). VERSION is answered "
    "before any other variable is read.",
    "CNI_CONTAINERID": "the container (pod) id: letters, digits, '_', '.' or '-'.",
    "CNI_NETNS": "the pod's network namespace, an absolute path. The plugin's own (the host's) "
    "namespace is refused with code 4 unless allowHostNetns is set in main mode.",
    "CNI_IFNAME": "the interface name in CNI_NETNS.",
    "CNI_ARGS": f"KEY=VALUE pairs separated by ';': {ARG_QMP}=PATH names the VM's QMP socket, "
    f"{ARG_MAC}=MAC the NIC's MAC in main mode; other keys are ignored.",
    "CNI_PATH": "where IPAM plugins are looked for (main mode), ':'-separated.",
}

CNI_EXTRA_ENVIRONMENT = {
    DEBUG_ENV: "1: log to stderr, with tracebacks; stdout still carries only the answer.",
}

#: the configuration keys on stdin (besides ``type``), by their JSON names
CNI_KEYS = {
    "cniVersion": "the spec version of the configuration; this plugin speaks "
    + ", ".join(versions.SUPPORTED_VERSIONS)
    + ".",
    "name": "the network's name.",
    "qmpSocket": "the VM's QMP monitor socket; {containerId} is replaced. "
    "runtimeConfig.qmpSocket, then CNI_ARGS QMPNET_QMP=PATH, take precedence.",
    "stateDir": "the VM's qmpnet state directory; must contain {containerId} exactly once.",
    "model": "tcfilter, macvtap, bridged (chained after a main plugin) or none (main mode: "
    "the plugin makes the tap and delegates IPAM).",
    "queues": "queue pairs; 0 is one per guest vCPU.",
    "disableVhost": "never use vhost-net.",
    "waitGuest": "answer ADD only once the guest driver has the NIC.",
    "allowHostNetns": "main mode only: CNI_NETNS may be the plugin's own (the host's) netns.",
    "timeouts": "deadlines in seconds: connect, command, unplug, guestReady.",
    "mac": "main mode: the NIC's MAC (runtimeConfig.mac and CNI_ARGS MAC= take precedence).",
    "mtu": "main mode: the tap's MTU.",
    "logFile": "append logs to this file.",
    "qmpnetd": "qmpnetd's socket: when it is there the invocation is forwarded to the service, "
    'which keeps an ADD whose VM is not there pending; "" always works in the plugin\'s process.',
    "ipam": "main mode: the delegated IPAM plugin's configuration (ipam.type names it).",
    "dns": "passed on in main mode's result.",
    "prevResult": "the previous plugin's result (chained mode); passed on with an interface "
    "entry for CNI_IFNAME.",
    "runtimeConfig": "capability arguments from the runtime: qmpSocket, mac and bandwidth "
    "(ingressRate, ingressBurst, egressRate, egressBurst in bits/s and bits; ingress is "
    "what the guest receives).",
}

CNI_GC_KEYS = "GC: the attachments to keep; every other attachment of this network is removed."

CNI_CODES = {
    Code.INCOMPATIBLE_VERSION: "cniVersion is not one the plugin speaks, or too old for the "
    "command (CHECK needs 0.4.0, STATUS and GC 1.1.0).",
    Code.UNSUPPORTED_FIELD: "the spec's code for an unsupported configuration field; "
    "qmpnet-cni reports a bad value as 7 and a request it cannot do as 102.",
    Code.UNKNOWN_CONTAINER: "CNI_NETNS cannot be entered.",
    Code.INVALID_ENV: "a CNI_* variable is missing or malformed, or CNI_NETNS is the host's "
    "own namespace.",
    Code.IO_FAILURE: "stdin cannot be read, or the state directory cannot be read or written.",
    Code.DECODE: "stdin is not a JSON object (not UTF-8, over 1 MiB or nested over 32 levels "
    "included).",
    Code.INVALID_CONFIG: "a configuration key has a bad value (the key and value are named).",
    Code.TRY_AGAIN: "the QMP monitor is busy, a deadline passed, another qmpnet-cni holds the "
    "VM's lock, or a cleanup is not finished: the runtime should retry.",
    Code.NOT_AVAILABLE: "STATUS: taps cannot be made (no /dev/net/tun) or the IPAM plugin is "
    "not ready.",
    Code.QEMU: "QEMU failed a command or cannot be reached.",
    Code.HOST: "a host kernel operation failed (netlink, tun).",
    Code.UNSUPPORTED: "qmpnet cannot do this (endpoint type, model).",
    Code.IPAM: "the IPAM plugin could not be run or answered nonsense (its own error is "
    "passed on as it is, code included).",
    Code.CHECK_FAILED: "CHECK found the attachment broken.",
    Code.NO_INTERFACE: "CNI_IFNAME is not in CNI_NETNS.",
    Code.ATTACHMENT_EXISTS: "the attachment exists already.",
    Code.CHECK_PENDING: "CHECK: the attachment is pending in qmpnetd, its VM is not there yet.",
    Code.CHECK_PLUG_FAILED: "CHECK: the pending attachment's plug failed (DEL clears it).",
    Code.INTERNAL: "internal error: a bug in qmpnet-cni (QMPNET_CNI_DEBUG=1 shows the traceback).",
}


def _config_keys() -> list[tuple[str, str]]:
    """(key, description with its default) for every key the configuration is read with."""
    defaults = CNI.unstructure(NetConf(cni_version=versions.LATEST, name="n"))
    _same_names("qmpnet-cni configuration keys", CNI_KEYS, defaults)
    out = []
    for key, text in CNI_KEYS.items():
        default = defaults[key]
        if key in ("cniVersion", "name") or default in (None, "", {}):
            out.append((key, text))
        elif isinstance(default, Mapping):
            shown = ", ".join(f"{k} {v:g}" for k, v in default.items())
            out.append((key, f"{text} Default: {shown}."))
        else:
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            out.append((key, f"{text} Default: {shown}."))
    return out


def _section(name: str, body: str) -> str:
    return f".SH {name.upper()}\n{body}"


def cni_page() -> str:
    read = {"CNI_COMMAND", "CNI_ARGS", "CNI_PATH"}.union(*REQUIRED_ENV.values())
    _same_names("CNI_* variables", CNI_ENVIRONMENT, read)
    _same_names("CNI codes", [c.name for c in CNI_CODES], [c.name for c in Code])
    required = [
        (command, ("needs " + ", ".join(names)) if names else "needs no other variable")
        for command, names in REQUIRED_ENV.items()
    ]
    source = f"qmpnet {roff(package_version())}"
    header = (
        f'.TH QMPNET\\-CNI 8 "{get_reproducible_date()}" "{source}" "{MANUAL}"\n'
        ".SH NAME\n"
        "qmpnet\\-cni \\- CNI plugin that hot\\-plugs a pod's interface into the pod's VM over QMP"
    )
    synopsis = (
        "\\fBCNI_COMMAND\\fR=\\fIcommand\\fR \\fBCNI_CONTAINERID\\fR=\\fIid\\fR "
        "\\fBCNI_NETNS\\fR=\\fIpath\\fR \\fBCNI_IFNAME\\fR=\\fIname\\fR "
        "[\\fBCNI_ARGS\\fR=\\fIargs\\fR] [\\fBCNI_PATH\\fR=\\fIdirs\\fR] "
        "\\fBqmpnet\\-cni\\fR < \\fIconfig.json\\fR"
    )
    description = "\n.PP\n".join(
        roff(p)
        for p in (
            "A container runtime runs qmpnet-cni once per operation, with CNI_* environment "
            "variables and the network configuration as JSON on stdin. It answers on stdout "
            "with a result, or with the spec's error object (cniVersion, code, msg, details) "
            "and exit status 1. Nothing else reaches stdout.",
            "Chained (model tcfilter, macvtap or bridged): after a main plugin made the pod's "
            "veth CNI_IFNAME in CNI_NETNS, ADD joins it to a new tap and hot-plugs a "
            "virtio-net NIC carrying the veth's MAC into the VM, and passes prevResult on. "
            "Main (model none): ADD makes a tap named CNI_IFNAME in CNI_NETNS itself, "
            "hot-plugs it, and delegates addresses to the IPAM plugin ipam.type.",
            "DEL is idempotent (also when the VM, netns or state is already gone); CHECK "
            "verifies that QEMU still has the device with the right MAC; VERSION, STATUS "
            "and GC follow CNI 1.1. ADD, CHECK, DEL and GC work in qmpnet's direct mode, "
            "in the plugin's process.",
        )
    )
    commands = tagged(required)
    configuration = (
        roff("A JSON object; besides type (the plugin's name), the keys read are:")
        + "\n"
        + tagged(_config_keys())
        + "\n"
        + tagged([(" or ".join(GC_KEYS), CNI_GC_KEYS)])
        + "\n.PP\n"
        + roff("Keys the plugin does not know are the runtime's, and ignored.")
    )
    status = (
        roff(
            "0 on success (the result, if any, on stdout); 1 on failure, with the error "
            "object on stdout. Its code is one of:"
        )
        + "\n"
        + tagged(((f"{int(code)}", text) for code, text in CNI_CODES.items()), bold=False)
    )
    environment = tagged({**CNI_ENVIRONMENT, **CNI_EXTRA_ENVIRONMENT}.items())
    files = tagged(
        [
            (
                DEFAULT_STATE_DIR,
                "the default stateDir: the VM's qmpnet state (see qmpnet list-ifaces "
                f"--state), {ATTACHMENTS_FILE} (the attachments this plugin made) and "
                f"{LOCK_FILE}.",
            )
        ]
    )
    return (
        "\n".join(
            [
                header,
                _section("synopsis", synopsis),
                _section("description", description),
                _section("commands", commands),
                _section("environment", environment),
                _section("configuration", configuration),
                _section("exit status", status),
                _section("files", files),
                _section("see also", "\\fBqmpnet\\fR(1), \\fBqmpnetd\\fR(8)"),
            ]
        )
        + "\n"
    )


PAGES = {"qmpnet.1": qmpnet_page, "qmpnetd.8": qmpnetd_page, "qmpnet-cni.8": cni_page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write qmpnet's man pages into OUTDIR")
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    args.outdir.mkdir(parents=True, exist_ok=True)
    for name, make in PAGES.items():
        (args.outdir / name).write_text(make())
    return 0


if __name__ == "__main__":
    sys.exit(main())
