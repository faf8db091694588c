"""Saved state: every endpoint type round-trips through JSON and through the Store.

The strategies are built from the registry, one per registered type, from its attrs fields:
a new type or field without a strategy fails here instead of going untested. The Store must
keep what it cannot read (an unknown type, a bad status, even a non-object) verbatim, report
it, and write it back unchanged.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpnet.codec import UnknownEntry, dump_endpoint, load_endpoint
from qmpnet.endpoints import (
    REGISTRY,
    Endpoint,
    MacvlanEndpoint,
    MacvtapEndpoint,
    create_endpoint,
    net_info_from_interface,
)
from qmpnet.endpoints.netpair import FoundLink
from qmpnet.errors import StateError
from qmpnet.model import (
    EndpointType,
    InterfaceDescription,
    InterworkingModel,
    IPAddress,
    LinkAttrs,
    NetworkInfo,
    NetworkInterface,
    NetworkInterfacePair,
    Route,
    TapInterface,
)
from qmpnet.store import Entry, Snapshot, Status, Store

# --- strategies: valid values of every model type --------------------------------------------

ifname = st.from_regex(r"[a-z][a-z0-9_.-]{0,14}", fullmatch=True).filter(
    lambda n: n not in (".", "..")
)
mac = st.binary(min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in bytes([b[0] & 0xFE | 0x02]) + b[1:])
)
ipv4 = st.builds(
    lambda a, m: IPAddress(family=4, address=str(a), mask=str(m)),
    st.ip_addresses(v=4),
    st.integers(0, 32),
)
ipv6 = st.builds(
    lambda a, m: IPAddress(family=6, address=str(a), mask=str(m)),
    st.ip_addresses(v=6),
    st.integers(0, 128),
)
addrs = st.lists(ipv4 | ipv6, max_size=3).map(tuple)
route = st.builds(
    Route,
    dest=st.text(max_size=20),
    gateway=st.text(max_size=20),
    device=st.text(max_size=15),
    source=st.text(max_size=20),
    scope=st.integers(0, 255),
)
net_info = st.builds(
    NetworkInfo,
    iface=st.builds(
        LinkAttrs, name=ifname, hardware_addr=st.just("") | mac, mtu=st.integers(68, 65535)
    ),
    link_type=st.text(max_size=12),
    addrs=addrs,
    routes=st.lists(route, max_size=2).map(tuple),
)
iface = st.builds(
    NetworkInterface, name=st.just("") | ifname, hard_addr=st.just("") | mac, addrs=addrs
)
ids = st.from_regex(r"qn[0-9a-f]{10}", fullmatch=True)
tap_interface = st.builds(TapInterface, id=ids, name=st.just("") | ifname, tap_iface=iface)
pair = st.builds(
    NetworkInterfacePair,
    tap_interface=tap_interface,
    virt_iface=iface,
    model=st.sampled_from(list(InterworkingModel)),
)
pci_path = st.just("") | st.lists(st.integers(0, 31), min_size=1, max_size=8).map(
    lambda slots: "/".join(f"{s:02x}" for s in slots)
)

#: field name -> strategy; every field of every registered endpoint class must be here.
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "net_pair": pair,
    "tap_interface": tap_interface,
    "iface": iface,
    "endpoint_id": ids,
    "properties": st.none() | net_info,
    "pci_path": pci_path,
    "netns_path": st.text(max_size=30),
    "queues": st.integers(0, 256),
    "found": st.none() | st.builds(FoundLink, index=st.integers(1, 2**31 - 1), up=st.booleans()),
}


def endpoint_strategy(cls: type[Any]) -> st.SearchStrategy[Endpoint]:
    missing = [f.name for f in attrs.fields(cls) if f.name not in FIELDS]
    assert not missing, f"{cls.__name__}: no strategy for fields {missing}"
    return st.builds(cls, **{f.name: FIELDS[f.name] for f in attrs.fields(cls)})


endpoints = st.one_of(*[endpoint_strategy(cls) for cls in REGISTRY.values()])


def test_every_endpoint_type_is_registered() -> None:
    assert set(REGISTRY) == set(EndpointType)
    for kind, cls in REGISTRY.items():
        assert cls.type is kind


@pytest.mark.parametrize("kind", list(EndpointType))
@settings(max_examples=40)
@given(data=st.data())
def test_each_type_round_trips_through_json(kind: EndpointType, data: st.DataObject) -> None:
    endpoint = data.draw(endpoint_strategy(REGISTRY[kind]))
    dumped = dump_endpoint(endpoint)
    assert dumped["type"] == kind.value
    text = json.dumps(dumped)
    assert "vm_fds" not in text
    assert "vhost_fds" not in text
    loaded = load_endpoint(json.loads(text))
    assert type(loaded) is type(endpoint)
    assert loaded == endpoint
    assert dump_endpoint(loaded) == dumped


@given(endpoints, st.data())
def test_load_never_raises_on_damaged_entries(endpoint: Endpoint, data: st.DataObject) -> None:
    """Drop, retype or replace one field: the answer is an endpoint or an UnknownEntry."""
    dumped = dump_endpoint(endpoint)
    key = data.draw(st.sampled_from(sorted(dumped)))
    junk = data.draw(
        st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2)
    )
    replace = data.draw(st.booleans())
    damaged = {**dumped, key: junk} if replace else {k: v for k, v in dumped.items() if k != key}
    loaded = load_endpoint(damaged)
    if isinstance(loaded, UnknownEntry):
        assert loaded.raw is damaged
        assert loaded.reason
    else:
        assert isinstance(loaded, REGISTRY[EndpointType(damaged["type"])])
        if replace:  # accepted as it was, never coerced (no "[1]" from [1], no 2 from "2")
            assert dump_endpoint(loaded) == damaged


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "vxlan", "vni": 42},
        {"type": None},
        {"name": "eth0"},
        [1, 2],
        "tap",
        7,
        None,
        {"type": "tap", "tap_interface": {"id": "qn1", "name": "eth0"}, "extra": 1},
        {"type": "virtual", "net_pair": {}},
    ],
)
def test_unreadable_entries_come_back_verbatim(raw: Any) -> None:
    loaded = load_endpoint(raw)
    assert isinstance(loaded, UnknownEntry)
    assert loaded.raw is raw
    if isinstance(raw, dict) and raw.get("type") == "vxlan":
        assert "Unknown endpoint type vxlan" in loaded.reason


# --- the Store ---------------------------------------------------------------------------------


def _cni_endpoint(link_type: str, mac_addr: str) -> Endpoint:
    desc = InterfaceDescription(
        name="eth1",
        hw_addr=mac_addr,
        link_type=link_type,
        ip_addresses=(IPAddress(family=4, address="169.254.3.2", mask="24"),),
    )
    info = net_info_from_interface(desc, InterworkingModel.TCFILTER)
    endpoint = create_endpoint(
        info, 1, InterworkingModel.TCFILTER, netns_path="/run/netns/pod1", tap_name="tap1_kata"
    )
    return attrs.evolve(endpoint, pci_path="02/00")  # type: ignore[misc]


def test_macvlan_and_macvtap_survive_save_and_load(tmp_path: Path) -> None:
    """The reference implementation loses these two types on load; they must come back."""
    macvlan = _cni_endpoint("macvlan", "52:54:00:00:00:31")
    macvtap = _cni_endpoint("macvtap", "52:54:00:00:00:32")
    assert isinstance(macvlan, MacvlanEndpoint)
    assert isinstance(macvtap, MacvtapEndpoint)
    store = Store(tmp_path / "vm")
    snap = Snapshot((Entry(macvlan), Entry(macvtap, Status.UNPLUG_PENDING)))
    asyncio.run(store.save(snap))
    loaded = Store(tmp_path / "vm").load()
    assert loaded == snap
    assert loaded.unknown == ()
    assert [type(e.endpoint) for e in loaded.entries] == [MacvlanEndpoint, MacvtapEndpoint]


def test_unknown_entries_are_reported_and_written_back_unchanged(tmp_path: Path) -> None:
    store = Store(tmp_path / "vm")
    known = _cni_endpoint("veth", "52:54:00:00:00:33")
    future = {"status": "plugged", "endpoint": {"type": "vdpa", "dev": "vdpa0", "n": [1, 2]}}
    bad_status = {"status": "frozen", "endpoint": dump_endpoint(known)}
    odd_status = {"status": ["plugged"], "endpoint": dump_endpoint(known)}
    odd = ["not", "an", "object"]
    items = [
        {"status": "plugged", "endpoint": dump_endpoint(known)},
        future,
        bad_status,
        odd_status,
        odd,
        5,
    ]
    store.dir.mkdir(mode=0o700)
    store.state_path.write_text(json.dumps({"version": 1, "endpoints": items}))

    snap = store.load()
    assert [e.endpoint for e in snap.entries] == [known]
    assert [u.raw for u in snap.unknown] == [future, bad_status, odd_status, odd, 5]
    assert "Unknown endpoint type vdpa" in snap.unknown[0].reason
    assert "frozen" in snap.unknown[1].reason

    asyncio.run(store.save(snap))
    saved = json.loads(store.state_path.read_text())["endpoints"]
    assert saved[1:] == [future, bad_status, odd_status, odd, 5]
    assert store.load() == snap


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(endpoints, st.sampled_from(list(Status))), max_size=5))
def test_any_snapshot_survives_the_store(
    tmp_path: Path, entries: list[tuple[Endpoint, Status]]
) -> None:
    store = Store(tmp_path / "prop")
    snap = Snapshot(tuple(Entry(e, s) for e, s in entries))
    asyncio.run(store.save(snap))
    assert store.load() == snap


def test_files_are_private_and_writes_leave_no_temp_files(tmp_path: Path) -> None:
    directory = tmp_path / "vm"
    store = Store(directory)
    asyncio.run(store.save(Snapshot((Entry(_cni_endpoint("veth", "52:54:00:00:00:34")),))))
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.state_path).st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["state.json"]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", "not valid JSON"),
        ("[]", "not a qmpnet state file"),
        ('{"version": 2, "endpoints": []}', "version 2"),
    ],
)
def test_unreadable_state_file_is_a_state_error(tmp_path: Path, content: str, why: str) -> None:
    store = Store(tmp_path / "vm")
    store.dir.mkdir()
    store.state_path.write_text(content)
    with pytest.raises(StateError, match=why):
        store.load()


def test_missing_state_is_empty(tmp_path: Path) -> None:
    assert Store(tmp_path / "none").load() == Snapshot()


def test_journal_records_the_step_and_the_endpoint(tmp_path: Path) -> None:
    store = Store(tmp_path / "vm")
    macvlan = _cni_endpoint("macvlan", "52:54:00:00:00:35")
    asyncio.run(store.journal_begin(macvlan.id, "hot-plug", "netdev-add", macvlan, 12.5))
    record = store.journal()[macvlan.id]
    assert (record.operation, record.step, record.endpoint, record.started) == (
        "hot-plug",
        "netdev-add",
        macvlan,
        12.5,
    )
    asyncio.run(store.journal_end(macvlan.id))
    assert store.journal() == {}
    assert not store.journal_path.exists()


@pytest.mark.asyncio
async def test_lock_held_by_another_process_is_a_state_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "vm", lock_timeout=0.2)
    store.dir.mkdir(mode=0o700)
    fd = os.open(store.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: as another process
        with pytest.raises(StateError, match="holds the VM's lock"):
            async with store.locked():
                pass
    finally:
        os.close(fd)
    async with store.locked():  # free again
        pass


@pytest.mark.asyncio
async def test_lock_serializes_tasks(tmp_path: Path) -> None:
    store = Store(tmp_path / "vm")
    inside: list[int] = []
    overlap = []

    async def worker(n: int) -> None:
        async with store.locked():
            inside.append(n)
            overlap.append(len(inside))
            await asyncio.sleep(0.01)
            inside.remove(n)

    await asyncio.gather(*(worker(n) for n in range(4)))
    assert overlap == [1, 1, 1, 1]
