"""A NIC's bandwidth: what is shaped, in bytes, read from the three ways callers say it.

Kept in bytes per second and bytes, so every spelling converts to it without loss of meaning:

- libvirt's ``<bandwidth>`` terms (``--bandwidth``, ``--inbound``/``--outbound``, the interface
  JSON's ``bandwidth``): ``average`` and ``peak`` in kB/s, ``burst`` in kB, as libvirt hands
  them to tc: a kB/s is 1000 bytes per second (tc's ``kbps``), a kB is 1024 bytes (tc's
  ``kb``). ``inbound`` is what the guest receives, ``outbound`` what it sends.
- CNI's ``bandwidth`` capability (``runtimeConfig.bandwidth``): ``ingressRate`` and
  ``egressRate`` in bits per second, ``ingressBurst``/``egressBurst`` in bits. Ingress is
  into the pod, which is the VM: the guest's inbound.

A direction without a rate is not shaped. Zero, negative and absurd values (beyond
:data:`RATE_MAX`, a burst longer than :data:`BURST_SECONDS_MAX` at the rate) are refused with
the field as the caller spelled it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import attrs

from qmpnet.boundary import load_json
from qmpnet.errors import InvalidInputError

#: bytes per second in libvirt's kB/s (tc's ``kbps``), and bytes in its kB (tc's ``kb``)
KBPS = 1000
KB = 1024
#: the slowest rate shaped: 1 kB/s (8 kbit/s), libvirt's smallest
RATE_MIN = KBPS
#: the fastest: 100 Gbit/s; more is no limit on a tap, and a typo more likely than a wish
RATE_MAX = 12_500_000_000
#: the longest burst, in seconds of traffic at its rate (htb keeps it as a 32-bit tick count)
BURST_SECONDS_MAX = 60
#: the burst when none is given: 10 ms of the rate, and never under two full frames
DEFAULT_BURST_SECONDS = 0.01
DEFAULT_BURST_MIN = 2 * 1514


@attrs.frozen(kw_only=True)
class Rate:
    """One direction: ``average`` and ``peak`` in bytes/s, ``burst`` in bytes (0: default)."""

    average: int
    #: the rate bursts may reach (htb's ceil); 0 means the average
    peak: int = 0
    burst: int = 0

    @property
    def ceil(self) -> int:
        return self.peak or self.average

    @property
    def buffer(self) -> int:
        """The burst in force: as given, else :data:`DEFAULT_BURST_SECONDS` of the rate."""
        return self.burst or max(int(self.average * DEFAULT_BURST_SECONDS), DEFAULT_BURST_MIN)

    def libvirt(self) -> dict[str, float | int]:
        """libvirt's terms (kB/s, kB), integers where exact."""
        out: dict[str, float | int] = {"average": _in(self.average, KBPS)}
        if self.peak:
            out["peak"] = _in(self.peak, KBPS)
        if self.burst:
            out["burst"] = _in(self.burst, KB)
        return out


@attrs.frozen(kw_only=True)
class Bandwidth:
    """What a NIC's traffic is shaped to: the guest's inbound and outbound, each optional."""

    inbound: Rate | None = None
    outbound: Rate | None = None

    def __bool__(self) -> bool:
        return self.inbound is not None or self.outbound is not None

    @classmethod
    def from_libvirt(cls, data: object, field: str = "bandwidth") -> Self:
        """``{"inbound": {"average": kB/s, "peak": kB/s, "burst": kB}, "outbound": ...}``."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(field, data, "must be an object")
        _known(data, field, ("inbound", "outbound"))
        rates = {}
        for way in ("inbound", "outbound"):
            item = data.get(way)
            if item is None:
                continue
            where = f"{field}.{way}"
            if not isinstance(item, Mapping):
                raise InvalidInputError(where, item, "must be an object")
            _known(item, where, ("average", "peak", "burst"))
            if "average" not in item:
                raise InvalidInputError(f"{where}.average", None, f"missing from {where}")
            names = (f"{where}.average", f"{where}.peak", f"{where}.burst")
            rates[way] = rate(
                names,
                _count(names[0], item["average"]) * KBPS,
                _count(names[1], item.get("peak", 0), zero=True) * KBPS,
                _count(names[2], item.get("burst", 0), zero=True) * KB,
            )
        return cls(**rates)

    @classmethod
    def from_cni(cls, data: object, field: str = "runtimeConfig.bandwidth") -> Self:
        """CNI's capability: ``ingressRate``/``egressRate`` bits/s, ``*Burst`` bits; a
        direction whose rate is absent or 0 is not shaped (its burst must then be too)."""
        if not isinstance(data, Mapping):
            raise InvalidInputError(field, data, "must be an object")
        keys = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")
        _known(data, field, keys)
        rates = {}
        for way, prefix in (("inbound", "ingress"), ("outbound", "egress")):
            bits = _count(f"{field}.{prefix}Rate", data.get(f"{prefix}Rate", 0), zero=True)
            burst = _count(f"{field}.{prefix}Burst", data.get(f"{prefix}Burst", 0), zero=True)
            if not bits:
                if burst:
                    raise InvalidInputError(
                        f"{field}.{prefix}Burst", burst, f"given without {prefix}Rate"
                    )
                continue
            names = (f"{field}.{prefix}Rate", "", f"{field}.{prefix}Burst")
            rates[way] = rate(names, bits // 8, 0, burst // 8, CNI)
        return cls(**rates)

    def libvirt(self) -> dict[str, dict[str, float | int]]:
        """libvirt's terms, for output: only the shaped directions."""
        return {
            way: r.libvirt()
            for way, r in (("inbound", self.inbound), ("outbound", self.outbound))
            if r is not None
        }


