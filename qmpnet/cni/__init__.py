"""``qmpnet-cni``: a CNI plugin (spec 1.0.0 and 1.1.0) that hot-plugs a pod's NIC into its VM.

A container runtime runs this program once per operation, with ``CNI_*`` environment
variables and the network configuration as JSON on stdin. It answers on stdout with a result,
or with the spec's error object (``cniVersion``, ``code``, ``msg``, ``details``) and a
non-zero exit status. Nothing else ever reaches stdout; logs go to stderr only with
``QMPNET_CNI_DEBUG=1``, and to ``logFile`` when the configuration names one.

Two modes, chosen by ``model``:

- **chained** (``tcfilter``, the default, ``macvtap`` or ``bridged``): after a main plugin
  (``bridge`` + ``host-local``, say) made the pod's veth ``CNI_IFNAME`` in ``CNI_NETNS``, ADD
  joins it to a new tap in that netns and hot-plugs a virtio-net NIC carrying the veth's MAC.
  The result is ``prevResult`` passed on, with an interface entry for ``CNI_IFNAME``
  (``sandbox`` = ``CNI_NETNS``) added when the main plugin gave none.
- **main** (``none``): ADD creates a tap named ``CNI_IFNAME`` in ``CNI_NETNS`` itself and
  hot-plugs it. Addresses come from the IPAM plugin ``ipam.type`` found in ``CNI_PATH`` and are
  reported in the result for the guest; the tap gets none, since the guest owns them.

Network configuration, besides ``cniVersion``, ``name`` and ``type``::

    qmpSocket     the VM's QMP monitor; "{containerId}" is replaced. runtimeConfig.qmpSocket,
                  then CNI_ARGS QMPNET_QMP=PATH, take precedence.
    stateDir      the VM's qmpnet state directory; must contain "{containerId}"
                  (default /run/qmpnet/cni/{containerId})
    model         tcfilter | macvtap | bridged | none            (default tcfilter)
    queues        queue pairs                                     (default one per guest vCPU)
    disableVhost  never use vhost-net                             (default false)
    waitGuest     answer ADD only once the guest driver has the NIC (default false)
    timeouts      {"connect", "command", "unplug", "guestReady"} in seconds
    mac, mtu      main mode: the NIC's MAC (also runtimeConfig.mac or CNI_ARGS MAC=) and MTU
    ipam          main mode: the delegated IPAM plugin's configuration
    allowHostNetns  main mode: CNI_NETNS may be the plugin's own (the host's) netns (default
                  false); chained mode never joins a link of the host's netns (error 4)
    logFile       append logs to this file

Capabilities (``runtimeConfig``): ``qmpSocket``, ``mac`` and ``bandwidth``, CNI's standard
``{"ingressRate", "ingressBurst", "egressRate", "egressBurst"}`` in bits/s and bits. Ingress is
into the pod, which is the VM: what the guest receives. The NIC is shaped on the host link QEMU
reads, as ``qmpnet set-bandwidth`` does; a rate of 0 or absent leaves that direction unshaped.

Each attachment (network, container, ifname) is recorded next to the VM's qmpnet state before
it is plugged, so DEL, CHECK and GC find exactly what this network made, and nothing else.

Error codes: the spec's well-known codes (see :class:`Code`), and from 100 qmpnet's own::

    100 QEMU failed a command or cannot be reached     104 CHECK found the attachment broken
    101 a host kernel operation failed (netlink, tun)  105 CNI_IFNAME is not in CNI_NETNS
    102 qmpnet cannot do this (endpoint type, model)   106 the attachment exists already
    103 the IPAM plugin could not be run or answered   199 internal error (a bug in qmpnet)
        nonsense (its own error JSON is passed on as is, code included)

:class:`CniError` joins qmpnet's error tree under ``QmpnetError``; every other qmpnet error is
mapped onto a code by :func:`to_cni_error`.

The names below are imported on first use (PEP 562): the console script's VERSION path
(:mod:`.entry`) must not pay for the plugin's netlink and QMP machinery.
"""

from __future__ import annotations

from qmpnet.lazy import exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qmpnet.cni.commands import COMMANDS, state_dirs
    from qmpnet.cni.main import main, run
    from qmpnet.cni.records import Attachment, Book, Records
    from qmpnet.cni.request import Env, NetConf, Request, parse_cni_args
    from qmpnet.cni.results import chained_result, ips_of, main_result
    from qmpnet.cni.spec import (
        GC_KEYS,
        LATEST,
        LOCK_FILE,
        SUPPORTED_VERSIONS,
        CniError,
        Code,
        to_cni_error,
    )

#: each exported name -> the submodule that defines it
_HOME = {
    "Attachment": "records",
    "Book": "records",
    "COMMANDS": "commands",
    "CniError": "spec",
    "Code": "spec",
    "Env": "request",
    "GC_KEYS": "spec",
    "LATEST": "spec",
    "LOCK_FILE": "spec",
    "NetConf": "request",
    "Records": "records",
    "Request": "request",
    "SUPPORTED_VERSIONS": "spec",
    "chained_result": "results",
    "ips_of": "results",
    "main": "main",
    "main_result": "results",
    "parse_cni_args": "request",
    "run": "main",
    "state_dirs": "commands",
    "to_cni_error": "spec",
}

__all__ = [
    "COMMANDS",
    "GC_KEYS",
    "LATEST",
    "LOCK_FILE",
    "SUPPORTED_VERSIONS",
    "Attachment",
    "Book",
    "CniError",
    "Code",
    "Env",
    "NetConf",
    "Records",
    "Request",
    "chained_result",
    "ips_of",
    "main",
    "main_result",
    "parse_cni_args",
    "run",
    "state_dirs",
    "to_cni_error",
]


__getattr__, __dir__ = exports(
    __name__, {name: f"{__name__}.{home}" for name, home in _HOME.items()}, __all__
)
