"""Endpoints to and from JSON, with a ``type`` tag, driven by the endpoint registry.

Every registered type round-trips; there is no per-type marshalling block to forget. Open fds
are not part of any endpoint, so none can be written. An entry that cannot be understood
(unknown type, bad field) is returned as :class:`UnknownEntry` so the caller keeps it verbatim.
"""

from __future__ import annotations

from typing import Any

import attrs
import cattrs

from qmpnet.boundary import exact_converter
from qmpnet.endpoints import REGISTRY, Endpoint
from qmpnet.errors import InvalidInputError, QmpnetError
from qmpnet.model import EndpointType


@attrs.frozen
class UnknownEntry:
    """A saved endpoint this version cannot read; written back exactly as it was."""

    #: the JSON value exactly as it was read (usually an object, but kept whatever it is)
    raw: Any
    reason: str


# The boundary's exact hooks: cattrs would turn [1] into "[1]" and 2.7 into 2; a damaged entry
# must stay unknown. Vocabularies (the pair model) parse as the model says.
_converter = exact_converter(detailed_validation=False)


def dump_endpoint(endpoint: Endpoint) -> dict[str, Any]:
    data: dict[str, Any] = {"type": endpoint.type.value}
    data.update(_converter.unstructure(endpoint))
    return data


def load_endpoint(data: object) -> Endpoint | UnknownEntry:
    """Parse one saved endpoint; anything unreadable comes back as UnknownEntry."""
    if not isinstance(data, dict):
        return UnknownEntry(data, "not a JSON object")
    try:
        kind = EndpointType.parse(data.get("type"))
    except InvalidInputError as err:
        return UnknownEntry(data, str(err))
    body = {k: v for k, v in data.items() if k != "type"}
    try:
        endpoint: Endpoint = _converter.structure(body, REGISTRY[kind])
    except (
        QmpnetError,
        cattrs.BaseValidationError,
        cattrs.errors.CattrsError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ) as err:
        return UnknownEntry(data, f"{kind.value} endpoint: {type(err).__name__}: {err}")
    return endpoint
