"""What ``list-ifaces`` shows, built once for both modes (the service sends the same rows).

The table rows and the JSON document of a VM's interfaces; a host link the kernel reported
deleted (only a resident service hears that) is shown beside its entry's status.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from qmpnet.codec import UnknownEntry, dump_endpoint
from qmpnet.store import Entry

HEADER = ("NAME", "TYPE", "MAC", "MODEL", "PCI", "QUEUES", "HOST LINK", "NETNS", "STATUS")


def _status(entry: Entry, vanished: Collection[str]) -> str:
    link = entry.endpoint.host_link
    if link and link in vanished:
        return f"{entry.status.value} (host link gone)"
    return entry.status.value


def interface_rows(entries: Sequence[Entry], vanished: Collection[str] = ()) -> list[list[str]]:
    rows = [list(HEADER)]
    for e in entries:
        ep = e.endpoint
        pair = ep.network_pair
        rows.append(
            [
                ep.name,
                ep.type.value,
                ep.hardware_addr,
                pair.model.value if pair else "none",
                ep.pci_path or "-",
                str(ep.queues or "-"),
                ep.host_link or "-",
                ep.netns_path or "(host)",
                _status(e, vanished),
            ]
        )
    return rows


def list_document(
    entries: Sequence[Entry], unknown: Sequence[UnknownEntry], vanished: Collection[str] = ()
) -> dict[str, Any]:
    interfaces = []
    for e in entries:
        ep, pair = e.endpoint, e.endpoint.network_pair
        # the public view (output-schema-v1.json's listEntry), and the saved record beside it
        item: dict[str, Any] = {
            "name": ep.name,
            "type": ep.type.value,
            "mac": ep.hardware_addr,
            "model": pair.model.value if pair else "none",
            "pci_path": ep.pci_path or "",
            "queues": ep.queues,
            "host_link": ep.host_link or "",
            "netns": ep.netns_path or "",
            "status": e.status.value,
            "endpoint": dump_endpoint(ep),
        }
        if e.endpoint.host_link and e.endpoint.host_link in vanished:
            item["host_link_gone"] = True
        interfaces.append(item)
    return {
        "interfaces": interfaces,
        "unreadable": [{"reason": u.reason, "entry": u.raw} for u in unknown],
    }
