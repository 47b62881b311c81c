"""Tests of tasks.quarantine: append-only store, filters, export, file problems."""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.ingest import SourceConfig, StateStore, ingest
from tasks.quarantine import QuarantineStore, file_problem_rows
from tasks.records import FileProblem, QuarantineRow

MOMENT = datetime(2025, 6, 1, 3, 0, tzinfo=timezone.utc)


def qrow(n: int, model: str = "sentiment", run_id: str = "run-1", **extra: object) -> QuarantineRow:
    values = {
        "model": model,
        "run_id": run_id,
        "origin": f"errors.jsonl:{n}",
        "record_id": f"id-{n}",
        "raw": json.dumps({"id": f"id-{n}", "input": "ça va \u2014 ok"}, ensure_ascii=False),
        "reasons": ["expect_column_values_to_not_be_null(correction): required field correction is missing"],
        "quarantined_at": MOMENT,
    }
    values.update(extra)
    return QuarantineRow(**values)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path) -> str:
    """The quarantine on SQLite (the default) and on a real PostgreSQL (production)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'state.db'}"
    from tests.conftest import sqlalchemy_url

    name = "q_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return sqlalchemy_url(request.getfixturevalue("postgres")(name))


@pytest.fixture
def store(store_url: str) -> QuarantineStore:
    quarantine = QuarantineStore(store_url)
    yield quarantine
    quarantine.close()


def test_add_list_count_roundtrip(store: QuarantineStore) -> None:
    rows = [qrow(1), qrow(2, record_id=None, reasons=["invalid_json: x", "second reason"])]
    assert store.add(rows) == 2
    assert store.add([]) == 0
    assert store.list() == rows
    assert store.count() == 2
    assert store.list()[0].quarantined_at == MOMENT


def test_filters_by_model_and_run(store: QuarantineStore) -> None:
    store.add([qrow(1), qrow(2, run_id="run-2"), qrow(3, model="other")])
    assert [r.origin for r in store.list(model="sentiment")] == ["errors.jsonl:1", "errors.jsonl:2"]
    assert [r.origin for r in store.list(run_id="run-2")] == ["errors.jsonl:2"]
    assert [r.origin for r in store.list(model="sentiment", run_id="run-1")] == ["errors.jsonl:1"]
    assert store.count(model="other") == 1 and store.count(model="nobody") == 0


def test_append_only_and_durable(store_url: str) -> None:
    url = store_url
    first = QuarantineStore(url)
    first.add([qrow(1)])
    first.add([qrow(1)])  # the same row twice (two nights) is kept twice: it is a log
    first.close()
    second = QuarantineStore(url)
    assert second.count() == 2
    second.close()


def test_shares_a_database_with_the_state_store(store_url: str) -> None:
    url = store_url
    state, quarantine = StateStore(url), QuarantineStore(url)
    state.commit_watermark("m", {"kind": "files", "files": {}}, run_id="r")
    quarantine.add([qrow(1, model="m")])
    assert state.get_watermark("m") is not None and quarantine.count("m") == 1
    state.close()
    quarantine.close()


def test_awkward_raw_content_is_stored_whole(store: QuarantineStore) -> None:
    nasty = 'nul\x00 bell\x07 latin1 \\xe9 lone \ud800 emoji \U0001F600 "quotes"\nnewline'
    store.add([qrow(1, raw=nasty)])
    stored = store.list()[0].raw
    # lone surrogates and NUL (PostgreSQL text cannot hold it) escaped, everything else kept
    assert stored == nasty.replace("\ud800", "\\ud800").replace("\x00", "\\x00")


def test_nul_in_every_field_is_stored(store: QuarantineStore) -> None:
    row = qrow(1, origin="f.jsonl:1", record_id="a\x00b", raw="x\x00y", reasons=["invalid_json: \x00 at 1"])
    store.add([row])
    stored = store.list()[0]
    assert (stored.record_id, stored.raw) == ("a\\x00b", "x\\x00y")
    assert stored.reasons == row.reasons  # stored as JSON, which escapes NUL itself


def test_export_jsonl_and_csv(store: QuarantineStore, tmp_path: Path) -> None:
    rows = [qrow(1), qrow(2, model="other", raw='a,"b"\nc')]
    store.add(rows)

    jsonl_path = tmp_path / "out" / "q.jsonl"
    assert store.export(jsonl_path) == 2
    lines = jsonl_path.read_text(encoding="utf-8").splitlines()
    assert [QuarantineRow.model_validate_json(line) for line in lines] == rows

    csv_path = tmp_path / "q.csv"
    assert store.export(csv_path, model="other") == 1
    with csv_path.open(encoding="utf-8", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == 1
    assert records[0]["raw"] == 'a,"b"\nc'
    assert json.loads(records[0]["reasons"]) == rows[1].reasons
    assert records[0]["record_id"] == "id-2"

    with pytest.raises(ValueError, match=".jsonl or .csv"):
        store.export(tmp_path / "q.txt")


def test_quarantine_row_needs_a_reason() -> None:
    with pytest.raises(ValidationError):
        qrow(1, reasons=[])


def test_file_problems_become_quarantine_rows(tmp_path: Path, store: QuarantineStore) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "broken.parquet").write_bytes(b"PAR1 garbage \xff PAR1")
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    batch = ingest(SourceConfig(kind="files", path=logs), state, "sentiment")
    state.close()

    rows = file_problem_rows(batch.file_problems, model="sentiment", run_id="run-9", now=MOMENT)
    assert len(rows) == 1
    row = rows[0]
    assert row.origin == str(logs / "broken.parquet") and row.record_id is None
    assert row.reasons[0].startswith("file_unreadable: ")
    assert row.raw == "PAR1 garbage \\xff PAR1"  # the bytes are kept, escaped
    store.add(rows)
    assert store.list(run_id="run-9") == rows


def test_file_problem_rows_default_time() -> None:
    rows = file_problem_rows([FileProblem(origin="f.csv", reason="file_binary: x")], "m", "r")
    assert rows[0].quarantined_at.tzinfo is not None
