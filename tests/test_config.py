"""TOML configuration: defaults, each key's check, and a property over arbitrary tables."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from qmpnet.config import Announce, Config, Timeouts, with_options
from qmpnet.errors import InvalidInputError, UnknownValueError
from qmpnet.model import QUEUES_MAX, InterworkingModel, check_ifname


def test_defaults_are_documented_ones() -> None:
    cfg = Config()
    assert cfg.internetworking_model is InterworkingModel.DEFAULT
    assert cfg.model is InterworkingModel.TCFILTER  # "default" means tcfilter
    assert (cfg.disable_vhost_net, cfg.queues, cfg.tap_name) == (False, 0, "tap{idx}_kata")
    assert cfg.timeouts == Timeouts(connect=5.0, command=10.0, unplug=5.0, guest_ready=30.0)
    # QEMU's own announce-self parameters for a migration
    assert cfg.announce == Announce(enabled=True, rounds=5, initial=50, max=550, step=100)
    assert Config.from_mapping({}) == cfg


def test_load_reads_a_network_table(tmp_path: Path) -> None:
    path = tmp_path / "qmpnet.toml"
    path.write_text(
        '[network]\ninternetworking_model = "macvtap"\ndisable_vhost_net = true\n'
        'queues = 4\ntap_name = "vm7tap{idx}"\n[network.timeouts]\nunplug = 1.5\nconnect = 2\n'
    )
    cfg = Config.load(path)
    assert cfg.model is InterworkingModel.MACVTAP
    assert (cfg.disable_vhost_net, cfg.queues, cfg.tap_name) == (True, 4, "vm7tap{idx}")
    assert cfg.timeouts == Timeouts(connect=2.0, command=10.0, unplug=1.5, guest_ready=30.0)


def test_load_reads_top_level_keys(tmp_path: Path) -> None:
    path = tmp_path / "qmpnet.toml"
    path.write_text('internetworking_model = "none"\n')
    assert Config.load(path).model is InterworkingModel.NONE


def test_load_reports_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="config file") as caught:
        Config.load(tmp_path / "absent.toml")
    assert caught.value.value == str(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("queues = [\n")
    with pytest.raises(InvalidInputError, match="not valid TOML"):
        Config.load(bad)


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"queues": QUEUES_MAX + 1}, "queues"),
        ({"queues": -1}, "queues"),
        ({"queues": 0.0}, "queues"),
        ({"queues": False}, "queues"),
        ({"queues": "4"}, "queues"),
        ({"disable_vhost_net": 1}, "disable_vhost_net"),
        ({"internetworking_model": "enlightend"}, "interworking model"),
        ({"tap_name": "tap"}, "tap_name"),
        ({"tap_name": "{idx}" + "x" * 13}, "tap_name"),
        ({"tap_name": "t{idx}{x}"}, "tap_name"),
        ({"tap_name": "t{idx}{"}, "tap_name"),
        ({"tap_name": "t{idx}{0}"}, "tap_name"),
        ({"tap_name": "t{{idx}}"}, "tap_name"),
        ({"tap_name": "t/{idx}"}, "tap_name"),
        ({"tap_name": 5}, "tap_name"),
        ({"timeouts": {"unplug": 0}}, "timeouts.unplug"),
        ({"timeouts": {"unplug": math.inf}}, "timeouts.unplug"),
        ({"timeouts": {"unplug": True}}, "timeouts.unplug"),
        ({"timeouts": {"connect": 3601}}, "timeouts.connect"),
        ({"timeouts": {"later": 1}}, "timeouts key"),
        ({"timeouts": 5}, "timeouts"),
        ({"announce": {"rounds": 0}}, "announce.rounds"),
        ({"announce": {"rounds": 1001}}, "announce.rounds"),
        ({"announce": {"step": -1}}, "announce.step"),
        ({"announce": {"initial": 600}}, "announce.max"),
        ({"announce": {"enabled": "yes"}}, "announce.enabled"),
        ({"vhost": True}, "config key"),
        ({"network": 1}, "network"),
        ({"queues": 4, "network": {"tap_name": "t{idx}"}}, "config key"),
    ],
)
def test_each_key_is_checked(table: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        Config.from_mapping(table)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_unknown_model_names_the_valid_ones() -> None:
    with pytest.raises(UnknownValueError) as caught:
        Config.from_mapping({"internetworking_model": "vxlan"})
    assert "vxlan" in str(caught.value)
    assert set(caught.value.valid) == {m.value for m in InterworkingModel}


_keys = st.sampled_from(
    [
        "internetworking_model",
        "disable_vhost_net",
        "queues",
        "tap_name",
        "timeouts",
        "network",
        "other",
    ]
)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "tcfilter",
            "none",
            "enlightened",
            "tap{idx}",
            "t{idx}{",
            "{idx}{0}",
            "{{idx}}",
            "x{idx:>20}",
            "{idx.real}",
            "{idx[0]}",
        ]
    )
    | st.sampled_from([0, 1, 4, 256, 257, 0.0, 0.5, 3600, 3601])
)
_value = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            _keys | st.sampled_from(["connect", "command", "unplug", "guest_ready"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=10,
)
_table = st.dictionaries(_keys, _value, max_size=5)


@given(_table | st.fixed_dictionaries({"network": _table}))
@example({"queues": 0.0})
@example({"tap_name": "{idx}{x}"})
@example({"tap_name": "{{idx}}"})
def test_any_table_gives_a_valid_config_or_a_named_error(table: dict[str, object]) -> None:
    try:
        cfg, err = Config.from_mapping(table), None
    except InvalidInputError as caught:
        cfg, err = None, caught
    if err is not None:
        assert isinstance(err.field, str)
        assert err.field
        assert err.field in str(err)
        return
    assert cfg is not None
    assert isinstance(cfg.internetworking_model, InterworkingModel)
    assert type(cfg.disable_vhost_net) is bool
    assert type(cfg.queues) is int
    assert cfg.queues == 0 or 1 <= cfg.queues <= QUEUES_MAX
    names = {cfg.tap_name.format(idx=i) for i in range(3)}
    assert len(names) == 3  # distinct names per index
    for idx in (0, 999):
        check_ifname("tap", cfg.tap_name.format(idx=idx))
    for value in (
        cfg.timeouts.connect,
        cfg.timeouts.command,
        cfg.timeouts.unplug,
        cfg.timeouts.guest_ready,
    ):
        assert type(value) is float
        assert 0 < value <= 3600


@pytest.mark.parametrize("queues", [-1, 300, True])
def test_a_config_made_in_code_checks_queues_too(queues: object) -> None:
    """The CLI builds its Config from options: a bad count fails before anything is made."""
    with pytest.raises(InvalidInputError) as caught:
        Config(queues=queues)  # type: ignore[arg-type]
    assert caught.value.field == "queues"


def test_request_options_turn_announcing_off_or_change_its_rounds() -> None:
    base = Config.from_mapping({"announce": {"rounds": 7, "step": 0}})
    assert with_options(base, no_announce=True).announce == attrs.evolve(
        base.announce, enabled=False
    )
    assert with_options(base, announce_rounds=2).announce.rounds == 2
    assert with_options(base).announce == base.announce
    with pytest.raises(InvalidInputError, match="--announce-rounds"):
        with_options(base, announce_rounds=0)
