"""Logging for the commands: one handler on stderr, text or JSON lines, quiet libraries."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any

#: the structured fields a record carries, named as in the JSON log lines
FIELD_NAMES = ("vm", "mac", "step", "container_id")
#: what the code running now acts on: set by the operations (:func:`fields`), read by the
#: JSON formatter, so a record logged anywhere below carries them without being passed them
_FIELDS: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "qmpnet_log_fields", default=types.MappingProxyType({})
)


@contextlib.contextmanager
def fields(**values: str) -> Iterator[None]:
    """Log records within carry these fields (empty values are left out)."""
    token = _FIELDS.set({**_FIELDS.get(), **{k: v for k, v in values.items() if v}})
    try:
        yield
    finally:
        _FIELDS.reset(token)


def current_fields() -> Mapping[str, str]:
    return _FIELDS.get()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, and the structured fields
    (``vm``, ``mac``, ``step``, ``container_id``) where known; ``extra`` keys of those names
    or of ``error``/``exit`` are taken too (the CLI's final error line)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_FIELDS.get())
        for key in (*FIELD_NAMES, "error", "exit"):
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
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
