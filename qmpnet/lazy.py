"""Lazy re-exports (PEP 562) for a package whose public names are costly to import.

``qmpnet``, ``qmpnet.cni`` and ``qmpnet.testing`` name their exports in ``__all__`` and load
each from its home module on first use, so a light entry point (the thin client, CNI
VERSION, ``python -m qmpnet.testing.guest``) pays only for what it touches. Standard library
only.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def exports(
    package: str, homes: Mapping[str, str], names: list[str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: each name from its home module
    (a full module name), cached in the package once loaded."""

    def getattr_(name: str) -> object:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def dir_() -> list[str]:
        return sorted(names)

    return getattr_, dir_
