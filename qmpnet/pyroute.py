"""pyroute2's rtnetlink client without the rest of pyroute2.

``import pyroute2`` runs a package ``__init__`` that imports every API pyroute2 has (IPDB,
NDB, conntrack, nftables, nl80211, wireguard, plan9 ...): about 105 ms and a hundred modules
of a direct-mode CLI process, for the two names :mod:`qmpnet.links` uses. When pyroute2 is not
loaded yet, :func:`package` puts in its place the same package module with its own search
path but its ``__init__`` not run, and a PEP 562 ``__getattr__`` that completes it: a
submodule imports as usual, and the first look-up of any other name (``pyroute2.IPRoute``,
``from pyroute2 import *``) runs the real ``__init__`` in that module, so code that uses
pyroute2 afterwards, in the same process, sees the whole package.

Standard library only; the only module that imports it is :mod:`qmpnet.links`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def package() -> types.ModuleType:
    """The ``pyroute2`` package module: the loaded one, or one whose ``__init__`` waits."""
    loaded = sys.modules.get("pyroute2")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("pyroute2 is not installed", name="pyroute2")
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    completed = False

    def getattr_(name: str) -> object:
        nonlocal completed
        if name.startswith("__") and name != "__all__":
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")
        try:
            # `from pyroute2 import config` inside pyroute2 asks for a submodule
            return importlib.import_module(f"pyroute2.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"pyroute2.{name}":
                raise
        if completed:
            raise AttributeError(f"module 'pyroute2' has no attribute {name!r}")
        completed = True
        loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = getattr_  # type: ignore[method-assign]
    sys.modules["pyroute2"] = module
    return module
