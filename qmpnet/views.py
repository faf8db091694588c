"""What ``list-ifaces`` shows, built once for both modes (the service sends the same rows).

The table rows and the JSON document of a VM's interfaces; a host link the kernel reported
deleted (only a resident service hears that) is shown beside its entry's status.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from qmpnet.codec import UnknownEntry, dump_endpoint
from qmpnet.store import Entry

if TYPE_CHECKING:
    from qmpnet.network import NicStats

HEADER = ("NAME", "TYPE", "MAC", "MODEL", "PCI", "QUEUES", "HOST LINK", "NETNS", "STATUS")


def _view(entry: Entry, vanished: Collection[str]) -> dict[str, Any]:
    """One interface's public view (output-schema-v1.json's ``listEntry``, without the saved
    record): what the table shows and ``list-ifaces --json`` prints."""
    ep, pair = entry.endpoint, entry.endpoint.network_pair
    view: dict[str, Any] = {
        "name": ep.name,
        "type": ep.type.value,
        "mac": ep.hardware_addr,
        "model": pair.model.value if pair else "none",
        "pci_path": ep.pci_path or "",
        "queues": ep.queues,
        "host_link": ep.host_link or "",
        "netns": ep.netns_path or "",
        "status": entry.status.value,
        "link": entry.link.value,
        # libvirt's terms (kB/s, kB), only the shaped directions; null when not shaped
        "bandwidth": entry.bandwidth.libvirt() if entry.bandwidth else None,
    }
    if entry.trust_rx_filters:
        view["trust_rx_filters"] = True
    if ep.host_link and ep.host_link in vanished:
        view["host_link_gone"] = True
    return view


def entry_document(entry: Entry, vanished: Collection[str] = ()) -> dict[str, Any]:
    """One interface as list-ifaces shows it (the public view and the saved record)."""
    return {**_view(entry, vanished), "endpoint": dump_endpoint(entry.endpoint)}


def interface_rows(entries: Sequence[Entry], vanished: Collection[str] = ()) -> list[list[str]]:
    rows = [list(HEADER)]
    for e in entries:
        v = _view(e, vanished)
        status = v["status"] + (" (host link gone)" if v.get("host_link_gone") else "")
        status += ", link down" if v["link"] == "down" else ""
        rows.append(
            [
                v["name"],
                v["type"],
                v["mac"],
                v["model"],
                v["pci_path"] or "-",
                str(v["queues"] or "-"),
                v["host_link"] or "-",
                v["netns"] or "(host)",
                status,
            ]
        )
    return rows


def list_document(
    entries: Sequence[Entry], unknown: Sequence[UnknownEntry], vanished: Collection[str] = ()
) -> dict[str, Any]:
    return {
        # the public view, and the saved record beside it
        "interfaces": [entry_document(e, vanished) for e in entries],
        "unreadable": [{"reason": u.reason, "entry": u.raw} for u in unknown],
    }


#: the counters ``stats`` shows, in its table's order (IFLA_STATS64 names)
COUNTERS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",
    "rx_errors",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",
    "tx_errors",
)
STATS_HEADER = (
    "MAC",
    "NAME",
    "HOST LINK",
    "QUEUES",
    "LINK",
    "BANDWIDTH",
    *(c.upper() for c in COUNTERS),
)


def bandwidth_cell(bandwidth: dict[str, dict[str, float]] | None) -> str:
    """``in 2500 kB/s, out 1250 kB/s`` (averages), or ``-`` when not shaped."""
    if not bandwidth:
        return "-"
    short = {"inbound": "in", "outbound": "out"}
    return ", ".join(f"{short[w]} {r['average']:g} kB/s" for w, r in bandwidth.items())


def stats_document(stats: Sequence[NicStats], vanished: Collection[str] = ()) -> dict[str, Any]:
    """``stats --json``: each NIC's public view and its host link's counters (null when the
    link cannot be reached)."""
    out = []
    for s in stats:
        view = _view(s.entry, vanished)
        counters = {c: getattr(s.counters, c) for c in COUNTERS} if s.counters else None
        out.append({**view, "counters": counters})
    return {"interfaces": out}


def stats_rows(doc: dict[str, Any]) -> list[list[str]]:
    rows = [list(STATS_HEADER)]
    for v in doc["interfaces"]:
        counters = v["counters"]
        rows.append(
            [
                v["mac"],
                v["name"],
                v["host_link"] or "-",
                str(v["queues"] or "-"),
                v["link"],
                bandwidth_cell(v["bandwidth"]),
                *(str(counters[c]) if counters else "-" for c in COUNTERS),
            ]
        )
    return rows
