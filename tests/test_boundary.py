"""The boundary kit: exact types, spelled keys, and cattrs' errors told as InvalidInputError."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from qmpnet.boundary import Boundary
from qmpnet.errors import InvalidInputError
from qmpnet.model import InterworkingModel, check_mtu, checked_by


@attrs.frozen(kw_only=True)
class Inner:
    wait_for: float = 1.0


@attrs.frozen(kw_only=True)
class Outer:
    host_name: str
    mtu: int = attrs.field(default=1500, validator=checked_by(check_mtu))
    on: bool = False
    model: InterworkingModel = InterworkingModel.DEFAULT
    inner: Inner = Inner()
    items: tuple[Inner, ...] = ()


DOC = Boundary("doc", key_field="{} key")
DOC.register(Inner, {"wait_for": "waitFor"})
DOC.register(Outer, {"host_name": "hostName"})


def test_reads_the_spelled_keys_and_writes_them_back() -> None:
    data = {
        "hostName": "h",
        "mtu": 9000,
        "on": True,
        "model": "macvtap",
        "inner": {"waitFor": 2},
        "items": [{"waitFor": 3.5}],
    }
    outer = DOC.structure(data, Outer)
    assert outer == Outer(
        host_name="h",
        mtu=9000,
        on=True,
        model=InterworkingModel.MACVTAP,
        inner=Inner(wait_for=2.0),
        items=(Inner(wait_for=3.5),),
    )
    assert type(outer.inner.wait_for) is float
    assert DOC.unstructure(outer) == {**data, "inner": {"waitFor": 2.0}}


@pytest.mark.parametrize(
    ("patch", "field", "value", "reason"),
    [
        ({"mtu": "1500"}, "mtu", "1500", "must be an integer"),
        ({"mtu": True}, "mtu", True, "must be an integer"),
        ({"on": 1}, "on", 1, "must be true or false"),
        ({"hostName": 5}, "hostName", 5, "must be a string"),
        ({"mtu": 10}, "mtu", 10, "must be an integer from 68"),
        ({"inner": []}, "inner", [], "must be an object"),
        ({"inner": {"waitFor": "1"}}, "inner.waitFor", "1", "must be a number"),
        ({"inner": {"wait_for": 1}}, "inner key", "wait_for", "unknown key"),
        ({"other": 1}, "doc key", "other", "unknown key; known keys are hostName, mtu"),
        ({"items": "ab"}, "items", "ab", "must be a list"),
        ({"items": [{}, 5]}, "items", 5, "must be an object"),
        ({"items": [{"waitFor": None}]}, "waitFor", None, "must be a number"),
        ({"hostName": None}, "hostName", None, "must be a string"),
    ],
)
def test_errors_name_the_field_as_spelled_and_the_value(
    patch: dict[str, Any], field: str, value: object, reason: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        DOC.structure({"hostName": "h", **patch}, Outer)
    assert (caught.value.field, caught.value.value) == (field, value)
    assert reason in caught.value.reason


def test_a_missing_key_and_a_vocabulary_name_themselves() -> None:
    with pytest.raises(InvalidInputError) as caught:
        DOC.structure({}, Outer)
    assert (caught.value.field, caught.value.value) == ("hostName", None)
    assert "missing from doc" in str(caught.value)
    with pytest.raises(InvalidInputError) as caught:
        DOC.structure({"hostName": "h", "model": "vxlan"}, Outer)
    assert caught.value.field == "interworking model"
    assert not getattr(caught.value, "__notes__", [])
