"""Check a document qmpnet printed against its output schema (``output-schema-v1.json``)."""

from __future__ import annotations

from typing import Any

from qmpnet import schema


def conforms(doc: Any, kind: str) -> Any:
    """``doc`` if it is a valid ``kind`` (a ``$defs`` name: interfaceList, status, …);
    else ``jsonschema.ValidationError`` naming the first wrong key."""
    import jsonschema

    whole = schema.load()
    jsonschema.Draft202012Validator({"$ref": f"#/$defs/{kind}", "$defs": whole["$defs"]}).validate(
        doc
    )
    return doc
