"""TOML configuration: which interworking model, vhost, queue count and deadlines.

Defaults are what a demanding user expects on a real host: ``tcfilter`` as the interworking
model (the documented meaning of ``default``), vhost-net when the host has it, one queue pair
per guest vCPU, and bounded waits everywhere (the unplug deadline follows libvirt's 5 s).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import attrs

from qmpnet.boundary import Boundary, load_toml, read_capped
from qmpnet.errors import InvalidInputError
from qmpnet.limits import SECONDS_MAX, check_seconds
from qmpnet.model import InterworkingModel, check_ifname, check_queues, checked_by


def check_queue_count(field: str, value: object) -> int:
    """A queue pair count, or 0: one pair per guest vCPU."""
    if type(value) is int and value == 0:
        return 0
    return check_queues(field, value)


def _seconds(default: float) -> float:
    return attrs.field(default=default, validator=checked_by(check_seconds))


@attrs.frozen(kw_only=True)
class Timeouts:
    """Deadlines in seconds; every wait on QEMU or the guest has one."""

    connect: float = _seconds(5.0)
    command: float = _seconds(10.0)
    unplug: float = _seconds(5.0)
    guest_ready: float = _seconds(30.0)


def check_announce_count(field: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= ANNOUNCE_ROUNDS_MAX:
        raise InvalidInputError(field, value, f"must be an integer from 1 to {ANNOUNCE_ROUNDS_MAX}")
    return value


def check_announce_ms(field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value <= ANNOUNCE_MS_MAX:
        raise InvalidInputError(
            field, value, f"must be an integer from 0 to {ANNOUNCE_MS_MAX} (ms)"
        )
    return value


ANNOUNCE_ROUNDS_MAX = 1000
ANNOUNCE_MS_MAX = 60_000


def _ms(default: int) -> int:
    return attrs.field(default=default, validator=checked_by(check_announce_ms))


@attrs.frozen(kw_only=True)
class Announce:
    """QEMU's ``announce-self`` for one NIC after its plug and after its link comes up: a
    RARP of its MAC per round (and the guest's own announcement where it negotiated it), so
    switches learn where it is. Defaults: QEMU's own for a migration; round *k* comes
    ``initial + k * step`` ms (at most ``max``) after the one before."""

    enabled: bool = True
    rounds: int = attrs.field(default=5, validator=checked_by(check_announce_count))
    initial: int = _ms(50)
    max: int = _ms(550)
    step: int = _ms(100)

    @max.validator
    def _check_max(self, _attr: object, value: int) -> None:
        if value < self.initial:
            raise InvalidInputError("max", value, f"must be >= initial ({self.initial})")


@attrs.frozen(kw_only=True)
class Config:
    """Settings for one driver; ``queues = 0`` means one queue pair per guest vCPU."""

    internetworking_model: InterworkingModel = InterworkingModel.DEFAULT
    disable_vhost_net: bool = False
    queues: int = attrs.field(default=0, validator=checked_by(check_queue_count))
    #: host tap name for the endpoint with index ``idx``; must stay within 15 bytes.
    tap_name: str = attrs.field(default="tap{idx}_kata")
    timeouts: Timeouts = Timeouts()
    announce: Announce = Announce()

    @tap_name.validator
    def _check_tap_name(self, _attr: object, value: str) -> None:
        if not isinstance(value, str) or "{idx}" not in value:
            raise InvalidInputError("tap_name", value, "must be a template containing {idx}")
        try:
            names = [value.format(idx=i) for i in (0, 1, 999)]
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as err:
            raise InvalidInputError("tap_name", value, f"not a valid template: {err}") from err
        if names[0] == names[1]:
            # a name that ignores the index would make the free-index search loop forever
            raise InvalidInputError("tap_name", value, "must vary with {idx}")
        check_ifname("tap_name", names[2])

    @property
    def model(self) -> InterworkingModel:
        return self.internetworking_model.resolved()

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Self:
        """Build from parsed TOML (top level or a ``[network]`` table); unknown keys are errors."""
        table = data.get("network", data)
        if table is not data:
            # keys beside [network] would be silently ignored: refuse them instead
            for key in data:
                if key != "network":
                    raise InvalidInputError(
                        "config key", key, "outside the [network] table; move it into [network]"
                    )
            if not isinstance(table, dict):
                raise InvalidInputError("network", table, "must be a table")
        return TOML.structure(table, cls)

    @classmethod
    def load(cls, path: str | Path) -> Self:
        try:
            with open(path, "rb") as fh:
                raw = read_capped(fh, "config file", str(path))
        except OSError as err:
            raise InvalidInputError("config file", str(path), err.strerror or str(err)) from err
        return cls.from_mapping(load_toml(raw, "config file", str(path)))


#: option name of each deadline (``--timeout-NAME``) -> its Timeouts field
TIMEOUT_OPTIONS = {
    "connect": "connect",
    "command": "command",
    "unplug": "unplug",
    "guest": "guest_ready",
}


def with_options(
    config: Config,
    *,
    model: str | None = None,
    no_vhost: bool = False,
    queues: int | None = None,
    timeouts: Mapping[str, float | None] | None = None,
    no_announce: bool = False,
    announce_rounds: int | None = None,
) -> Config:
    """``config`` with one request's options applied (the CLI's flags, a service request's
    params), each checked as the config file's own keys are."""
    changes: dict[str, Any] = {}
    given = {k: v for k, v in (timeouts or {}).items() if v is not None}
    for name, value in given.items():
        if name not in TIMEOUT_OPTIONS:
            valid = ", ".join(TIMEOUT_OPTIONS)
            raise InvalidInputError("timeout", name, f"valid ones are {valid}")
        check_seconds(f"timeout {name}", value)
    if given:
        changes["timeouts"] = attrs.evolve(
            config.timeouts, **{TIMEOUT_OPTIONS[k]: float(v) for k, v in given.items()}
        )
    if model:
        changes["internetworking_model"] = InterworkingModel.parse(model)
    if no_vhost:
        changes["disable_vhost_net"] = True
    if queues:
        changes["queues"] = queues
    if no_announce or announce_rounds is not None:
        announce = config.announce
        if announce_rounds is not None:
            announce = attrs.evolve(
                announce, rounds=check_announce_count("--announce-rounds", announce_rounds)
            )
        changes["announce"] = attrs.evolve(announce, enabled=announce.enabled and not no_announce)
    return attrs.evolve(config, **changes)


#: qmpnet's TOML configuration: keys as the attributes are named.
TOML = Boundary("config", mapping="a table", key_field="{} key")
TOML.register(Timeouts)
TOML.register(Announce)
TOML.register(Config)

__all__ = [
    "SECONDS_MAX",
    "Announce",
    "TOML",
    "Config",
    "Timeouts",
    "check_queue_count",
    "check_seconds",
    "with_options",
]
