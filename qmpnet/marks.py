"""The ownership mark of host links: a proof only this state directory can give.

A link qmpnet creates carries the interface alias ``qmpnet:<id>:<tag>``, where ``<tag>`` is
the first 16 hex digits of HMAC-SHA256(secret, id NUL link name) and the secret is random, kept
0600 in the VM's state directory (``mark.key``, made under the VM's lock with the directory).
Aliases are world-readable, so the id alone proves nothing: a copied alias names another link
or another directory's secret, and its tag fails. Every check of "is this link ours?" goes
through :meth:`Mark.proves`, so nothing is deleted or rewired on a claim alone.

Links of an earlier release carry ``qmpnet:<id>`` with no tag. They prove nothing, with one
exception so that a NIC plugged by that release still unplugs: a link whose alias is exactly
``qmpnet:<id>`` of an endpoint that was already in the directory's state or journal when the
directory got its secret (``legacy``), looked up by the name that endpoint recorded (never
found by scanning links).

The mark in use is a context variable: :meth:`qmpnet.store.Store.locked` sets the VM's own for
the operation it guards. Outside any, the process's own random mark applies (what it marks,
no later process can prove).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import secrets
from collections.abc import Iterator

import attrs

PREFIX = "qmpnet:"
TAG_DIGITS = 16


def claimed_owner(alias: str) -> str | None:
    """The id an alias claims (proving nothing), or None for an alias that is not a mark."""
    if not alias.startswith(PREFIX):
        return None
    return alias[len(PREFIX) :].split(":", 1)[0]


@attrs.frozen
class Mark:
    """One state directory's secret, and the ids it inherited from an earlier release."""

    secret: bytes = attrs.field(repr=False)
    legacy: frozenset[str] = frozenset()

    def _tag(self, owner: str, name: str) -> str:
        digest = hmac.new(self.secret, f"{owner}\0{name}".encode(), hashlib.sha256)
        return digest.hexdigest()[:TAG_DIGITS]

    def of(self, owner: str, name: str) -> str:
        """The alias of ``owner``'s link ``name``."""
        return f"{PREFIX}{owner}:{self._tag(owner, name)}"

    def proves(self, alias: str, name: str, owner: str, *, by_name: bool = False) -> bool:
        """Whether link ``name`` wearing ``alias`` is ``owner``'s, made under this secret.

        ``by_name``: the link was looked up by the name ``owner``'s record gives, so an
        untagged mark of an inherited endpoint counts too.
        """
        if hmac.compare_digest(alias, self.of(owner, name)):
            return True
        return by_name and owner in self.legacy and alias == PREFIX + owner


#: the mark outside any state directory's lock: this process's own
_PROCESS = Mark(secrets.token_bytes(32))
_CURRENT: contextvars.ContextVar[Mark] = contextvars.ContextVar("qmpnet_mark", default=_PROCESS)


def current() -> Mark:
    return _CURRENT.get()


@contextlib.contextmanager
def using(mark: Mark) -> Iterator[Mark]:
    """Mark and prove links with ``mark`` inside the block."""
    token = _CURRENT.set(mark)
    try:
        yield mark
    finally:
        _CURRENT.reset(token)
