"""What ``reconcile`` cannot read makes it incomplete (exit 9), never "all consistent" (0)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpnet import cli
from qmpnet.config import Config
from qmpnet.network import NetworkState
from qmpnet.reconcile import reconcile
from qmpnet.store import Store

RECORDS = {
    "alien endpoint": {
        "operation": "hot-plug",
        "step": "device-add",
        "started": 1.0,
        "endpoint": {"type": "wireguard", "peer": "x"},
    },
    "not an object": ["hot-plug"],
}


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved


def _vm(tmp_path: Path, record: object) -> Store:
    store = Store(tmp_path / "s")
    store.dir.mkdir()
    store.journal_path.write_text(json.dumps({"qn0123456789": record}))
    return store


@pytest.mark.parametrize("record", RECORDS.values(), ids=RECORDS.keys())
@pytest.mark.asyncio
async def test_an_unreadable_journal_record_is_an_error_of_the_report(
    tmp_path: Path, record: object
) -> None:
    store = _vm(tmp_path, record)
    report = await reconcile(NetworkState.open(store.dir, str(tmp_path / "gone.sock"), Config()))
    assert not report.ok
    assert any("unreadable journal record" in e for e in report.errors)
    assert list(store.journal()) == ["qn0123456789"]  # kept as it was


@pytest.mark.parametrize("record", RECORDS.values(), ids=RECORDS.keys())
def test_reconcile_exits_9_on_an_unreadable_journal_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record: object
) -> None:
    store = _vm(tmp_path, record)
    argv = ["reconcile", "--state", str(store.dir), "--qmp", str(tmp_path / "gone.sock")]
    assert cli.main(argv) == cli.EXIT_INCOMPLETE
    assert "unreadable journal record" in capsys.readouterr().out
    assert store.dir.exists()
