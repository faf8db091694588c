"""Hostile and bad input: typed errors naming field and value, nothing made, nothing touched.

Property-based (hypothesis) over every parser that reads outside data: the interface JSON,
the TOML configuration, the saved state and the journal. Whatever comes in, the result is a
value or the typed error (``InvalidInputError`` naming the field and the value, ``StateError``
naming the file), never another exception, and the host's links and netns are as before.

Then the host-facing promises: a requested tap name that is already a link is refused and the
link left exactly as it was; links qmpnet makes carry its mark and delete refuses unmarked
ones; the state directory is 0700 and its files 0600; a QMP path that is not a socket is
refused; and there is no shell anywhere in the package.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import stat
import subprocess
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmpnet
from qmpnet.config import Config
from qmpnet.errors import (
    InvalidInputError,
    LinkExistsError,
    NetnsError,
    NotOursError,
    PlugError,
    QmpConnectError,
    StateError,
)
from qmpnet.links import Links
from qmpnet.marks import claimed_owner
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.network import NetworkState
from qmpnet.qmp import QmpSession
from qmpnet.reconcile import reconcile
from qmpnet.store import Store
from qmpnet.testing.guest import GuestImage
from qmpnet.testing.probe import journal_file, link_fingerprint, marked_links, netns_names
from qmpnet.testing.probe import links as ip_links
from qmpnet.testing.scene import RUN, make_sandbox
from qmpnet.testing.vm import GuestVM

PROPERTY = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)

bad_names = st.one_of(
    st.text(min_size=16, max_size=40),
    st.binary(min_size=16, max_size=20).map(lambda b: b.hex()[:16]),
    st.builds(
        lambda a, sep, b: a + sep + b,
        st.text(max_size=5),
        st.sampled_from(["/", "\0", " ", "\t", "\n", ":"]),
        st.text(max_size=5),
    ),
    st.just("."),
    st.just(".."),
    st.text(alphabet="é", min_size=8, max_size=8),
)
bad_macs = st.one_of(
    st.just("00:00:00:00:00:00"),
    st.builds(
        lambda b, rest: f"{b | 1:02x}:" + ":".join(f"{x:02x}" for x in rest),
        st.integers(0, 255),
        st.lists(st.integers(0, 255), min_size=5, max_size=5),
    ),
    st.text(max_size=20).filter(lambda t: t != ""),
)
bad_mtus = st.one_of(
    st.integers(max_value=67), st.integers(min_value=65536), st.booleans(), st.floats(), st.text()
)
bad_addresses = st.one_of(
    st.tuples(st.just(4), st.sampled_from(["300.1.1.1", "1.2.3", "::1", "x", ""]), st.just("24")),
    st.tuples(
        st.just(4),
        st.just("10.0.0.1"),
        st.one_of(st.integers(33, 10**6).map(str), st.sampled_from(["-1", "", "a", "²", "24.0"])),
    ),
    st.tuples(st.just(6), st.sampled_from(["fd00::1::2", "10.0.0.1", "gggg::1"]), st.just("64")),
    st.tuples(st.just(6), st.just("fd00::1"), st.integers(129, 10**6).map(str)),
    st.tuples(st.sampled_from([5, -1, 7]), st.just("10.0.0.1"), st.just("24")),
)


@pytest.fixture
def host_unchanged() -> Iterator[None]:
    """Nothing created, deleted or changed on the host while the test ran."""
    links_before = {n: link_fingerprint(v) for n, v in ip_links().items() if n.startswith(RUN)}
    ns_before = {n for n in netns_names() if n.startswith(RUN)}
    yield
    assert {
        n: link_fingerprint(v) for n, v in ip_links().items() if n.startswith(RUN)
    } == links_before
    assert {n for n in netns_names() if n.startswith(RUN)} == ns_before


def _names_field(err: InvalidInputError, fields: set[str]) -> None:
    assert isinstance(err.field, str)
    assert err.field
    assert err.field in fields, err.field
    assert err.field in str(err)


# --- interface JSON ----------------------------------------------------------------------------

INTERFACE_FIELDS = {*InterfaceDescription.JSON_KEYS, "interface", "family", "address", "mask"}


@PROPERTY
@given(
    data=st.one_of(
        json_values,
        st.dictionaries(
            st.sampled_from([*InterfaceDescription.JSON_KEYS, "bogus"]), json_values, max_size=6
        ),
    )
)
def test_interface_json_any_value(host_unchanged: None, data: Any) -> None:
    try:
        InterfaceDescription.from_json(data)
    except InvalidInputError as err:
        _names_field(err, INTERFACE_FIELDS)


@PROPERTY
@given(field=st.sampled_from(["name", "device"]), value=bad_names)
def test_interface_bad_names(host_unchanged: None, field: str, value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        InterfaceDescription.from_json({field: value})
    assert info.value.field == field
    assert info.value.value == value


@PROPERTY
@given(value=bad_macs)
def test_interface_bad_macs(host_unchanged: None, value: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        InterfaceDescription.from_json({"name": "eth0", "hwAddr": value})
    assert info.value.field == "hwAddr"
    assert str(info.value.value) == value.lower()  # MACs are normalised to lower case first


@PROPERTY
@given(value=bad_mtus)
def test_interface_bad_mtus(host_unchanged: None, value: Any) -> None:
    with pytest.raises(InvalidInputError) as info:
        InterfaceDescription.from_json({"name": "eth0", "mtu": value})
    assert info.value.field == "mtu"
    assert info.value.value == value or info.value.value != info.value.value  # NaN


@PROPERTY
@given(addr=bad_addresses)
def test_interface_bad_addresses(host_unchanged: None, addr: tuple[int, str, str]) -> None:
    family, address, mask = addr
    with pytest.raises(InvalidInputError) as info:
        InterfaceDescription.from_json(
            {"name": "eth0", "IPAddresses": [{"family": family, "address": address, "mask": mask}]}
        )
    assert info.value.field in ("family", "address", "mask")
    assert info.value.value in (family, address, mask)


def test_unknown_endpoint_type_and_model_are_named() -> None:
    with pytest.raises(InvalidInputError) as info:
        InterworkingModel.parse("vxlan")
    assert info.value.field == "interworking model"
    assert info.value.value == "vxlan"
    with pytest.raises(InvalidInputError) as info:
        InterfaceDescription.from_json({"name": "eth0", "linkType": 7})
    assert info.value.field == "linkType"


# --- TOML configuration ------------------------------------------------------------------------

CONFIG_FIELDS = {
    "config file",
    "config key",
    "network",
    "internetworking_model",
    "interworking model",
    "disable_vhost_net",
    "queues",
    "tap_name",
    "timeouts",
    "timeouts key",
    *(f"timeouts.{k}" for k in ("connect", "command", "unplug", "guest_ready")),
}

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=12),
)
config_tables = st.dictionaries(
    st.sampled_from(
        ["internetworking_model", "disable_vhost_net", "queues", "tap_name", "timeouts", "bogus"]
    ),
    st.one_of(
        toml_scalars,
        st.sampled_from(
            ["tcfilter", "macvtap", "none", "tap{idx}_x", "{idx}{0}", "{idx:>99}", "{idx"]
        ),
        st.integers(0, 300),
        st.dictionaries(
            st.sampled_from(["connect", "command", "unplug", "guest_ready", "x"]),
            toml_scalars,
            max_size=3,
        ),
    ),
    max_size=5,
)


def _toml(table: dict[str, Any]) -> str:
    lines, sub = ["[network]"], []
    for key, value in table.items():
        if isinstance(value, dict):
            sub.append("[network.timeouts]" if key == "timeouts" else f"[network.{key}]")
            sub.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines + sub) + "\n"


@PROPERTY
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        config_tables.map(_toml).map(str.encode),
    )
)
def test_config_file_any_content(
    host_unchanged: None, tmp_path_factory: pytest.TempPathFactory, content: bytes
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "qmpnet.toml"
    path.write_bytes(content)
    try:
        Config.load(path)
    except InvalidInputError as err:
        _names_field(err, CONFIG_FIELDS)


@PROPERTY
@given(table=config_tables)
def test_config_mapping(host_unchanged: None, table: dict[str, Any]) -> None:
    try:
        config = Config.from_mapping(table)
    except InvalidInputError as err:
        _names_field(err, CONFIG_FIELDS)
    else:
        assert 0 <= config.queues <= 256
        assert config.timeouts.unplug > 0


def test_config_queues_zero_huge_and_file_missing(tmp_path: Path) -> None:
    assert Config.from_mapping({"queues": 0}).queues == 0
    for value in (100_000, -1, True, 1.5):
        with pytest.raises(InvalidInputError) as info:
            Config.from_mapping({"queues": value})
        assert info.value.field == "queues"
    with pytest.raises(InvalidInputError) as info:
        Config.load(tmp_path / "missing.toml")
    assert info.value.field == "config file"
    (tmp_path / "bad.toml").write_text("[network\nqueues = ")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        Config.load(tmp_path / "bad.toml")
    assert tomllib  # the parser under test is the standard one


# --- saved state and journal -------------------------------------------------------------------


def _endpoint_like() -> st.SearchStrategy[Any]:
    tap = st.fixed_dictionaries(
        {
            "id": st.sampled_from(["qn0123456789", "x", 5]),
            "name": st.sampled_from(["eth0", "x" * 20, 3]),
            "tap_iface": st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["tap0", "a/b", ""]),
                    "hard_addr": st.sampled_from(["52:54:00:00:00:01", "ff:ff:ff:ff:ff:ff", ""]),
                }
            ),
        }
    )
    return st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"type": st.sampled_from(["tap", "virtual", "wireguard", 1]), "tap_interface": tap}
        ),
    )


state_docs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "version": st.sampled_from([1, 2, "1", None]),
            "endpoints": st.lists(
                st.one_of(
                    json_values,
                    st.fixed_dictionaries(
                        {
                            "status": st.sampled_from(["plugged", "unplug-pending", "gone", 3]),
                            "endpoint": _endpoint_like(),
                        }
                    ),
                ),
                max_size=4,
            ),
        }
    ),
)
journal_docs = st.one_of(
    json_values,
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "operation": json_values,
                    "step": json_values,
                    "endpoint": _endpoint_like(),
                    "started": json_values,
                }
            ),
        ),
        max_size=3,
    ),
)


def _attempt(read: Callable[[], Any]) -> tuple[Any, StateError | None]:
    try:
        return read(), None
    except StateError as err:
        return None, err


@PROPERTY
@given(doc=state_docs, raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_state_file_any_content(
    host_unchanged: None, tmp_path_factory: pytest.TempPathFactory, doc: Any, raw: bytes | None
) -> None:
    store = Store(tmp_path_factory.mktemp("st"))
    store.dir.mkdir(exist_ok=True)
    store.state_path.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    snap, err = _attempt(store.load)
    if err is not None:
        assert err.path == str(store.state_path)
        return
    assert snap is not None
    # whatever could not be read is kept verbatim when the state is written back
    asyncio.run(store.save(snap))
    again = store.load()
    assert again == snap
    assert [u.raw for u in again.unknown] == [u.raw for u in snap.unknown]


@PROPERTY
@given(doc=journal_docs, raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_journal_file_any_content(
    host_unchanged: None, tmp_path_factory: pytest.TempPathFactory, doc: Any, raw: bytes | None
) -> None:
    store = Store(tmp_path_factory.mktemp("jr"))
    store.dir.mkdir(exist_ok=True)
    store.journal_path.write_bytes(raw if raw is not None else json.dumps(doc).encode())
    records, err = _attempt(store.journal)
    if err is not None:
        assert err.path == str(store.journal_path)
        return
    assert records is not None
    assert set(records) == (set(doc) if isinstance(doc, dict) and raw is None else set(records))


# --- add_interface refuses bad input before it touches anything --------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"queues": 100_000}, InvalidInputError, "queues"),
        ({"queues": -2}, InvalidInputError, "queues"),
        ({"tap_name": "a-name-longer-than-15"}, InvalidInputError, "tap name"),
        ({"tap_name": "bad/name"}, InvalidInputError, "tap name"),
        ({"netns_path": "/run/netns/does-not-exist"}, NetnsError, "No such file"),
        ({"netns_path": "/etc/hostname"}, NetnsError, "not a namespace file"),
        ({"netns_path": "/proc/self/ns/uts"}, NetnsError, "not a network namespace"),
    ],
    ids=[
        "queues-huge",
        "queues-negative",
        "tap-long",
        "tap-slash",
        "netns-missing",
        "netns-regular-file",
        "netns-not-net",
    ],
)
async def test_add_interface_refuses_before_anything(
    host_unchanged: None, tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], field: str
) -> None:
    # The QMP path does not exist: a check that came after connecting would say so instead.
    state = NetworkState.open(tmp_path / "state", str(tmp_path / "no.sock"))
    with pytest.raises(error) as info:
        await state.add_interface(
            InterfaceDescription(name="eth1"), model=InterworkingModel.NONE, **kwargs
        )
    assert field in (getattr(info.value, "field", "") or str(info.value))
    assert not (tmp_path / "state" / "state.json").exists()
    assert journal_file(tmp_path / "state") is None


# --- the host: refuse taken names, mark our links, refuse to delete others ---------------------


@pytest.fixture
def taken(host_link_names: Callable[[str], str]) -> str:
    """A host link that is not qmpnet's (a veth with its own MTU and MAC)."""
    name = host_link_names("x")
    subprocess.run(
        ["ip", "link", "add", name, "mtu", "1400", "type", "veth", "peer", "name", name + "p"],
        check=True,
    )
    subprocess.run(["ip", "link", "set", name, "address", "02:00:00:00:00:99"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    return name


@pytest.mark.asyncio
async def test_taken_tap_name_is_refused_and_untouched_and_marks_are_checked(
    taken: str,
    guest_image: GuestImage,
    tmp_path: Path,
    host_link_names: Callable[[str], str],
    make_netns: Callable[[], str],
) -> None:
    original = link_fingerprint(ip_links()[taken])
    vm = await GuestVM.start(guest_image, tmp_path, paused=True, root_ports=2, name=f"{RUN}-hi")
    try:
        state = NetworkState.open(
            tmp_path / "state", str(vm.mgmt_qmp_path), Config(queues=1, tap_name=f"{RUN}h{{idx}}")
        )
        with pytest.raises(PlugError) as info:
            await state.add_interface(
                InterfaceDescription(name="eth1"), model=InterworkingModel.NONE, tap_name=taken
            )
        assert info.value.step == "open-queues"
        assert isinstance(info.value.cause, LinkExistsError)
        assert taken in str(info.value.cause)
        assert link_fingerprint(ip_links()[taken]) == original, "left exactly as it was"

        mine = host_link_names("m")
        ep = await state.add_interface(
            InterfaceDescription(name="eth1"), model=InterworkingModel.NONE, tap_name=mine
        )
        assert claimed_owner(ip_links()[mine]["ifalias"]) == ep.id
        netns = make_netns()
        make_sandbox(netns, "eth2", "52:54:00:00:04:41")
        pair = await state.add_interface(InterfaceDescription(name="eth2"), netns_path=netns)
        inside = ip_links(netns)
        marked = {n for n, v in inside.items() if claimed_owner(v.get("ifalias", "")) == pair.id}
        assert marked == {getattr(pair, "tap_name", "")}, "the tap it made carries the mark"
        assert "ifalias" not in inside["eth2"], "the CNI's link is not claimed"

        async with Links.open() as links:
            with pytest.raises(NotOursError):
                await links.delete(taken)
            with pytest.raises(NotOursError):
                await links.delete(mine, owner="qn0000000000")
        assert taken in ip_links()
        assert mine in ip_links()
        # The paused guest cannot release NICs: end the VM, and reconcile cleans up after it,
        # again without touching the link that is not ours.
        await vm.stop()
        report = await reconcile(state)
        assert report.ok, report.lines()
        assert mine not in ip_links()
        assert not marked_links(netns)
        assert link_fingerprint(ip_links()[taken]) == original
    finally:
        await vm.stop()


# --- files and sockets -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_state_dir_0700_files_0600(tmp_path: Path) -> None:
    loose = tmp_path / "state"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    store = Store(loose)
    async with store.locked():
        await store.save(store.load())
        from qmpnet.endpoints import create_tap_endpoint

        ep = create_tap_endpoint(0, "eth0", tap_name="t0")
        await store.journal_begin(ep.id, "hot-plug", "validate", ep, 0.0)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in loose.iterdir()}
        await store.journal_end(ep.id)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert modes == {"state.json": 0o600, "journal.json": 0o600, "lock": 0o600, "mark.key": 0o600}


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["regular-file", "directory", "missing"])
async def test_qmp_path_that_is_not_a_socket_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "qmp.sock"
    if kind == "regular-file":
        path.write_text("not a socket")
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(QmpConnectError) as info:
        await QmpSession.connect(str(path), connect_timeout=30)
    assert info.value.path == str(path)
    if kind == "missing":
        assert isinstance(info.value.__cause__, FileNotFoundError)
    else:
        assert "not a unix socket" in str(info.value)
    state = NetworkState.open(tmp_path / "state", str(path))
    with pytest.raises(QmpConnectError):
        await state.add_interface(
            InterfaceDescription(name="eth1"), model=InterworkingModel.NONE, tap_name=f"{RUN}zz"
        )
    assert f"{RUN}zz" not in ip_links()


def test_no_shell_anywhere() -> None:
    """No shell=True, os.system, os.popen or string-command helpers in the package."""
    root = Path(qmpnet.__file__).parent
    banned_attrs = {
        ("os", "system"),
        ("os", "popen"),
        ("subprocess", "getoutput"),
        ("subprocess", "getstatusoutput"),
        ("os", "execl"),
        ("os", "spawnl"),
    }
    found = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    found.append(f"{path}:{node.lineno} shell=")
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in banned_attrs
            ):
                found.append(f"{path}:{node.lineno} {func.value.id}.{func.attr}")
    assert found == []
    text = "\n".join(p.read_text() for p in root.rglob("*.py"))
    assert "/bin/sh" not in text
