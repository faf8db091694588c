"""The watcher's pure parts: when a link is looked at (debouncing), and what is done then.

No netlink, no QEMU: the clock is a number passed in, links are ``LinkInfo`` records. The
kernel and QEMU side is in ``integration/test_watch.py``.
"""

from __future__ import annotations

import pytest

from qmpnet.errors import InvalidInputError
from qmpnet.links import LinkInfo
from qmpnet.model import InterfaceDescription, InterworkingModel
from qmpnet.store import Entry
from qmpnet.watch import (
    Action,
    Debouncer,
    WatchEvent,
    WatchEventKind,
    ignore_reason,
    plan,
)


def link(
    name: str = "eth0",
    *,
    index: int = 5,
    kind: str = "veth",
    up: bool = True,
    mac: str = "02:00:00:00:00:21",
    alias: str = "",
    master: int = 0,
) -> LinkInfo:
    return LinkInfo(
        index=index, name=name, mac=mac, mtu=1500, up=up, alias=alias, kind=kind, master=master
    )


# --- Debouncer ---------------------------------------------------------------------------------


def test_a_key_is_due_only_after_a_quiet_window() -> None:
    d: Debouncer[str] = Debouncer(0.5)
    d.touch("eth0", now=10.0)
    assert d.pop_due(10.4) == []
    assert d.pop_due(10.5) == ["eth0"]
    assert d.pop_due(11.0) == []  # released once, then forgotten
    assert len(d) == 0


def test_a_burst_of_touches_is_one_release_after_the_last() -> None:
    d: Debouncer[str] = Debouncer(0.5)
    for t in (0.0, 0.2, 0.4, 0.6, 0.8):
        d.touch("eth0", now=t)
        assert d.pop_due(t) == []
    assert d.next_due() == pytest.approx(1.3)
    assert d.pop_due(1.29) == []
    assert d.pop_due(1.3) == ["eth0"]


def test_a_key_that_never_calms_down_is_released_after_max_wait() -> None:
    d: Debouncer[str] = Debouncer(0.5, max_wait=2.0)
    released = []
    t = 0.0
    while t < 3.0:
        d.touch("flappy", now=t)
        released += [(t, k) for k in d.pop_due(t)]
        t = round(t + 0.25, 2)
    assert released[0] == (2.0, "flappy")


def test_max_wait_defaults_to_ten_windows() -> None:
    assert Debouncer(0.5).max_wait == 5.0


def test_keys_are_independent_and_come_out_earliest_first() -> None:
    d: Debouncer[str] = Debouncer(1.0)
    d.touch("b", now=0.0)
    d.touch("a", now=0.5)
    d.touch("c", now=0.1)
    d.touch("b", now=0.6)  # b pushed back behind a
    assert d.pop_due(1.55) == ["c", "a"]
    assert "b" in d
    assert d.pop_due(1.6) == ["b"]


def test_a_retry_delay_never_postpones_a_look_already_due_sooner() -> None:
    d: Debouncer[str] = Debouncer(0.5)
    d.touch("eth0", now=0.0)  # an event: due at 0.5
    d.touch("eth0", now=0.1, delay=30.0)  # a retry scheduled meanwhile
    assert d.next_due() == pytest.approx(0.5)
    d.pop_due(0.5)
    d.touch("eth0", now=1.0, delay=5.0)  # a retry alone: due later than a window
    assert d.next_due() == pytest.approx(6.0)
    d.touch("eth0", now=2.0)  # a new event brings the look forward
    assert d.next_due() == pytest.approx(2.5)


def test_discard_forgets_a_key() -> None:
    d: Debouncer[str] = Debouncer(0.5)
    d.touch("eth0", now=0.0)
    d.discard("eth0")
    d.discard("never-seen")
    assert d.pop_due(100.0) == []
    assert d.next_due() is None


def test_a_negative_window_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="debounce"):
        Debouncer(-1.0)


# --- which links are plugged ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["veth", "macvlan", "tun"])
def test_up_links_of_pluggable_kinds_are_plugged(kind: str) -> None:
    assert ignore_reason(link(kind=kind), {}) is None


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        (link("lo", kind="", mac="00:00:00:00:00:00"), "loopback"),
        (link("tap0_kata", kind="tun", alias="qmpnet:qn0123456789"), "made by qmpnet"),
        (link("br0_kata", kind="bridge", alias="qmpnet:qn0123456789"), "made by qmpnet"),
        (link(kind="veth", up=False), "down"),
        (link(kind="dummy"), "kind dummy is not plugged"),
        (link(kind="bridge"), "kind bridge is not plugged"),
        (link("eth1", kind=""), "kind device is not plugged"),
        (link(kind="veth", mac=""), "no MAC address"),
    ],
)
def test_what_is_ignored_and_why(info: LinkInfo, reason: str) -> None:
    assert ignore_reason(info, {}) == reason


def test_ports_are_ignored_whoever_owns_the_bridge() -> None:
    ours = link("br0_kata", index=9, kind="bridge", alias="qmpnet:qn0123456789")
    theirs = link("cni0", index=10, kind="bridge")
    assert ignore_reason(link(master=9), {9: ours}) == "port of qmpnet's bridge br0_kata"
    assert ignore_reason(link(master=10), {10: theirs}) == "port of cni0"
    assert ignore_reason(link(master=11), {}) == "port of 11"


# --- what is done with one link name -------------------------------------------------------------


def _entry() -> Entry:
    from qmpnet.endpoints import create_endpoint, net_info_from_interface

    desc = InterfaceDescription(name="eth0", hw_addr="02:00:00:00:00:21")
    model = InterworkingModel.TCFILTER
    return Entry(
        create_endpoint(net_info_from_interface(desc, model), 0, model, netns_path="/run/netns/x")
    )


@pytest.mark.parametrize(
    ("present", "ignored", "saved", "attached", "action"),
    [
        # nothing saved: plug what is wanted, leave the rest
        (True, None, False, False, Action.PLUG),
        (True, "down", False, False, Action.NOTHING),
        # came and went within the window: gone when looked at, never plugged
        (False, None, False, False, Action.NOTHING),
        # saved and still joined to its link (also when it went down, or is our bridge's port)
        (True, None, True, True, Action.KEEP),
        (True, "down", True, True, Action.KEEP),
        (True, "port of qmpnet's bridge br0_kata", True, True, Action.KEEP),
        # saved, link gone: unplug
        (False, None, True, False, Action.UNPLUG),
        # saved, but the link of that name is a new one: unplug the old NIC, plug the new link
        (True, None, True, False, Action.REPLUG),
        (True, "down", True, False, Action.UNPLUG),
    ],
)
def test_plan(
    present: bool, ignored: str | None, saved: bool, attached: bool, action: Action
) -> None:
    assert (
        plan(link() if present else None, ignored, _entry() if saved else None, attached) is action
    )


def test_events_serialize_without_empty_fields() -> None:
    event = WatchEvent(
        kind=WatchEventKind.PLUGGED,
        link="eth0",
        mac="02:00:00:00:00:21",
        endpoint_id="qn0123456789",
        pci_path="02/00",
    )
    assert event.to_json() == {
        "kind": "plugged",
        "link": "eth0",
        "mac": "02:00:00:00:00:21",
        "endpoint_id": "qn0123456789",
        "pci_path": "02/00",
    }
    assert WatchEvent(kind=WatchEventKind.STOPPED).to_json() == {"kind": "stopped"}
