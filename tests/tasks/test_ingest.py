"""Tests of ingest (tasks.ingest, file_source, file_formats, sql_source) and the state store."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from tasks.file_formats import parse_json_line, sniff_binary
from tasks.ingest import IngestBatch, SourceConfig, SourceError, StateStore, ingest
from tasks.sql_source import decode_cursor_value, encode_cursor_value

MODEL = "sentiment"
TS = "2025-01-01T10:00:00Z"


def record(n: int, **extra: object) -> dict:
    return {"id": f"r{n}", "logged_at": TS, "input": f"input {n}", "correction": "positive", **extra}


def write_jsonl(path: Path, rows: list[dict], mode: str = "w") -> None:
    with path.open(mode, encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture
def state(tmp_path: Path) -> StateStore:
    store = StateStore(f"sqlite:///{tmp_path / 'state' / 'state.db'}")
    yield store
    store.close()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


def files_source(path: Path) -> SourceConfig:
    return SourceConfig(kind="files", path=path)


def ids(batch: IngestBatch) -> list[str]:
    return [row.data["id"] for row in batch.rows if row.data]


# ---------------------------------------------------------------------------------------------
# Config and state store
# ---------------------------------------------------------------------------------------------


def test_source_config_requires_path_or_table() -> None:
    with pytest.raises(ValidationError):
        SourceConfig(kind="files")
    with pytest.raises(ValidationError):
        SourceConfig(kind="sql", url="sqlite://")
    assert SourceConfig(kind="sql", table="errors").url.startswith("sqlite:///")


def test_cursor_values_roundtrip() -> None:
    moment = datetime(2025, 1, 1, 10, tzinfo=timezone.utc)
    for value in (moment, "2025-01-01 10:00:00", 17, 1.5, b"\x00\xff"):
        encoded = encode_cursor_value(value)
        assert json.loads(json.dumps(encoded)) == encoded
        assert decode_cursor_value(encoded) == value


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_missing_directory_raises_source_error(tmp_path: Path, state: StateStore) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        ingest(files_source(tmp_path / "nope"), state, MODEL)
    a_file = tmp_path / "file.jsonl"
    a_file.write_text("")
    with pytest.raises(SourceError, match="not a directory"):
        ingest(files_source(a_file), state, MODEL)


def test_empty_directory_gives_zero_rows(logs: Path, state: StateStore) -> None:
    batch = ingest(files_source(logs), state, MODEL)
    assert batch.rows == [] and batch.file_problems == [] and batch.rows_read == 0
    assert batch.pending_watermark == {"kind": "files", "version": 2, "files": {}, "new_rows": []}


def test_reads_all_formats_sorted_by_name_with_origins(logs: Path, state: StateStore) -> None:
    write_jsonl(logs / "b.jsonl", [record(1), record(2)])
    (logs / "a.csv").write_text(
        "id,logged_at,input,correction,equivalents\n"
        f'c1,{TS},"hello, world",positive,"[""hi world""]"\n'
        f"c2,{TS},plain,negative,\n",
        encoding="utf-8",
    )
    write_parquet(
        logs / "c.parquet",
        [{"id": "p1", "logged_at": datetime(2025, 1, 1, tzinfo=timezone.utc), "input": "x",
          "correction": "y", "equivalents": ["e1", "e2"]}],
    )
    write_jsonl(logs / "d.json", [record(3)])
    (logs / "ignored.txt").write_text("not a log\n")

    batch = ingest(files_source(logs), state, MODEL)

    assert ids(batch) == ["c1", "c2", "r1", "r2", "p1", "r3"]
    assert batch.rows_read == 6
    csv_row = batch.rows[0]
    assert csv_row.origin == f"{logs / 'a.csv'}:2"
    assert csv_row.data["input"] == "hello, world"
    assert csv_row.data["equivalents"] == '["hi world"]'  # decoded by validation
    assert batch.rows[1].data["equivalents"] is None  # empty cell = absent
    assert batch.rows[2].origin == f"{logs / 'b.jsonl'}:1"
    parquet_row = batch.rows[4]
    assert parquet_row.data["equivalents"] == ["e1", "e2"]
    assert parquet_row.data["logged_at"] == datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert json.loads(parquet_row.raw)["id"] == "p1"


def test_unparseable_rows_are_returned_and_counted(logs: Path, state: StateStore) -> None:
    (logs / "mixed.jsonl").write_bytes(
        b'{"id": "ok"}\n'
        b"{broken\n"
        b"\n"  # blank: not a row
        b"[1, 2]\n"
        b'{"id": "caf\xe9"}\n'
    )
    batch = ingest(files_source(logs), state, MODEL)
    assert batch.rows_read == 4
    problems = [row.problem.split(":")[0] if row.problem else None for row in batch.rows]
    assert problems == [None, "invalid_json", "not_a_json_object", "not_utf8"]
    assert [row.origin.rsplit(":", 1)[1] for row in batch.rows] == ["1", "2", "4", "5"]
    assert batch.rows[3].data is None
    assert "\\xe9" in batch.rows[3].raw  # content kept, escaped


def test_parse_json_line_cases() -> None:
    assert parse_json_line("f:1", b'{"a": 1}').data == {"a": 1}
    assert parse_json_line("f:1", b'{"a": ').problem.startswith("invalid_json: ")
    assert parse_json_line("f:1", b"42").problem.startswith("not_a_json_object: ")
    assert parse_json_line("f:1", b"\xff\xfe").problem.startswith("not_utf8: ")


def test_sniff_binary() -> None:
    assert sniff_binary(b'{"id": "x"}\n') is None
    assert sniff_binary(b'{"id": "a\x00b"}\n' * 10) is None  # one NUL per line: a row problem
    assert sniff_binary("abc".encode("utf-16")).startswith("file_binary")
    assert sniff_binary(bytes(range(256))).startswith("file_binary")
    assert sniff_binary(b"\x1f\x8b\x08\x00").startswith("file_binary")


def test_watermark_only_advances_on_commit(logs: Path, state: StateStore) -> None:
    write_jsonl(logs / "errors.jsonl", [record(1), record(2)])
    source = files_source(logs)

    first = ingest(source, state, MODEL)
    again = ingest(source, state, MODEL)  # no commit: same rows again
    assert ids(first) == ids(again) == ["r1", "r2"]

    state.commit_watermark(MODEL, first.pending_watermark, run_id="night-1")
    after = ingest(source, state, MODEL)
    assert after.rows == [] and after.rows_read == 0 and after.file_problems == []
    assert after.pending_watermark["files"] == first.pending_watermark["files"]
    assert after.pending_watermark["new_rows"] == [] and len(first.pending_watermark["new_rows"]) == 2

    # other models have their own watermark
    assert ids(ingest(source, state, "another-model")) == ["r1", "r2"]


def test_appended_lines_and_new_files_are_read(logs: Path, state: StateStore) -> None:
    source = files_source(logs)
    write_jsonl(logs / "errors.jsonl", [record(1), record(2)])
    state.commit_watermark(MODEL, ingest(source, state, MODEL).pending_watermark, run_id="n1")

    write_jsonl(logs / "errors.jsonl", [record(3)], mode="a")
    write_jsonl(logs / "errors-2.jsonl", [record(4)])
    batch = ingest(source, state, MODEL)
    assert sorted(ids(batch)) == ["r3", "r4"]
    appended = next(row for row in batch.rows if row.data["id"] == "r3")
    assert appended.origin.endswith("errors.jsonl:3")

    state.commit_watermark(MODEL, batch.pending_watermark, run_id="n2")
    assert ingest(source, state, MODEL).rows == []


def test_appended_csv_rows_are_read(logs: Path, state: StateStore) -> None:
    source = files_source(logs)
    path = logs / "errors.csv"
    path.write_text(f"id,logged_at,input,correction\na,{TS},x,positive\n", encoding="utf-8")
    state.commit_watermark(MODEL, ingest(source, state, MODEL).pending_watermark, run_id="n1")
    with path.open("a", encoding="utf-8") as out:
        out.write(f"b,{TS},y,negative\n")
    assert ids(ingest(source, state, MODEL)) == ["b"]


def test_parquet_rewritten_with_more_rows_reads_only_new_rows(logs: Path, state: StateStore) -> None:
    source = files_source(logs)
    write_parquet(logs / "errors.parquet", [record(1), record(2)])
    state.commit_watermark(MODEL, ingest(source, state, MODEL).pending_watermark, run_id="n1")
    write_parquet(logs / "errors.parquet", [record(1), record(2), record(3)])
    batch = ingest(source, state, MODEL)
    assert ids(batch) == ["r3"] and batch.file_problems == []


@pytest.mark.parametrize("rewrite", ["changed", "shrunk"])
def test_rewritten_file_is_read_as_new_without_rows_already_ingested(
    logs: Path, state: StateStore, rewrite: str
) -> None:
    """A rewritten file is a new file, not a quarantined blob; rows an earlier night ingested
    are recognised by their content and not read again."""
    source = files_source(logs)
    path = logs / "errors.jsonl"
    write_jsonl(path, [record(1), record(2)])
    state.commit_watermark(MODEL, ingest(source, state, MODEL).pending_watermark, run_id="n1")

    if rewrite == "changed":
        write_jsonl(path, [record(1, input="edited"), record(2), record(3)])
    else:
        write_jsonl(path, [record(1)])
    batch = ingest(source, state, MODEL)
    assert batch.file_problems == []
    if rewrite == "changed":
        assert [(r.data["id"], r.data["input"]) for r in batch.rows] == [("r1", "edited"), ("r3", "input 3")]
        assert [r.origin.rsplit(":", 1)[1] for r in batch.rows] == ["1", "3"]
    else:
        assert batch.rows == []
    assert batch.skipped_known == 1 and batch.rows_read == len(batch.rows)

    state.commit_watermark(MODEL, batch.pending_watermark, run_id="n2")
    assert ingest(source, state, MODEL).rows == []
    write_jsonl(path, [record(9)], mode="a")
    assert ids(ingest(source, state, MODEL)) == ["r9"]


def test_identical_line_twice_in_one_night_is_read_once(logs: Path, state: StateStore) -> None:
    write_jsonl(logs / "a.jsonl", [record(1)])
    write_jsonl(logs / "a.jsonl.1", [record(1), record(2)])  # a copy that overlaps
    batch = ingest(files_source(logs), state, MODEL)
    assert ids(batch) == ["r1", "r2"] and batch.skipped_known == 1


def test_unfinished_line_is_reported_as_waiting(logs: Path, state: StateStore) -> None:
    (logs / "errors.jsonl").write_text(json.dumps(record(1)) + '\n{"id": "r2", "inp', encoding="utf-8")
    batch = ingest(files_source(logs), state, MODEL)
    assert ids(batch) == ["r1"]
    assert len(batch.waiting) == 1 and "errors.jsonl: 17 bytes of an unfinished last line" in batch.waiting[0]


def test_version_1_watermark_reads_on_from_where_it_stopped(logs: Path, state: StateStore) -> None:
    """A watermark committed before the per-line format (whole-file hash) still resumes."""
    import hashlib

    path = logs / "errors.jsonl"
    write_jsonl(path, [record(1), record(2)])
    data = path.read_bytes()
    v1 = {"kind": "files", "files": {"errors.jsonl": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                      "rows": 2, "rows_sha256": "x"}}}
    state.commit_watermark(MODEL, v1, run_id="old")
    write_jsonl(path, [record(3)], mode="a")
    batch = ingest(files_source(logs), state, MODEL)
    assert ids(batch) == ["r3"] and batch.rows[0].origin.endswith(":3")


def test_binary_file_reported_once_and_read_once_fixed(logs: Path, state: StateStore) -> None:
    source = files_source(logs)
    path = logs / "errors.jsonl"
    path.write_bytes(json.dumps(record(1)).encode("utf-16"))
    good = logs / "good.jsonl"
    write_jsonl(good, [record(2)])

    batch = ingest(source, state, MODEL)
    assert ids(batch) == ["r2"] and batch.rows_read == 1
    assert [p.reason.split(":")[0] for p in batch.file_problems] == ["file_binary"]
    assert ingest(source, state, MODEL).file_problems  # not committed: reported again

    state.commit_watermark(MODEL, batch.pending_watermark, run_id="n1")
    assert ingest(source, state, MODEL).file_problems == []
    write_jsonl(path, [record(1)])  # an operator fixes the file
    assert ids(ingest(source, state, MODEL)) == ["r1"]


def test_corrupt_parquet_and_binary_csv_are_file_problems(logs: Path, state: StateStore) -> None:
    (logs / "bad.parquet").write_bytes(b"PAR1 not parquet at all PAR1")
    (logs / "bad.csv").write_bytes(b"\x00\x01\x02\x03" * 100)
    batch = ingest(files_source(logs), state, MODEL)
    reasons = {Path(p.origin).name: p.reason.split(":")[0] for p in batch.file_problems}
    assert reasons == {"bad.parquet": "file_unreadable", "bad.csv": "file_binary"}
    assert batch.rows == [] and batch.rows_read == 0


def test_ragged_csv_record_is_a_row_problem(logs: Path, state: StateStore) -> None:
    (logs / "r.csv").write_text(f"id,logged_at,input,correction\na,{TS},x,positive\nb,1,2\n")
    batch = ingest(files_source(logs), state, MODEL)
    assert batch.rows_read == 2
    assert batch.rows[0].problem is None
    assert batch.rows[1].problem.startswith("csv_wrong_field_count")
    assert batch.rows[1].origin.endswith("r.csv:3")


def test_watermark_is_json_serialisable(logs: Path, state: StateStore) -> None:
    write_jsonl(logs / "errors.jsonl", [record(1)])
    write_parquet(logs / "p.parquet", [record(2)])
    batch = ingest(files_source(logs), state, MODEL)
    assert json.loads(json.dumps(batch.pending_watermark)) == batch.pending_watermark


# ---------------------------------------------------------------------------------------------
# SQL
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def error_db(tmp_path: Path) -> tuple[str, sa.Table]:
    url = f"sqlite:///{tmp_path / 'errors.db'}"
    engine = sa.create_engine(url)
    table = sa.Table(
        "errors",
        sa.MetaData(),
        sa.Column("id", sa.String, nullable=True),
        sa.Column("logged_at", sa.String, nullable=True),
        sa.Column("input", sa.String),
        sa.Column("correction", sa.String),
        sa.Column("equivalents", sa.String),
    )
    table.metadata.create_all(engine)
    engine.dispose()
    return url, table


def insert(url: str, table: sa.Table, rows: list[dict]) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.insert(table), rows)
    engine.dispose()


def sql_row(key: str, stamp: str) -> dict:
    return {"id": key, "logged_at": stamp, "input": f"in {key}", "correction": "positive", "equivalents": None}


def test_sql_incremental_cursor(error_db: tuple[str, sa.Table], state: StateStore) -> None:
    url, table = error_db
    source = SourceConfig(kind="sql", url=url, table="errors")
    insert(url, table, [sql_row("b", "2025-01-01T10:00:00Z"), sql_row("a", "2025-01-01T10:00:00Z"),
                        sql_row("c", "2025-01-01T09:00:00Z")])

    first = ingest(source, state, MODEL)
    assert ids(first) == ["c", "a", "b"]  # ordered by (logged_at, id)
    assert first.rows[0].origin == "errors:c" and first.rows_read == 3
    assert ids(ingest(source, state, MODEL)) == ["c", "a", "b"]  # no commit: same rows

    state.commit_watermark(MODEL, first.pending_watermark, run_id="n1")
    assert ingest(source, state, MODEL).rows == []

    # same timestamp as the cursor but a later id, and a later timestamp
    insert(url, table, [sql_row("d", "2025-01-01T10:00:00Z"), sql_row("e", "2025-01-02T00:00:00Z")])
    second = ingest(source, state, MODEL)
    assert ids(second) == ["d", "e"]
    state.commit_watermark(MODEL, second.pending_watermark, run_id="n2")
    assert ingest(source, state, MODEL).rows == []


def test_sql_rows_without_cursor_values_are_delivered_once(
    error_db: tuple[str, sa.Table], state: StateStore
) -> None:
    url, table = error_db
    source = SourceConfig(kind="sql", url=url, table="errors")
    insert(url, table, [sql_row("ok", TS), sql_row("no-time", None), {**sql_row(None, TS), "input": "no id"}])
    batch = ingest(source, state, MODEL)
    assert batch.rows_read == 3
    assert {row.data["input"] for row in batch.rows} == {"in ok", "in no-time", "no id"}
    state.commit_watermark(MODEL, batch.pending_watermark, run_id="n1")
    assert ingest(source, state, MODEL).rows == []


def test_sql_typed_columns(tmp_path: Path, state: StateStore) -> None:
    """INTEGER ids and DATETIME columns (values as the driver returns them) work as a cursor."""
    url = f"sqlite:///{tmp_path / 'typed.db'}"
    engine = sa.create_engine(url)
    table = sa.Table(
        "log", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("logged_at", sa.DateTime),
        sa.Column("input", sa.String),
        sa.Column("correction", sa.String),
    )
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(table), [
            {"id": i, "logged_at": datetime(2025, 1, 1, i), "input": f"x{i}", "correction": "positive"}
            for i in (1, 2, 10)
        ])
    source = SourceConfig(kind="sql", url=url, table="log")
    batch = ingest(source, state, MODEL)
    assert [row.data["id"] for row in batch.rows] == [1, 2, 10]
    state.commit_watermark(MODEL, batch.pending_watermark, run_id="n1")
    with engine.begin() as conn:
        conn.execute(sa.insert(table), [{"id": 11, "logged_at": datetime(2025, 1, 1, 11), "input": "y", "correction": "negative"}])
    engine.dispose()
    assert [row.data["id"] for row in ingest(source, state, MODEL).rows] == [11]


def test_sql_missing_table_and_columns(error_db: tuple[str, sa.Table], tmp_path: Path, state: StateStore) -> None:
    url, _ = error_db
    with pytest.raises(SourceError, match="does not exist"):
        ingest(SourceConfig(kind="sql", url=url, table="nope"), state, MODEL)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE partial (id TEXT, input TEXT)"))
    engine.dispose()
    with pytest.raises(SourceError, match="logged_at"):
        ingest(SourceConfig(kind="sql", url=url, table="partial"), state, MODEL)


def test_empty_sql_table(error_db: tuple[str, sa.Table], state: StateStore) -> None:
    url, _ = error_db
    batch = ingest(SourceConfig(kind="sql", url=url, table="errors"), state, MODEL)
    assert batch.rows == [] and batch.rows_read == 0
    assert batch.pending_watermark["cursor"] is None


def test_switching_source_kind_is_refused(error_db: tuple[str, sa.Table], logs: Path, state: StateStore) -> None:
    url, _ = error_db
    state.commit_watermark(MODEL, ingest(files_source(logs), state, MODEL).pending_watermark, run_id="n1")
    with pytest.raises(SourceError, match="watermark"):
        ingest(SourceConfig(kind="sql", url=url, table="errors"), state, MODEL)


# ---------------------------------------------------------------------------------------------
# Issue 10: half lines, rotation, late SQL rows
# ---------------------------------------------------------------------------------------------


def commit(state: StateStore, batch: IngestBatch, run_id: str) -> None:
    state.commit_watermark(MODEL, batch.pending_watermark, run_id=run_id)


def test_half_written_line_waits_for_the_next_night(logs: Path, state: StateStore) -> None:
    """The writer is mid-line when the night runs: night 1 reads r1 only, night 2 the rest."""
    source, path = files_source(logs), logs / "errors.jsonl"
    line2 = json.dumps(record(2)) + "\n"
    path.write_text(json.dumps(record(1)) + "\n" + line2[:20], encoding="utf-8")
    first = ingest(source, state, MODEL)
    assert ids(first) == ["r1"] and [r.problem for r in first.rows] == [None]
    commit(state, first, "n1")

    with path.open("a", encoding="utf-8") as out:  # the writer finishes r2 and logs three more
        out.write(line2[20:])
    write_jsonl(path, [record(3), record(4), record(5)], mode="a")
    second = ingest(source, state, MODEL)
    assert ids(second) == ["r2", "r3", "r4", "r5"] and second.file_problems == []
    assert [r.problem for r in second.rows] == [None] * 4
    assert second.rows[0].origin.endswith("errors.jsonl:2")
    commit(state, second, "n2")
    assert ingest(source, state, MODEL).rows == []


def test_complete_last_object_without_newline_is_read_once(logs: Path, state: StateStore) -> None:
    source, path = files_source(logs), logs / "errors.jsonl"
    path.write_text(json.dumps(record(1)), encoding="utf-8")  # a whole object, newline not yet written
    first = ingest(source, state, MODEL)
    assert ids(first) == ["r1"]
    commit(state, first, "n1")
    path.write_text(json.dumps(record(1)) + "\n" + json.dumps(record(2)) + "\n", encoding="utf-8")
    assert ids(ingest(source, state, MODEL)) == ["r2"]


def test_half_csv_record_waits(logs: Path, state: StateStore) -> None:
    source, path = files_source(logs), logs / "errors.csv"
    path.write_text(f"id,logged_at,input,correction\na,{TS},x,positive\nb,{TS},y,nega", encoding="utf-8")
    first = ingest(source, state, MODEL)
    assert ids(first) == ["a"]
    commit(state, first, "n1")
    with path.open("a", encoding="utf-8") as out:
        out.write("tive\n")
    second = ingest(source, state, MODEL)
    assert ids(second) == ["b"] and second.rows[0].data["correction"] == "negative"


@pytest.mark.parametrize("how", ["rename", "copytruncate"])
def test_rotation_loses_nothing_and_reads_nothing_twice(logs: Path, state: StateStore, how: str) -> None:
    """errors.jsonl is rotated to errors.jsonl.1 (renamed, or copied and truncated) after rows were
    appended that no night has read yet; a new errors.jsonl is started."""
    source, path = files_source(logs), logs / "errors.jsonl"
    write_jsonl(path, [record(1), record(2)])
    commit(state, ingest(source, state, MODEL), "n1")

    write_jsonl(path, [record(3)], mode="a")
    path.write_bytes(path.read_bytes() + json.dumps(record(4)).encode()[:15])  # and a half line
    rotated = logs / "errors.jsonl.1"
    if how == "rename":
        path.rename(rotated)
    else:
        rotated.write_bytes(path.read_bytes())
        path.write_bytes(b"")
    with rotated.open("ab") as out:  # the writer finishes its line in the rotated file
        out.write(json.dumps(record(4)).encode()[15:] + b"\n")
    write_jsonl(path, [record(5)], mode="a")

    second = ingest(source, state, MODEL)
    assert sorted(ids(second)) == ["r3", "r4", "r5"] and second.file_problems == []
    assert all(r.problem is None for r in second.rows)
    commit(state, second, "n2")
    assert ingest(source, state, MODEL).rows == []

    # the next rotation: .1 -> .2, errors.jsonl -> .1, a fresh errors.jsonl
    write_jsonl(path, [record(6)], mode="a")
    (logs / "errors.jsonl.1").rename(logs / "errors.jsonl.2")
    path.rename(logs / "errors.jsonl.1")
    write_jsonl(path, [record(7)])
    third = ingest(source, state, MODEL)
    assert sorted(ids(third)) == ["r6", "r7"] and third.file_problems == []


def test_truncated_file_is_a_new_file_not_a_problem(logs: Path, state: StateStore) -> None:
    source, path = files_source(logs), logs / "errors.jsonl"
    write_jsonl(path, [record(1), record(2)])
    commit(state, ingest(source, state, MODEL), "n1")
    write_jsonl(path, [record(3)])  # truncated and restarted by the writer
    batch = ingest(source, state, MODEL)
    assert ids(batch) == ["r3"] and batch.file_problems == []
    assert batch.rows[0].origin.endswith("errors.jsonl:1")


def text_stamp_db(tmp_path: Path) -> tuple[str, sa.Table]:
    url = f"sqlite:///{tmp_path / 'stamps.db'}"
    table = sa.Table(
        "errors", sa.MetaData(),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String), sa.Column("logged_at", sa.String),
        sa.Column("input", sa.String), sa.Column("correction", sa.String),
    )
    engine = sa.create_engine(url)
    table.metadata.create_all(engine)
    engine.dispose()
    return url, table


def test_sql_text_timestamps_are_compared_as_times_not_text(tmp_path: Path, state: StateStore) -> None:
    """10:00+05:00 is 05:00 UTC: a row at 09:00Z comes after it although its text sorts before."""
    url, table = text_stamp_db(tmp_path)
    source = SourceConfig(kind="sql", url=url, table="errors")
    insert(url, table, [{"id": "a", "logged_at": "2025-01-01T10:00:00+05:00", "input": "in a", "correction": "positive"}])
    commit(state, ingest(source, state, MODEL), "n1")
    insert(url, table, [{"id": "b", "logged_at": "2025-01-01T09:00:00Z", "input": "in b", "correction": "positive"}])
    batch = ingest(source, state, MODEL)
    assert ids(batch) == ["b"]
    commit(state, batch, "n2")
    assert ingest(source, state, MODEL).rows == []


def late_rows_scenario(url: str, table: sa.Table, source: SourceConfig, state: StateStore) -> None:
    insert(url, table, [{"id": "a", "logged_at": "2025-01-01T10:00:00Z", "input": "in a", "correction": "positive"},
                        {"id": "b", "logged_at": "2025-01-01T12:00:00Z", "input": "in b", "correction": "positive"}])
    first = ingest(source, state, MODEL)
    assert sorted(ids(first)) == ["a", "b"]
    commit(state, first, "n1")
    # committed after the night read, but logged before the last row it read
    insert(url, table, [{"id": "late", "logged_at": "2025-01-01T11:00:00Z", "input": "in late", "correction": "positive"}])
    second = ingest(source, state, MODEL)
    assert ids(second) == ["late"]
    commit(state, second, "n2")
    assert ingest(source, state, MODEL).rows == []


def test_sql_cursor_column_reads_late_rows(tmp_path: Path, state: StateStore) -> None:
    url, table = text_stamp_db(tmp_path)
    late_rows_scenario(url, table, SourceConfig(kind="sql", url=url, table="errors", cursor_column="seq"), state)


def test_sql_lookback_reads_late_rows_once(tmp_path: Path, state: StateStore) -> None:
    url, table = text_stamp_db(tmp_path)
    late_rows_scenario(url, table, SourceConfig(kind="sql", url=url, table="errors", lookback=86400), state)


# ---------------------------------------------------------------------------------------------
# The production stack: the error table and the state store on a real PostgreSQL
# ---------------------------------------------------------------------------------------------


def pg_errors(postgres, name: str, logged_at: sa.types.TypeEngine) -> tuple[str, sa.Table]:
    from tests.conftest import sqlalchemy_url

    url = sqlalchemy_url(postgres(name))
    table = sa.Table(
        "errors", sa.MetaData(),
        sa.Column("ingested_seq", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("id", sa.Text), sa.Column("logged_at", logged_at),
        sa.Column("input", sa.Text), sa.Column("correction", sa.Text),
    )
    engine = sa.create_engine(url)
    table.metadata.drop_all(engine)
    table.metadata.create_all(engine)
    engine.dispose()
    return url, table


@pytest.mark.parametrize("kind", ["timestamptz", "text"])
def test_postgres_late_rows_by_logged_at_lookback(postgres, kind: str) -> None:
    column = sa.DateTime(timezone=True) if kind == "timestamptz" else sa.Text()
    url, table = pg_errors(postgres, f"late_{kind}", column)
    state = StateStore(url)  # the state store in the same PostgreSQL
    late_rows_scenario(url, table, SourceConfig(kind="sql", url=url, table="errors", lookback=86400), state)
    state.close()


def test_postgres_row_committed_after_the_night_with_a_lower_key(postgres) -> None:
    """A sequence value is taken at insert, the row is visible at commit: a transaction that
    inserted before the night read but committed after it has a key below the cursor."""
    url, table = pg_errors(postgres, "late_commit", sa.Text())
    state = StateStore(url)
    source = SourceConfig(kind="sql", url=url, table="errors", cursor_column="ingested_seq", lookback=1000)
    engine = sa.create_engine(url)
    slow = engine.connect()
    slow_tx = slow.begin()
    slow.execute(sa.insert(table).values(id="slow", logged_at="2025-01-01T10:00:00Z", input="in slow",
                                         correction="positive"))
    insert(url, table, [{"id": "fast", "logged_at": "2025-01-01T10:00:01Z", "input": "in fast", "correction": "positive"}])
    first = ingest(source, state, MODEL)
    assert ids(first) == ["fast"]
    commit(state, first, "n1")
    # the same nights without a look-back: the late row is lost (what the look-back is for)
    lossy = SourceConfig(kind="sql", url=url, table="errors", cursor_column="ingested_seq")
    state.commit_watermark("lossy", ingest(lossy, state, "lossy").pending_watermark, run_id="n1")
    slow_tx.commit()
    slow.close()
    second = ingest(source, state, MODEL)
    assert ids(second) == ["slow"]
    commit(state, second, "n2")
    assert ingest(source, state, MODEL).rows == []
    assert ingest(lossy, state, "lossy").rows == []
    engine.dispose()
    state.close()


def test_sql_version_1_watermark_resumes_after_its_cursor(error_db: tuple[str, sa.Table], state: StateStore) -> None:
    url, table = error_db
    insert(url, table, [sql_row("a", "2025-01-01T10:00:00Z"), sql_row("b", "2025-01-01T10:00:00Z")])
    v1 = {"kind": "sql", "table": "errors", "null_keys": [],
          "cursor": {"logged_at": encode_cursor_value("2025-01-01T10:00:00Z"), "id": encode_cursor_value("a")}}
    state.commit_watermark(MODEL, v1, run_id="old")
    assert ids(ingest(SourceConfig(kind="sql", url=url, table="errors"), state, MODEL)) == ["b"]
    with pytest.raises(SourceError, match="predates cursor_column"):
        ingest(SourceConfig(kind="sql", url=url, table="errors", cursor_column="input"), state, MODEL)


def test_sql_switching_cursor_column_reads_nothing_twice(tmp_path: Path, state: StateStore) -> None:
    url, table = text_stamp_db(tmp_path)
    insert(url, table, [{"id": "a", "logged_at": "2025-01-01T10:00:00Z", "input": "in a", "correction": "positive"}])
    commit(state, ingest(SourceConfig(kind="sql", url=url, table="errors"), state, MODEL), "n1")
    insert(url, table, [{"id": "b", "logged_at": "2025-01-01T09:00:00Z", "input": "in b", "correction": "positive"}])
    batch = ingest(SourceConfig(kind="sql", url=url, table="errors", cursor_column="seq"), state, MODEL)
    assert ids(batch) == ["b"] and batch.skipped_known == 1


def test_version_1_watermark_of_a_binary_file_is_not_reported_again(logs: Path, state: StateStore) -> None:
    import hashlib

    path = logs / "bad.jsonl"
    path.write_bytes(b"\x00\x01\x02\x03garbage\n\x00\x00\x00\xff" * 50)
    data = path.read_bytes()
    v1 = {"kind": "files", "files": {"bad.jsonl": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                                                   "rows": 0, "rows_sha256": "x"}}}
    state.commit_watermark(MODEL, v1, run_id="old")
    for night in ("n1", "n2"):
        batch = ingest(files_source(logs), state, MODEL)
        assert (batch.rows, batch.file_problems) == ([], []), night
        commit(state, batch, night)
