"""qmpnet-cni's boundary: environment and configuration parsing, error mapping, results.

No VM and no host changes here: these run :func:`qmpnet.cni.run` in-process with the exact
bytes and variables a runtime passes, and check the JSON that would go to stdout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qmpnet import cni
from qmpnet.cni import CniError, Code, Env, NetConf, Request
from qmpnet.errors import (
    ConnectFailure,
    HostError,
    InvalidInputError,
    NetnsError,
    PlugError,
    QmpCommandError,
    QmpConnectError,
    StateError,
    UnplugTimeoutError,
    UnsupportedError,
)
from qmpnet.model import InterworkingModel

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "br0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "vethx", "mac": "aa:bb:cc:00:00:02"},
        {"name": "eth0", "mac": "52:54:00:00:00:05", "sandbox": "/run/netns/p"},
    ],
    "ips": [{"interface": 2, "address": "169.254.5.100/24", "gateway": "169.254.5.1"}],
    "dns": {},
}


def environ(command: str = "ADD", **extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "pod1",
        "CNI_NETNS": "/run/netns/p",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v != "-"}


def conf(**fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "qmpnet-cni",
        "qmpSocket": "/run/vm/{containerId}/qmp2.sock",
        "prevResult": PREV,
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def raw(data: Any) -> bytes:
    return json.dumps(data).encode()


def run_error(stdin: bytes, env: dict[str, str]) -> dict[str, Any]:
    status, out = cni.run(stdin, env)
    assert status != 0
    reply = json.loads(out)
    assert set(reply) <= {"cniVersion", "code", "msg", "details"}
    assert isinstance(reply["msg"], str)
    assert reply["msg"]
    return reply


# --- environment ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_NETNS"),
        ("ADD", "CNI_IFNAME"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
        ("CHECK", "CNI_NETNS"),
    ],
)
def test_a_missing_required_variable_is_error_4(command: str, missing: str) -> None:
    reply = run_error(raw(conf()), environ(command, **{missing: "-"}))
    assert reply["code"] == 4
    assert missing in reply["msg"]


def test_del_does_not_need_the_netns() -> None:
    env = Env.from_environ(environ("DEL", CNI_NETNS="-"))
    assert env.netns == ""


@pytest.mark.parametrize(
    "env",
    [
        {"CNI_COMMAND": "ATTACH"},
        {"CNI_COMMAND": "-"},
        {"CNI_IFNAME": "a/b"},
        {"CNI_IFNAME": "x" * 16},
        {"CNI_CONTAINERID": "../etc"},
        {"CNI_CONTAINERID": "-lead"},
        {"CNI_NETNS": "relative/path"},
        {"CNI_ARGS": "IgnoreUnknown=1;novalue"},
    ],
)
def test_bad_environment_is_error_4(env: dict[str, str]) -> None:
    assert run_error(raw(conf()), environ(**env))["code"] == 4


def test_cni_args_are_key_value_pairs_and_unknown_keys_are_ignored() -> None:
    assert cni.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;QMPNET_QMP=/a=b;;") == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAME": "web",
        "QMPNET_QMP": "/a=b",
    }
    with pytest.raises(CniError) as info:
        cni.parse_cni_args("=x")
    assert info.value.code == Code.INVALID_ENV


def test_cni_path_is_split_like_path() -> None:
    env = Env.from_environ(environ(CNI_PATH="/opt/cni/bin::/usr/lib/cni"))
    assert env.path == ("/opt/cni/bin", "/usr/lib/cni")


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b"{not json", 6),
        (b"\xff\xfe", 6),
        (b"[1, 2]", 6),
        (b"", 6),
        (raw(conf(cniVersion="0.2.0")), 1),
        (raw(conf(cniVersion="2.0.0")), 1),
        (raw(conf(cniVersion=None)), 1),
        (raw(conf(name=None)), 7),
        (raw(conf(name="-bad")), 7),
        (raw(conf(type=None)), 7),
        (raw(conf(model="enlightened")), 7),
        (raw(conf(model="ovs")), 7),
        (raw(conf(queues=0.5)), 7),
        (raw(conf(queues=1000)), 7),
        (raw(conf(queues=True)), 7),
        (raw(conf(disableVhost="yes")), 7),
        (raw(conf(qmpSocket="relative.sock")), 7),
        (raw(conf(stateDir="/run/x")), 7),
        (raw(conf(stateDir="relative/{containerId}")), 7),
        (raw(conf(timeouts={"unplug": 0})), 7),
        (raw(conf(timeouts={"later": 1})), 7),
        (raw(conf(prevResult=None)), 7),
        (raw(conf(prevResult=[])), 7),
        (raw(conf(ipam={"type": "host-local"})), 7),
        (raw(conf(model="none", ipam={"type": "../bin/sh"}, prevResult=None)), 7),
        (raw(conf(model="none", mac="01:00:5e:00:00:01", prevResult=None)), 7),
        (raw(conf(model="none")), 7),
        (raw(conf(**{"cni.dev/valid-attachments": [{"containerID": 1}]})), 7),
    ],
)
def test_bad_configuration_gets_its_code(stdin: bytes, code: int) -> None:
    reply = run_error(stdin, environ())
    assert reply["code"] == code, reply


def test_error_json_speaks_the_configurations_version() -> None:
    reply = run_error(raw(conf(cniVersion="0.4.0", model="ovs")), environ())
    assert reply["cniVersion"] == "0.4.0"
    assert "ovs" in reply["msg"]
    assert run_error(b"{", environ())["cniVersion"] == cni.LATEST


@pytest.mark.parametrize(
    ("command", "version"), [("CHECK", "0.3.1"), ("STATUS", "1.0.0"), ("GC", "1.0.0")]
)
def test_commands_newer_than_the_configuration_are_refused(command: str, version: str) -> None:
    reply = run_error(raw(conf(cniVersion=version)), environ(command))
    assert reply["code"] == 1
    assert command in reply["msg"]


def test_a_good_configuration_is_parsed_once_into_typed_fields() -> None:
    data = conf(
        model="macvtap",
        queues=4,
        disableVhost=True,
        waitGuest=True,
        timeouts={"unplug": 20, "guestReady": 90},
        stateDir="/var/lib/q/{containerId}/net",
        logFile="/tmp/cni.log",
        runtimeConfig={"qmpSocket": "/vm/{containerId}.sock"},
        args={"labels": {}},
        capabilities={"qmpSocket": True},
        unknownKey="ignored",
    )
    parsed = NetConf.parse(raw(data), "ADD")
    assert parsed.model is InterworkingModel.MACVTAP
    assert (parsed.queues, parsed.disable_vhost, parsed.wait_guest) == (4, True, True)
    assert parsed.timeouts.unplug == 20
    assert parsed.timeouts.guest_ready == 90
    config = parsed.config()
    assert config.model is InterworkingModel.MACVTAP
    assert config.disable_vhost_net
    assert config.queues == 4
    assert not parsed.main
    assert parsed.raw == raw(data)


def test_model_default_means_tcfilter_and_none_is_main_mode() -> None:
    assert NetConf.parse(raw(conf()), "ADD").model is InterworkingModel.TCFILTER
    assert NetConf.parse(raw(conf(model="default")), "ADD").model is InterworkingModel.TCFILTER
    main = NetConf.parse(
        raw(conf(model="none", prevResult=None, ipam={"type": "host-local"})), "ADD"
    )
    assert main.main
    assert main.ipam_type == "host-local"


def test_del_without_prev_result_is_fine_in_chained_mode() -> None:
    assert NetConf.parse(raw(conf(prevResult=None)), "DEL").prev_result is None


def test_gc_takes_the_valid_attachments_under_either_key() -> None:
    items = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    for key in cni.GC_KEYS:
        parsed = NetConf.parse(raw(conf(cniVersion="1.1.0", **{key: items})), "GC")
        assert parsed.valid_attachments == (("a", "eth0"), ("b", "net1"))


# --- what the configuration and the environment resolve to ---------------------------------


def request(data: dict[str, Any], **env: str) -> Request:
    return Request(Env.from_environ(environ(**env)), NetConf.parse(raw(data), "ADD"))


def test_qmp_socket_comes_from_runtime_config_then_cni_args_then_the_template() -> None:
    template = conf()
    assert request(template).qmp_socket() == "/run/vm/pod1/qmp2.sock"
    args = "IgnoreUnknown=1;QMPNET_QMP=/args/{containerId}.sock"
    assert request(template, CNI_ARGS=args).qmp_socket() == "/args/pod1.sock"
    runtime = conf(runtimeConfig={"qmpSocket": "/rt/q.sock"})
    assert request(runtime, CNI_ARGS=args).qmp_socket() == "/rt/q.sock"
    with pytest.raises(CniError) as info:
        request(conf(qmpSocket=None)).qmp_socket()
    assert info.value.code == Code.INVALID_CONFIG
    with pytest.raises(CniError):
        request(template, CNI_ARGS="QMPNET_QMP=relative").qmp_socket()


def test_state_dir_is_per_container() -> None:
    assert request(conf()).state_dir == Path("/run/qmpnet/cni/pod1")
    assert request(conf(stateDir="/s/{containerId}/q")).state_dir == Path("/s/pod1/q")


def test_main_mode_mac_sources_are_checked() -> None:
    main = conf(model="none", prevResult=None, mac="52:54:00:AA:00:01")
    assert request(main).mac() == "52:54:00:aa:00:01"
    assert request(main, CNI_ARGS="MAC=52:54:00:aa:00:02").mac() == "52:54:00:aa:00:02"
    with pytest.raises(CniError) as info:
        request(main, CNI_ARGS="MAC=zz").mac()
    assert info.value.code == Code.INVALID_CONFIG
    assert request(conf(model="none", prevResult=None)).mac() == ""


def test_state_dirs_finds_every_container_of_the_template(tmp_path: Path) -> None:
    for name in ("pod1", "pod2", ".hidden-not-an-id"):
        (tmp_path / name / "net").mkdir(parents=True)
    (tmp_path / "pod3").mkdir()  # no "net" below: not a state dir
    found = list(cni.state_dirs(f"{tmp_path}/{{containerId}}/net"))
    assert found == [(tmp_path / "pod1" / "net", "pod1"), (tmp_path / "pod2" / "net", "pod2")]


# --- error mapping -------------------------------------------------------------------------


def _caused(err: BaseException, cause: BaseException) -> BaseException:
    err.__cause__ = cause
    return err


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (InvalidInputError("hwAddr", "x", "bad"), 7),
        (UnsupportedError("ipvlan endpoint x", "hot-plug", "no"), 102),
        (NetnsError("open netns", "/run/netns/x", 2), 3),
        (HostError("create link", "tap0", 17), 101),
        (StateError("/s", "write: No space left on device"), 5),
        (QmpCommandError("device_add", {}, "GenericError", "Bus 'rp0' not found"), 100),
        (_caused(QmpConnectError("/q", "cannot stat"), FileNotFoundError()), 100),
        (QmpConnectError("/q", "no such socket", ConnectFailure.ABSENT), 100),
        (QmpConnectError("/q", "no QMP greeting within 5 s", ConnectFailure.BUSY), 11),
        (UnplugTimeoutError("qn1-dev", 5), 11),
        (RuntimeError("boom"), 199),
    ],
)
def test_errors_map_onto_cni_codes(err: BaseException, code: int) -> None:
    mapped = cni.to_cni_error(err)
    assert mapped.code == code
    assert mapped.msg


def test_a_failed_step_keeps_its_causes_code_and_names_the_step() -> None:
    cause = QmpCommandError("device_add", {}, "GenericError", "no free slot")
    mapped = cni.to_cni_error(PlugError("hot-plug", "device-add", "eth0", cause))
    assert mapped.code == Code.QEMU
    assert "no free slot" in mapped.msg
    assert "device-add" in mapped.details
    pending = cni.to_cni_error(
        PlugError("unplug", "device-del", "eth0", UnplugTimeoutError("qn1-dev", 5))
    )
    assert pending.code == Code.TRY_AGAIN


def test_an_unexpected_exception_becomes_error_199_never_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(_req: Request) -> None:
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(cni.COMMANDS, "DEL", broken)  # type: ignore[index]
    reply = run_error(raw(conf()), environ("DEL"))
    assert reply["code"] == 199
    assert "ZeroDivisionError" in reply["msg"]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


def test_logs_reach_stderr_only_in_debug_mode(capsys: pytest.CaptureFixture[str]) -> None:
    run_error(raw(conf(model="ovs")), environ())
    assert capsys.readouterr().err == ""
    run_error(raw(conf(model="ovs")), environ(QMPNET_CNI_DEBUG="1"))
    assert "code 7" in capsys.readouterr().err


# --- results -------------------------------------------------------------------------------


def test_version_lists_the_supported_versions() -> None:
    status, out = cni.run(raw({"cniVersion": "1.0.0"}), {"CNI_COMMAND": "VERSION"})
    assert status == 0
    reply = json.loads(out)
    assert reply["cniVersion"] == "1.0.0"
    assert {"1.0.0", "1.1.0"} <= set(reply["supportedVersions"])
    status, out = cni.run(b"", {"CNI_COMMAND": "VERSION"})
    assert json.loads(out)["cniVersion"] == cni.LATEST


def test_chained_result_passes_prev_result_on_unchanged_when_it_lists_the_nic() -> None:
    parsed = NetConf.parse(raw(conf()), "ADD")
    env = Env.from_environ(environ())
    assert cni.chained_result(parsed, env, "52:54:00:00:00:05", 1500) == PREV


def test_chained_result_adds_the_nic_when_the_main_plugin_did_not_list_it() -> None:
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "169.254.5.9/24"}]}
    parsed = NetConf.parse(raw(conf(cniVersion="1.1.0", prevResult=prev)), "ADD")
    result = cni.chained_result(parsed, Env.from_environ(environ()), "52:54:00:00:00:05", 9000)
    assert result["interfaces"] == [
        {"name": "eth0", "mac": "52:54:00:00:00:05", "sandbox": "/run/netns/p", "mtu": 9000}
    ]
    assert result["ips"] == prev["ips"]
    assert "interfaces" not in prev  # the input is not modified


def test_main_result_reports_the_ipam_addresses_on_the_nic() -> None:
    parsed = NetConf.parse(
        raw(
            conf(
                model="none",
                prevResult=None,
                dns={"nameservers": ["x"]},
                ipam={"type": "host-local"},
            )
        ),
        "ADD",
    )
    got = {
        "cniVersion": "1.0.0",
        "ips": [{"address": "169.254.9.4/24", "gateway": "169.254.9.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    result = cni.main_result(parsed, Env.from_environ(environ()), "52:54:00:00:00:09", got)
    assert result == {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "52:54:00:00:00:09", "sandbox": "/run/netns/p"}],
        "ips": [{"address": "169.254.9.4/24", "gateway": "169.254.9.1", "interface": 0}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["x"]},
    }


@pytest.mark.parametrize(("version", "family"), [("0.3.1", "4"), ("0.4.0", "4"), ("1.0.0", None)])
def test_main_result_addresses_say_their_family_before_1_0(
    version: str, family: str | None
) -> None:
    parsed = NetConf.parse(
        raw(conf(cniVersion=version, model="none", prevResult=None, ipam={"type": "host-local"})),
        "ADD",
    )
    got = {"cniVersion": "1.0.0", "ips": [{"address": "169.254.9.4/24"}]}
    result = cni.main_result(parsed, Env.from_environ(environ()), "52:54:00:00:00:09", got)
    assert result["ips"][0].get("version") == family


def test_prev_result_addresses_of_the_nic_become_its_description() -> None:
    addrs = cni.ips_of(PREV, 2)
    assert [(a.family, a.address, a.mask) for a in addrs] == [(4, "169.254.5.100", "24")]
    assert cni.ips_of(PREV, 0) == ()
    with pytest.raises(CniError) as info:
        cni.ips_of({"ips": [{"address": "nonsense"}]}, None)
    assert info.value.code == Code.DECODE


def test_attachment_records_round_trip_and_keep_what_they_cannot_read(tmp_path: Path) -> None:
    book = cni.Book(tmp_path)
    one = cni.Attachment(
        network="n",
        container_id="c",
        ifname="eth0",
        netns="/run/netns/p",
        mac="52:54:00:00:00:01",
        qmp_socket="/q",
        ipam=True,
    )
    strange = {"from": "a later version"}
    asyncio.run(book.save(cni.Records((one,), (strange,))))
    assert book.load() == cni.Records((one,), (strange,))
    assert book.load().find(("n", "c", "eth0")) == one
    asyncio.run(book.save(cni.Records()))
    assert not book.path.exists()


@pytest.mark.asyncio
async def test_a_waiter_on_a_removed_lock_file_starts_over_on_the_new_one(tmp_path: Path) -> None:
    """The last DEL removes the lock file while holding it. The invocation that was waiting
    then gets the lock of a file no longer there; one that came later holds the new file.
    The waiter must not think it holds the lock too."""
    vm_dir = tmp_path / "vm"
    inside: list[str] = []
    release_a, release_c = asyncio.Event(), asyncio.Event()

    async def hold(name: str, release: asyncio.Event, entered: asyncio.Event) -> None:
        async with cni.Book(vm_dir).locked():
            inside.append(name)
            entered.set()
            await release.wait()
            inside.remove(name)

    a_in, b_in, c_in = asyncio.Event(), asyncio.Event(), asyncio.Event()
    a = asyncio.create_task(hold("a", release_a, a_in))
    await a_in.wait()
    b = asyncio.create_task(hold("b", asyncio.Event(), b_in))  # waits for a
    await asyncio.sleep(0.1)
    (vm_dir / cni.LOCK_FILE).unlink()  # what a's last DEL does before it lets go
    c = asyncio.create_task(hold("c", release_c, c_in))  # a fresh lock file: c gets it
    await c_in.wait()
    release_a.set()
    await a
    await asyncio.sleep(0.2)  # b got the old file's lock by now and must have let it go
    assert inside == ["c"]
    assert not b_in.is_set()
    release_c.set()
    await c
    await asyncio.wait_for(b_in.wait(), 5)
    assert inside == ["b"]
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b


# --- VERSION first ------------------------------------------------------------------------


def test_version_is_answered_whatever_else_the_environment_holds() -> None:
    """libcni's version query: CNI_NETNS=dummy and friends must not turn VERSION into error 4."""
    libcni = {
        "CNI_COMMAND": "VERSION",
        "CNI_NETNS": "dummy",
        "CNI_IFNAME": "dummy",
        "CNI_PATH": "dummy",
        "CNI_CONTAINERID": "",
    }
    status, out = cni.run(raw({"cniVersion": "0.4.0"}), libcni)
    assert status == 0
    assert json.loads(out) == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }
    for junk in (b"{", b"\xff\xfe", b"[1]", raw({"cniVersion": "9.9.9"})):
        status, out = cni.run(junk, libcni)
        assert (status, json.loads(out)["cniVersion"]) == (0, "1.1.0"), junk


def test_the_version_console_script_imports_neither_netlink_nor_qmp() -> None:
    """The installed ``qmpnet-cni`` answers VERSION from the standard library alone."""
    import subprocess
    import sys

    probe = (
        "import io, os, sys\n"
        "os.environ.update(CNI_COMMAND='VERSION', CNI_NETNS='dummy', CNI_IFNAME='dummy')\n"
        'sys.stdin = io.TextIOWrapper(io.BytesIO(b\'{"cniVersion": "1.0.0"}\'))\n'
        "out = io.StringIO(); real = sys.stdout; sys.stdout = out\n"
        "from qmpnet.cni.entry import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "sys.stdout = real\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('pyroute2', 'qemu', 'attrs', 'cattrs', 'asyncio', 'typing'))\n"
        "print(code, out.getvalue().strip(), heavy, sep='|')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    code, answer, heavy = done.stdout.strip().split("|")
    assert code == "0"
    assert json.loads(answer)["cniVersion"] == "1.0.0"
    assert heavy == "[]"


def test_the_version_read_cap_is_the_boundarys() -> None:
    from qmpnet.boundary import DOCUMENT_MAX
    from qmpnet.cni.versions import READ_MAX

    assert READ_MAX == DOCUMENT_MAX + 1
