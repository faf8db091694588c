"""ADD, DEL, CHECK, STATUS, GC and VERSION: what each does to the VM, the host and the records."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

from qmpnet.cni.delegate import find_plugin, ipam, ipam_config, ipam_release, ipam_speaks
from qmpnet.cni.records import Attachment, Book, Records
from qmpnet.cni.request import Deferred, Env, NetConf, Request, bad_config
from qmpnet.cni.results import chained_result, ips_of, main_result, prev_interface, sandbox_mac
from qmpnet.cni.spec import (
    CONTAINER_ID,
    GC_KEYS,
    LATEST,
    NAME_RE,
    TUN_PATH,
    CniError,
    Code,
    to_cni_error,
)
from qmpnet.cni.versions import version_answer
from qmpnet.config import Config
from qmpnet.endpoints import Endpoint
from qmpnet.endpoints.base import new_id, random_mac
from qmpnet.endpoints.netpair import pair_model, parked_mac
from qmpnet.errors import (
    InvalidInputError,
    QmpConnectError,
    QmpnetError,
    TapGoneError,
)
from qmpnet.hypervisor import device_id
from qmpnet.links import Links
from qmpnet.model import (
    InterfaceDescription,
    InterworkingModel,
    check_mac,
)
from qmpnet.netns import check_netns, check_sandbox_netns
from qmpnet.network import NetworkState, NoSuchInterfaceError, host_link
from qmpnet.recovery import Settler
from qmpnet.store import Entry, Status

log = logging.getLogger("qmpnet.cni")


def vm_gone(err: QmpConnectError) -> bool:
    """QEMU is not running (any more): the same judgement journal recovery makes."""
    return err.gone


def _entry_for(state: NetworkState, mac: str) -> Entry | None:
    return next((e for e in state.store.load().entries if e.endpoint.hardware_addr == mac), None)


async def _forget(state: NetworkState, entry: Entry) -> None:
    """The VM is gone with its device: undo the host side and drop the state entry.

    Recovery's own path for a VM that is gone (the endpoint's ``teardown``, then a check of
    what the host still holds), under the VM's lock; a residue fails the DEL, so the
    runtime's retry tries again.
    """
    async with state.store.locked():
        job = Settler(state, None)
        if not await job.drop_host_side(entry.endpoint, None, "the VM is gone"):
            raise CniError(
                Code.TRY_AGAIN,
                f"{entry.endpoint.name}: the host side of a gone VM is not cleaned up",
                "; ".join(job.errors),
            )


async def unplug(req: Request, attachment: Attachment, state_dir: Path, config: Config) -> None:
    """Unplug one attachment; success when the VM, the device or the state is already gone."""
    state = await req.vms.state(state_dir, attachment.qmp_socket, config)
    entry = _entry_for(state, attachment.mac)
    if entry is None:
        # an ADD that failed and could not undo itself: finish its rollback now
        report = await state.recover()
        if report is not None:
            if not report.ok:
                raise CniError(
                    Code.TRY_AGAIN,
                    f"{attachment.ifname}: the rollback of its failed ADD is not finished",
                    "; ".join(report.errors),
                )
            return
        log.info("%s has no state entry: nothing to unplug", attachment.ifname)
        return
    try:
        await state.remove_interface(attachment.mac)
    except NoSuchInterfaceError:
        log.info("%s was unplugged meanwhile", attachment.ifname)
    except QmpConnectError as err:
        if not vm_gone(err):
            raise
        log.info("the VM is gone (%s): removing the host side of %s only", err, attachment.ifname)
        await _forget(state, entry)
    except TapGoneError as err:  # raised before the unplug's first step, so never wrapped
        # The runtime's DEL must end (kubelet retries a failed one forever), and the VM must
        # live: the NIC stays, without a backend, and its record says so until the VM stops.
        log.warning("%s: %s; DEL succeeds without unplugging it", attachment.ifname, err)


async def sandbox_link(netns: str, ifname: str) -> tuple[str, int, str]:
    """MAC, MTU and kind of the link the main plugin made, as the kernel reports them."""
    async with Links.open(netns) as links:
        info = await links.lookup(ifname)
    if info is None:
        raise CniError(
            Code.NO_INTERFACE,
            f"no interface {ifname} in {netns}",
            "the main plugin of the chain must create CNI_IFNAME in CNI_NETNS",
        )
    try:
        mac = check_mac(f"MAC of {ifname}", info.mac)
    except InvalidInputError as err:
        raise CniError(Code.UNSUPPORTED, str(err)) from err
    # No kind: a plain device (moved in by host-device, say), refused with the reason.
    return mac, info.mtu, info.kind or "device"


def check_sandbox(req: Request) -> None:
    """CNI_NETNS names a netns, and not qmpnet's own (the host's) unless main mode allows it.

    Chained mode would rewire a link of the host; main mode makes a tap there only when its
    configuration says ``allowHostNetns``. Checked before any lock, file or connection.
    """
    env, conf = req.env, req.conf
    if conf.main and conf.allow_host_netns:
        check_netns(env.netns)
        return
    try:
        check_sandbox_netns(env.netns, "CNI_NETNS")
    except InvalidInputError as err:
        hint = (
            "set allowHostNetns to make model none's tap in the host's namespace"
            if conf.main
            else "chained mode joins a pod's own link: CNI_NETNS must be the pod's netns"
        )
        raise CniError(Code.INVALID_ENV, str(err), hint) from err


async def cmd_add(req: Request) -> dict[str, Any]:
    check_sandbox(req)
    req.bandwidth()  # refused before anything is made, a pending ADD's too
    qmp = req.qmp_socket()
    if req.vms.defers and not await req.vms.present(qmp):
        return await _add_pending(req, qmp)
    return await plug(req, qmp)


async def plug(
    req: Request,
    qmp: str,
    *,
    mac: str = "",
    got: Mapping[str, Any] | None = None,
    endpoint_id: str = "",
) -> dict[str, Any]:
    """Record and plug the attachment into the VM at ``qmp``, all or nothing.

    A pending attachment plugged later passes the ``mac`` and IPAM result its ADD already
    reported (main mode), and the NIC id whose parked MAC it reported (a chained macvtap or
    bridged model), so the VM and the pod's link get what the runtime was told.
    """
    conf = req.conf
    book = Book(req.state_dir)
    async with book.locked():
        records = book.load()
        if records.find(req.key) is not None:
            raise _exists(req)
        state = await req.vms.state(req.state_dir, qmp, conf.config())
        try:
            if conf.main:
                return await _add_main(req, book, records, state, mac=mac, given=got)
            return await _add_chained(req, book, records, state, mac, endpoint_id=endpoint_id)
        finally:
            await book.remove_if_unused(state)


def _exists(req: Request) -> CniError:
    return CniError(
        Code.ATTACHMENT_EXISTS,
        f"{req.env.ifname} of container "
        f"{req.env.container_id} is already attached to network {req.conf.name}",
        "DEL it first",
    )


async def _add_pending(req: Request, qmp: str) -> dict[str, Any]:
    """The VM is not there yet: answer as the plug will, and let the service plug it later.

    Everything that can be checked now is (the netns, the pod's link, an earlier record); in
    main mode the address is taken now, because the result must carry it.
    """
    env, conf = req.env, req.conf
    if Book(req.state_dir).path.exists() and Book(req.state_dir).load().find(req.key):
        raise _exists(req)
    if conf.main:
        mac = req.mac() or random_mac()
        got = await ipam(req, "ADD") if conf.ipam else None
        result = main_result(conf, env, mac, got)
        try:
            await req.vms.defer(req, qmp, result, mac=mac, got=got)
        except BaseException:
            if conf.ipam:
                await ipam(req, "DEL")
            raise
        return result
    mac, mtu, _ = await sandbox_link(env.netns, env.ifname)
    # macvtap and bridged park the pod's link on a MAC derived from the NIC's id: choose the
    # id now, so that the result names the MAC the link will wear once plugged
    endpoint_id = new_id() if pair_model(conf.model).parks_mac else ""
    reported = parked_mac(endpoint_id) if endpoint_id else mac
    result = chained_result(conf, env, reported, mtu)
    await req.vms.defer(req, qmp, result, mac=reported, endpoint_id=endpoint_id)
    return result


async def _add_chained(
    req: Request,
    book: Book,
    records: Records,
    state: NetworkState,
    reported: str,
    *,
    endpoint_id: str = "",
) -> dict[str, Any]:
    env, conf = req.env, req.conf
    mac, mtu, kind = await sandbox_link(env.netns, env.ifname)
    index, _ = prev_interface(conf, env)
    addrs = ips_of(conf.prev_result or {}, index) if index is not None else ()
    desc = InterfaceDescription(
        device=env.ifname,
        name=env.ifname,
        hw_addr=mac,
        mtu=mtu,
        ip_addresses=addrs,
        link_type=kind,
        bandwidth=req.bandwidth(),
    )
    record = Attachment(
        network=conf.name,
        container_id=env.container_id,
        ifname=env.ifname,
        netns=env.netns,
        mac=mac,
        qmp_socket=state.qmp_path,
        reported_mac=reported,
    )
    # The record goes first: a crash after the plug leaves something DEL can find.
    await book.save(Records((*records.known, record), records.unknown))
    try:
        plugged = await state.add_interface(
            desc,
            model=conf.model,
            netns_path=env.netns,
            queues=conf.queues,
            wait_guest=conf.wait_guest,
            endpoint_id=endpoint_id,
        )
    except BaseException:
        await _forget_failed_add(book, records, state)
        raise
    return chained_result(conf, env, sandbox_mac(plugged), mtu)


async def _add_main(
    req: Request,
    book: Book,
    records: Records,
    state: NetworkState,
    *,
    mac: str,
    given: Mapping[str, Any] | None,
) -> dict[str, Any]:
    env, conf = req.env, req.conf
    mac = mac or req.mac() or random_mac()
    # an address an earlier ADD took (a pending attachment) is the DEL's to release
    got = given if given is not None else (await ipam(req, "ADD") if conf.ipam else None)
    record = Attachment(
        network=conf.name,
        container_id=env.container_id,
        ifname=env.ifname,
        netns=env.netns,
        mac=mac,
        qmp_socket=state.qmp_path,
        ipam=conf.ipam is not None,
    )
    try:
        addrs = ips_of(got, None) if got else ()
        desc = InterfaceDescription(
            device=env.ifname,
            name=env.ifname,
            hw_addr=mac,
            mtu=conf.mtu,
            ip_addresses=addrs,
            link_type="tap",
            bandwidth=req.bandwidth(),
        )
        await book.save(Records((*records.known, record), records.unknown))
        await state.add_interface(
            desc,
            model=InterworkingModel.NONE,
            netns_path=env.netns,
            tap_name=env.ifname,
            queues=conf.queues,
            wait_guest=conf.wait_guest,
        )
    except BaseException:
        await _forget_failed_add(book, records, state)
        if conf.ipam and given is None:
            try:
                await ipam(req, "DEL")
            except CniError as err:
                log.error("releasing the address of %s after a failed ADD: %s", env.ifname, err)
        raise
    return main_result(conf, env, mac, got)


async def _forget_failed_add(book: Book, records: Records, state: NetworkState) -> None:
    """Drop the record of an ADD that undid itself; keep it when its undo could not finish
    (the journal still holds the plug), so the runtime's DEL finds the VM and settles it."""
    if not state.store.journal():
        await book.save(records)


async def cmd_del(req: Request) -> None:
    """Unplug and forget; every "already gone" is success, as the spec demands."""
    conf = req.conf
    if await req.vms.cancel(req):
        log.info("%s of container %s was pending: dropped", req.env.ifname, req.env.container_id)
    if req.state_dir.is_dir():
        book = Book(req.state_dir)
        async with book.locked():
            records = book.load()
            found = records.find(req.key)
            qmp = found.qmp_socket if found else ""
            state = await req.vms.state(req.state_dir, qmp, conf.config())
            if found is not None:
                await unplug(req, found, req.state_dir, conf.config())
                await book.save(records.without(found))
            await book.remove_if_unused(state)
    if conf.main and conf.ipam:
        await ipam(req, "DEL")


async def cmd_check(req: Request) -> None:
    """The attachment is recorded, in qmpnet's state, in QEMU with its MAC, and on the host."""
    env, conf = req.env, req.conf
    check_netns(env.netns)
    deferred = req.vms.deferred(req)
    if deferred is not None:
        status, why = deferred
        if status is Deferred.PENDING:
            raise CniError(
                Code.CHECK_PENDING,
                f"{env.ifname} of container {env.container_id} is pending: its VM is not there yet",
                why,
            )
        raise CniError(
            Code.CHECK_PLUG_FAILED,
            f"{env.ifname} of container {env.container_id} was pending and its plug failed",
            why,
        )
    book = Book(req.state_dir)
    if not book.path.exists():
        raise CniError(
            Code.CHECK_FAILED, f"no attachment of {env.ifname} is recorded in {req.state_dir}"
        )
    async with book.locked():
        found = book.load().find(req.key)
        if found is None:
            raise CniError(
                Code.CHECK_FAILED,
                f"no attachment of {env.ifname} to network {conf.name} is recorded",
            )
        state = await req.vms.state(req.state_dir, found.qmp_socket, conf.config())
        entry = _entry_for(state, found.mac)
        if entry is None or entry.status is not Status.PLUGGED:
            raise CniError(
                Code.CHECK_FAILED,
                f"qmpnet's state has no plugged NIC with MAC {found.mac} for {env.ifname}",
            )
        await _check_qemu(state, entry.endpoint, found.mac)
        await _check_host(entry.endpoint, found, conf.main)
    _check_prev_result(conf, env, entry.endpoint, found)
    if conf.main and conf.ipam:
        await ipam(req, "CHECK")


def _check_prev_result(conf: NetConf, env: Env, endpoint: Endpoint, found: Attachment) -> None:
    """prevResult (what ADD returned) must still describe the attachment: its MAC, and in
    main mode the addresses the VM's NIC was given."""
    index, prev = prev_interface(conf, env)
    if prev is None:
        return
    # main mode reports the VM NIC's MAC (the tap is only its wire); chained the link's
    expected = found.mac if conf.main else (found.reported_mac or sandbox_mac(endpoint))
    if str(prev.get("mac", expected)).lower() != expected:
        raise CniError(
            Code.CHECK_FAILED,
            f"prevResult gives {env.ifname} MAC {prev.get('mac')}, it has {expected}",
        )
    if conf.main:
        given = {a.cidr for a in ips_of(conf.prev_result or {}, index)}
        info = endpoint.properties
        have = {a.cidr for a in info.addrs} if info is not None else set()
        if given != have:
            raise CniError(
                Code.CHECK_FAILED,
                f"prevResult gives {env.ifname} the addresses "
                f"{sorted(given)}, the VM's NIC was given {sorted(have)}",
            )


async def _check_qemu(state: NetworkState, endpoint: Endpoint, mac: str) -> None:
    if endpoint.tap is None:
        raise CniError(Code.CHECK_FAILED, f"{endpoint.name} is not a hot-plugged NIC")
    async with state.hypervisor() as hv:
        dev = device_id(endpoint.tap)
        if dev not in await hv.peripheral_ids():
            raise CniError(Code.CHECK_FAILED, f"QEMU has no device {dev} for {endpoint.name}")
        got = str(await hv.qmp.qom_get(f"/machine/peripheral/{dev}", "mac")).lower()
    if got != mac:
        raise CniError(Code.CHECK_FAILED, f"QEMU's device {dev} has MAC {got}, not {mac}")


async def _check_host(endpoint: Endpoint, found: Attachment, main: bool) -> None:
    names = [host_link(endpoint)] if main else [found.ifname, host_link(endpoint)]
    async with Links.open(found.netns) as links:
        for name in filter(None, names):
            if await links.lookup(name) is None:
                raise CniError(Code.CHECK_FAILED, f"{name} is missing from {found.netns}")


async def cmd_status(req: Request) -> None:
    """Ready when taps can be made and, in main mode, the IPAM plugin is there and ready."""
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise CniError(
            Code.NOT_AVAILABLE,
            f"plugin not available: {TUN_PATH}: {err.strerror}",
            "qmpnet needs the tun driver to make taps",
        ) from err
    os.close(fd)
    if req.conf.main and req.conf.ipam:
        try:
            find_plugin(req.conf.ipam_type, req.env.path)
        except CniError as err:
            raise CniError(
                Code.NOT_AVAILABLE, f"plugin not available: {err.msg}", err.details
            ) from err
        try:
            await ipam_config(req)
        except CniError as err:
            raise CniError(
                Code.NOT_AVAILABLE, f"plugin not available: {err.msg}", err.details
            ) from err
        if await ipam_speaks(req, LATEST):
            await ipam(req, "STATUS")


def state_dirs(template: str) -> Iterator[tuple[Path, str]]:
    """Every existing state directory the template names, with its container id."""
    prefix, _, suffix = template.partition(CONTAINER_ID)
    for found in sorted(glob.glob(glob.escape(prefix) + "*" + glob.escape(suffix))):
        container = found[len(prefix) : len(found) - len(suffix)]
        if NAME_RE.fullmatch(container) and os.path.isdir(found):
            yield Path(found), container


async def cmd_gc(req: Request) -> None:
    """Unplug this network's attachments that are not in the valid list; the rest stays."""
    conf = req.conf
    if conf.valid_attachments is None:
        raise bad_config(GC_KEYS[0], None, "GC needs the list of valid attachments")
    valid = set(conf.valid_attachments)
    failures: list[CniError] = []
    for dropped in await req.vms.collect(conf.name, valid):
        log.info("GC dropped the pending %s of container %s", dropped.ifname, dropped.container_id)
        if dropped.ipam and conf.main and conf.ipam:
            try:
                await ipam_release(req, dropped)
            except QmpnetError as err:
                failures.append(to_cni_error(err))
    for directory, _ in state_dirs(conf.state_dir):
        try:
            await _gc_directory(req, directory, valid, failures)
        except QmpnetError as err:  # one broken directory must not stop the others
            failures.append(to_cni_error(err))
    if conf.main and conf.ipam and await ipam_speaks(req, LATEST):
        await ipam(req, "GC")
    if failures:
        raise CniError(
            failures[0].code,
            f"GC could not remove {len(failures)} attachment(s): " + failures[0].msg,
            "; ".join(f.msg for f in failures),
        )


async def _gc_directory(
    req: Request, directory: Path, valid: set[tuple[str, str]], failures: list[CniError]
) -> None:
    conf = req.conf
    book = Book(directory)
    async with book.locked():
        records = book.load()
        for found in records.known:
            if found.network != conf.name or (found.container_id, found.ifname) in valid:
                continue
            try:
                await unplug(req, found, directory, conf.config())
                if found.ipam and conf.main and conf.ipam:
                    await ipam_release(req, found)
            except QmpnetError as err:
                failures.append(to_cni_error(err))
                continue
            records = records.without(found)
            await book.save(records)
            log.info("GC removed %s of container %s", found.ifname, found.container_id)
        await book.remove_if_unused(await req.vms.state(directory, "", conf.config()))


def cmd_version(raw: bytes) -> dict[str, Any]:
    return version_answer(raw)


#: CNI_COMMAND -> its handler; VERSION needs no configuration and is answered before.
COMMANDS: Mapping[str, Callable[[Request], Coroutine[Any, Any, dict[str, Any] | None]]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}
