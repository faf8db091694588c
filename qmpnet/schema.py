"""The one schema of qmpnet's machine-readable output (``output-schema-v1.json``).

Every JSON document the CLI prints carries ``"schema": SCHEMA_VERSION`` and is built by the
same code in the direct mode and through qmpnetd (the service sends the body, the CLI adds
the version as it prints). The one exception is the interface ``add-iface``/``del-iface``
print: the input's echo in Kata's agent shape, left as a Kata caller wrote it. Standard
library only: the thin client prints through it.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SCHEMA_VERSION = 1
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "output-schema-v1.json")


def versioned(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the schema's version first."""
    return {"schema": SCHEMA_VERSION, **doc}


def load() -> dict[str, Any]:
    """The JSON Schema itself (for a caller's validator, and the tests)."""
    with open(SCHEMA_FILE, encoding="utf-8") as fh:
        doc: dict[str, Any] = json.load(fh)
    return doc
