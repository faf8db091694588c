"""Delegated plugins (IPAM), run as a container runtime runs them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from qmpnet.cni.records import Attachment
from qmpnet.cni.request import Request
from qmpnet.cni.spec import (
    GC_KEYS,
    IPAM_TIMEOUT,
    SUPPORTED_VERSIONS,
    CniError,
    Code,
    decode,
    version_key,
)
from qmpnet.errors import shown
from qmpnet.netns import netns_exists

log = logging.getLogger("qmpnet.cni")


def find_plugin(name: str, path: Sequence[str]) -> str:
    """The executable ``name`` in CNI_PATH, like a runtime finds a plugin."""
    if not path:
        raise CniError(Code.INVALID_ENV, f"CNI_PATH is empty: cannot find IPAM plugin {name}")
    for directory in path:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(
        Code.IPAM,
        f"IPAM plugin {shown(name)} not found in CNI_PATH",
        "searched " + os.pathsep.join(path),
    )


async def exec_plugin(
    binary: str,
    command: str,
    stdin: bytes,
    environ: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Run a delegated plugin as a runtime would; its error JSON is passed on as our error."""
    env = {**environ, **(overrides or {}), "CNI_COMMAND": command}
    log.debug("exec %s %s", binary, command)
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
    except OSError as err:
        raise CniError(Code.IPAM, f"cannot run {binary}: {err.strerror}") from err
    try:
        out, _ = await asyncio.wait_for(proc.communicate(stdin), IPAM_TIMEOUT)
    except TimeoutError as err:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CniError(
            Code.IPAM, f"{binary} {command}: no answer within {IPAM_TIMEOUT:g} s"
        ) from err
    text = out.decode("utf-8", "replace").strip()
    if proc.returncode != 0:
        try:
            reply = json.loads(text)
            code, msg = int(reply["code"]), str(reply["msg"])
        except (ValueError, KeyError, TypeError):
            raise CniError(
                Code.IPAM, f"{binary} {command} failed with status {proc.returncode}", text[:2000]
            ) from None
        raise CniError(code, f"{os.path.basename(binary)}: {msg}", str(reply.get("details", "")))
    if not text:
        return None
    try:
        reply = json.loads(text)
    except json.JSONDecodeError as err:
        raise CniError(Code.IPAM, f"{binary} {command}: output is not JSON", text[:2000]) from err
    if not isinstance(reply, dict):
        raise CniError(Code.IPAM, f"{binary} {command}: output is not a JSON object")
    return reply


async def ipam(
    req: Request,
    command: str,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    binary = find_plugin(req.conf.ipam_type, req.env.path)
    stdin = await ipam_config(req)
    return await exec_plugin(binary, command, stdin, req.env.environ, overrides)


async def ipam_config(req: Request) -> bytes:
    """The configuration for the IPAM plugin, in a version it speaks.

    A 1.1 configuration reaches IPAM plugins that speak only 1.0 (Debian's host-local):
    ADD, DEL and CHECK mean the same in both and their results have the same shape, so the
    plugin is asked in the newest 1.x version both sides speak. Versions before 1.0 differ
    in their result, so they are never substituted.
    """
    versions = await ipam_versions(req)
    if req.conf.cni_version in versions:
        return req.conf.raw
    common = [
        v
        for v in SUPPORTED_VERSIONS
        if v in versions
        and version_key(v) >= (1, 0, 0)
        and version_key(v) <= version_key(req.conf.cni_version)
    ]
    if not common:
        raise CniError(
            Code.INCOMPATIBLE_VERSION,
            f"IPAM plugin {req.conf.ipam_type} does not speak CNI {req.conf.cni_version}",
            "it speaks " + (", ".join(versions) or "nothing it would say"),
        )
    data = {k: v for k, v in decode(req.conf.raw).items() if k not in GC_KEYS}
    return json.dumps({**data, "cniVersion": common[-1]}).encode()


async def ipam_versions(req: Request) -> list[str]:
    """The spec versions the IPAM plugin speaks, from its VERSION answer."""
    binary = find_plugin(req.conf.ipam_type, req.env.path)
    reply = await exec_plugin(
        binary,
        "VERSION",
        json.dumps({"cniVersion": req.conf.cni_version}).encode(),
        req.env.environ,
    )
    versions = reply.get("supportedVersions", []) if reply else []
    return [str(v) for v in versions] if isinstance(versions, list) else []


async def ipam_speaks(req: Request, version: str) -> bool:
    """Whether the IPAM plugin has ``version`` (STATUS and GC are only sent to 1.1 plugins)."""
    return version in await ipam_versions(req)


async def ipam_release(req: Request, found: Attachment) -> None:
    """GC's release of one stale attachment's address: the DEL that attachment would have had.

    GC comes with a 1.1 configuration; :func:`ipam_config` asks a 1.0 IPAM plugin in 1.0.
    """
    await ipam(req, "DEL", attachment_env(found))


def attachment_env(found: Attachment) -> dict[str, str]:
    """The environment a DEL of ``found`` would have had, for its IPAM release."""
    return {
        "CNI_CONTAINERID": found.container_id,
        "CNI_IFNAME": found.ifname,
        "CNI_NETNS": found.netns if netns_exists(found.netns) else "",
        "CNI_ARGS": "",
    }
