"""The spec versions ``qmpnet-cni`` speaks, and its VERSION answer: standard library only.

A runtime asks VERSION before anything else (libcni's version query sends
``CNI_NETNS=dummy CNI_IFNAME=dummy CNI_PATH=dummy``, and a failed answer makes CRI-O's ocicni
and Podman skip the whole conflist), and asks it often: it is answered from here, before any
other variable is read and before qmpnet's netlink and QMP machinery is imported.
"""

from __future__ import annotations

import json

#: Spec versions this plugin speaks, oldest first; results are shaped alike for all of them.
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = SUPPORTED_VERSIONS[-1]
#: the most of stdin read (boundary.DOCUMENT_MAX, pinned equal by a unit test) plus one byte
READ_MAX = (1 << 20) + 1


def version_answer(raw: bytes) -> dict[str, object]:
    """VERSION's result: in the version the configuration asks for, if we speak it.

    A configuration that is missing, unreadable or asks another version gets the latest:
    VERSION is how a runtime learns what we speak, so it never fails.
    """
    asked: object = None
    if raw.strip():
        try:
            doc = json.loads(raw)
        except ValueError:  # UnicodeDecodeError is one too
            doc = None
        if isinstance(doc, dict):
            asked = doc.get("cniVersion")
    version = asked if isinstance(asked, str) and asked in SUPPORTED_VERSIONS else LATEST
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
