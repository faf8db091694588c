"""The exit code classes every door shares: the CLI's exit status, the service's error codes.

Standard library only (the CLI's service mode imports it). An error's class picks its code;
a PlugError is classed by its cause.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_QEMU = 4
EXIT_HOST = 5
EXIT_TIMEOUT = 6
EXIT_UNSUPPORTED = 7
EXIT_STATE = 8
EXIT_INCOMPLETE = 9
#: the service went away mid-request, or speaks another protocol version
EXIT_SERVICE = 10
#: the VM's monitor is held by qmpnetd: a direct-mode call must go through the service
EXIT_HELD = 11
#: the service refused the caller (credentials) or this request of a group member
EXIT_DENIED = 12

EXIT_CODES_TEXT = (
    "0 ok, 1 internal, 2 usage, 3 bad input, 4 QEMU/QMP (unplug refused by the guest "
    "included), 5 host, 6 timeout (unplug pending), 7 unsupported, 8 state, "
    "9 reconcile incomplete, 10 service lost or of another protocol, "
    "11 monitor held by qmpnetd, 12 refused by qmpnetd"
)


def exit_code_for(err: BaseException) -> int:
    """The documented exit code of an error (a PlugError by its cause)."""
    from qmpnet import errors

    if isinstance(err, errors.PlugError):
        return exit_code_for(err.cause)
    if isinstance(err, errors.NetnsError) and err.errno in (
        None,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EINVAL,
        errno.ENOTTY,  # a regular file or a directory: no namespace file
    ):
        return EXIT_INPUT  # a netns path that does not exist or is not a netns: bad input
    table: list[tuple[type[BaseException], int]] = [
        (errors.MonitorHeldError, EXIT_HELD),
        (errors.DeniedError, EXIT_DENIED),
        (errors.QmpTimeoutError, EXIT_TIMEOUT),
        # the guest said no: not a deadline (waiting longer would not help), a QEMU failure
        (errors.UnplugRefusedError, EXIT_QEMU),
        (errors.InvalidInputError, EXIT_INPUT),
        (errors.UnsupportedError, EXIT_UNSUPPORTED),
        (errors.HostError, EXIT_HOST),
        (errors.QmpError, EXIT_QEMU),
        (errors.StateError, EXIT_STATE),
        (OSError, EXIT_HOST),
    ]
    for kind, code in table:
        if isinstance(err, kind):
            return code
    return EXIT_INTERNAL
