"""Limits on values from outside that every door checks the same way (standard library only:
the thin client checks its options with them before it sends a request)."""

from __future__ import annotations

from qmpnet.errors import InvalidInputError

#: the longest deadline accepted anywhere, in seconds
SECONDS_MAX = 3600


def check_seconds(field: str, value: object) -> float:
    """A deadline: a number of seconds in (0, SECONDS_MAX]; ``true`` is not a number here."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= SECONDS_MAX
    ):
        raise InvalidInputError(field, value, f"must be a number of seconds in (0, {SECONDS_MAX}]")
    return float(value)
