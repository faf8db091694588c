"""A tiny bundled guest and a QEMU launcher, for qmpnet's integration tests and benchmarks.

Not needed at run time: :mod:`.guest` builds a busybox guest from Debian packages and
:mod:`.vm` boots it in QEMU with a serial-console reader, so tests can check what a real
guest kernel sees after a hot-plug.

The names are re-exported lazily, so that ``python -m qmpnet.testing.guest`` does not
import that module twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qmpnet.lazy import exports

if TYPE_CHECKING:
    from qmpnet.testing.guest import (
        GuestBuildError,
        GuestImage,
        build_guest,
        guest_ip_for_mac,
        host_ip_for_mac,
    )
    from qmpnet.testing.vm import GuestVM, GuestVMError, marker_fields

__all__ = [
    "GuestBuildError",
    "GuestImage",
    "GuestVM",
    "GuestVMError",
    "build_guest",
    "guest_ip_for_mac",
    "host_ip_for_mac",
    "marker_fields",
]

_HOME = {
    "GuestBuildError": "guest",
    "GuestImage": "guest",
    "build_guest": "guest",
    "guest_ip_for_mac": "guest",
    "host_ip_for_mac": "guest",
    "GuestVM": "vm",
    "GuestVMError": "vm",
    "marker_fields": "vm",
}


__getattr__, __dir__ = exports(
    __name__, {name: f"{__name__}.{home}" for name, home in _HOME.items()}, __all__
)
