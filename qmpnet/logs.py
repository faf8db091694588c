"""Logging for the commands: one handler on stderr, text or JSON lines, quiet libraries."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(verbose: int, fmt: str, prefix: str = "qmpnet") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"{prefix}: %(levelname)s: %(name)s: %(message)s"))
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if verbose < 3:
        # Our own --> / <-- lines carry the QMP traffic, and every failure is reported once,
        # as qmpnet's one-line error: qemu.qmp's own error logs would repeat it, pyroute2's
        # debug dumps every link. -vvv shows them all.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
        logging.getLogger("pyroute2").setLevel(max(level, logging.INFO))
        logging.getLogger("asyncio").setLevel(max(level, logging.INFO))