def saved(bandwidth: Bandwidth) -> dict[str, dict[str, int]]:
    """The state file's form: bytes, exactly (the spellings' rounding stays out of it)."""
    return {
        way: attrs.asdict(r)
        for way, r in (("inbound", bandwidth.inbound), ("outbound", bandwidth.outbound))
        if r is not None
    }


def load_saved(data: object) -> Bandwidth:
    """:func:`saved`'s form back; anything else is an ``InvalidInputError``."""
    if not isinstance(data, Mapping):
        raise InvalidInputError("bandwidth", data, "must be an object")
    _known(data, "bandwidth", ("inbound", "outbound"))
    rates = {}
    for way, item in data.items():
        if not isinstance(item, Mapping) or set(item) != {"average", "peak", "burst"}:
            raise InvalidInputError(f"bandwidth.{way}", item, "not a saved rate")
        names = (f"bandwidth.{way}.average", f"bandwidth.{way}.peak", f"bandwidth.{way}.burst")
        average, peak, burst = (_count(n, item[n.rsplit(".", 1)[1]], zero=True) for n in names)
        rates[way] = rate(names, average, peak, burst, BYTES)
    return Bandwidth(**rates)


def from_options(bandwidth: str = "", inbound: str = "", outbound: str = "") -> Bandwidth | None:
    """The command line's: ``--bandwidth`` (libvirt's terms as JSON) or ``--inbound`` and
    ``--outbound`` (virsh's ``AVERAGE[,PEAK[,BURST]]``); None when none is given."""
    if bandwidth and (inbound or outbound):
        raise InvalidInputError(
            "--bandwidth", bandwidth, "give it or --inbound/--outbound, not both"
        )
    if bandwidth:
        return Bandwidth.from_libvirt(
            load_json(bandwidth.encode("utf-8", "surrogateescape"), "--bandwidth", "--bandwidth"),
            "--bandwidth",
        )
    if not (inbound or outbound):
        return None
    return Bandwidth(
        inbound=parse_virsh("--inbound", inbound) if inbound else None,
        outbound=parse_virsh("--outbound", outbound) if outbound else None,
    )


def parse_virsh(field: str, text: str) -> Rate:
    """``AVERAGE[,PEAK[,BURST]]`` in kB/s and kB, as ``virsh domiftune --inbound`` takes it."""
    parts = text.split(",")
    if not 1 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
        raise InvalidInputError(
            field, text, "must be AVERAGE[,PEAK[,BURST]]: positive integers, kB/s and kB"
        )
    numbers = [int(p) for p in parts] + [0] * (3 - len(parts))
    names = (f"{field} average", f"{field} peak", f"{field} burst")
    return rate(names, numbers[0] * KBPS, numbers[1] * KBPS, numbers[2] * KB)


@attrs.frozen
class Units:
    """How a caller spells rates and sizes: bytes per unit, and the unit's name."""

    per_s: float
    per_s_name: str
    size: float
    size_name: str

    def rate(self, value: int) -> float | int:
        return _in(value, self.per_s)

    def sized(self, value: int) -> float | int:
        return _in(value, self.size)


LIBVIRT = Units(KBPS, "kB/s", KB, "kB")
CNI = Units(1 / 8, "bits/s", 1 / 8, "bits")
BYTES = Units(1, "bytes/s", 1, "bytes")


def rate(
    fields: tuple[str, str, str], average: int, peak: int, burst: int, units: Units = LIBVIRT
) -> Rate:
    """A checked :class:`Rate` from bytes; ``fields`` name average, peak and burst as the
    caller spells them, and ``units`` give the values back in its units."""
    f_average, f_peak, f_burst = fields
    low, high = units.rate(RATE_MIN), units.rate(RATE_MAX)
    if not RATE_MIN <= average <= RATE_MAX:
        raise InvalidInputError(
            f_average,
            units.rate(average),
            f"must be from {low} to {high} {units.per_s_name} (8 kbit/s to 100 Gbit/s)",
        )
    if peak and not average <= peak <= RATE_MAX:
        raise InvalidInputError(
            f_peak,
            units.rate(peak),
            f"must be from the average ({units.rate(average)}) to {high} {units.per_s_name}",
        )
    if burst and burst > (peak or average) * BURST_SECONDS_MAX:
        raise InvalidInputError(
            f_burst,
            units.sized(burst),
            f"more than {BURST_SECONDS_MAX} s of traffic at the rate",
        )
    if burst and burst < DEFAULT_BURST_MIN // 2:
        raise InvalidInputError(
            f_burst,
            units.sized(burst),
            f"less than one frame ({DEFAULT_BURST_MIN // 2} bytes)",
        )
    return Rate(average=average, peak=peak, burst=burst)


def _known(data: Mapping[Any, Any], field: str, keys: tuple[str, ...]) -> None:
    for key in data:
        if key not in keys:
            raise InvalidInputError(field, key, "unknown key; known keys are " + ", ".join(keys))


def _count(field: str, value: object, *, zero: bool = False) -> int:
    """An integer as JSON gives it (not a bool, a float or a string), > 0 (or 0 if allowed)."""
    if type(value) is not int:
        raise InvalidInputError(field, value, "must be an integer")
    if value < 0 or (value == 0 and not zero):
        raise InvalidInputError(field, value, "must be positive")
    return value


def _in(value: int, unit: float) -> float | int:
    whole, rest = divmod(value, unit)
    return int(whole) if not rest else value / unit
