"""qmpnet.links loads pyroute2's rtnetlink client without the package ``__init__``, and
pyroute2 stays whole for any code that uses it afterwards in the same process.

Each case runs in a fresh interpreter: what is in ``sys.modules`` is the point.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_links_does_not_run_pyroute2_init() -> None:
    out = _run(
        """
        import sys
        import qmpnet.links
        assert "pyroute2.iproute.linux" in sys.modules
        # the package __init__ imports NDB, IPDB, conntrack ...: none of them is loaded
        print(sorted(m for m in ("pyroute2.ndb.main", "pyroute2.ipdb", "pyroute2.conntrack")
                     if m in sys.modules))
        """
    )
    assert out == "[]"


def test_pyroute2_is_whole_for_later_users() -> None:
    out = _run(
        """
        import qmpnet.links
        import pyroute2
        from pyroute2 import NDB, IPRoute, config
        from pyroute2.iproute.linux import AsyncIPRoute
        assert pyroute2.AsyncIPRoute is AsyncIPRoute is qmpnet.links.AsyncIPRoute
        assert config.__name__ == "pyroute2.config", config
        assert "IPRoute" in pyroute2.__dict__ and NDB.__module__ == "pyroute2.ndb.main"
        try:
            pyroute2.no_such_name
        except AttributeError as err:
            print("AttributeError", err)
        """
    )
    assert out == "AttributeError module 'pyroute2' has no attribute 'no_such_name'"


def test_a_loaded_pyroute2_is_used_as_it_is() -> None:
    out = _run(
        """
        import pyroute2
        import qmpnet.links
        from qmpnet import pyroute
        assert pyroute.package() is pyroute2
        print(qmpnet.links.AsyncIPRoute is pyroute2.AsyncIPRoute)
        """
    )
    assert out == "True"
