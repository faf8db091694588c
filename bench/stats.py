"""Summaries, tables and the JSON a bench writes.

A :class:`Row` keeps its raw samples; its summary (n, median, p90, min, max) is computed when
printed or saved, so the JSON always lets a reader recompute or re-plot. p90 is the inclusive
linear-interpolation quantile (``statistics.quantiles(method="inclusive")``).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs


def summary(samples: Sequence[float]) -> dict[str, float | int]:
    """n, median, p90, min, max of ``samples`` (empty: n=0 only)."""
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p90 = (
        statistics.quantiles(ordered, n=10, method="inclusive")[8]
        if len(ordered) > 1
        else ordered[0]
    )
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p90": p90,
        "min": ordered[0],
        "max": ordered[-1],
    }


@attrs.define
class Row:
    """One measured quantity: a label, a unit and every sample taken."""

    label: str
    unit: str
    samples: list[float] = attrs.field(factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            **summary(self.samples),
            "samples": [round(s, 6) for s in self.samples],
        }


@attrs.define
class Table:
    """Rows of distributions under a title, with notes that say how to read them."""

    title: str
    rows: list[Row] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def row(self, label: str, unit: str = "ms") -> Row:
        """The row with this label, created on first use (keeps insertion order)."""
        for existing in self.rows:
            if existing.label == label:
                return existing
        made = Row(label, unit)
        self.rows.append(made)
        return made

    def render(self) -> str:
        head = ("", "n", "median", "p90", "min", "max", "unit")
        body = []
        for r in self.rows:
            s = summary(r.samples)
            cells = [r.label, str(s["n"])]
            cells += [_fmt(s[k]) if k in s else "-" for k in ("median", "p90", "min", "max")]
            body.append((*cells, r.unit))
        return _grid(self.title, head, body, self.notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "kind": "stats",
            "notes": self.notes,
            "rows": [r.to_json() for r in self.rows],
        }


@attrs.define
class Grid:
    """A plain table of values (e.g. one line per NIC count), printed as given."""

    title: str
    columns: tuple[str, ...]
    lines: list[tuple[str, ...]] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def render(self) -> str:
        return _grid(self.title, self.columns, self.lines, self.notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "kind": "grid",
            "columns": list(self.columns),
            "lines": [list(line) for line in self.lines],
            "notes": self.notes,
        }


@attrs.define
class Report:
    """What one bench module produced: its tables, facts about the run, or its error."""

    bench: str
    tables: list[Table | Grid] = attrs.field(factory=list)
    facts: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    #: the exception's own first line, for the printed summary
    error_line: str = ""
    seconds: float = 0.0

    def table(self, title: str, notes: Sequence[str] = ()) -> Table:
        made = Table(title, notes=list(notes))
        self.tables.append(made)
        return made

    def render(self) -> str:
        parts = [t.render() for t in self.tables]
        if self.facts:
            parts.append("\n".join(f"  {k}: {v}" for k, v in self.facts.items()))
        if self.error:
            parts.append(f"  ERROR: {self.error_line}")
        return "\n\n".join(parts)

    def save(self, directory: Path, machine: dict[str, Any], quick: bool) -> Path:
        path = directory / f"{self.bench}.json"
        doc = {
            "bench": self.bench,
            "quick": quick,
            "seconds": round(self.seconds, 2),
            "machine": machine,
            "facts": self.facts,
            "error": self.error,
            "error_line": self.error_line,
            "tables": [t.to_json() for t in self.tables],
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")
        return path


def _fmt(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt(value: float) -> str:
    """A number as the tables print it."""
    return _fmt(value)


def _grid(
    title: str, head: Sequence[str], body: Sequence[Sequence[str]], notes: Sequence[str]
) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = [f"## {title}"]
    for i, cells in enumerate((head, *body)):
        lines.append(
            "  ".join(
                str(c).ljust(w) if j == 0 else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"  * {n}" for n in notes]
    return "\n".join(lines)
