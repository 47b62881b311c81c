"""The quarantine: every rejected row with the reasons it was rejected, kept forever.

Append-only by design: a row is never updated or deleted here, so the quarantine is an audit log
of what the nightly flows refused and why. Same database as the state store by default (SQLite;
PostgreSQL in production, whose text columns cannot hold NUL: it is stored as its escape ``\\x00``,
as `safe_text` stores lone surrogates).
"""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import sqlalchemy as sa

from tasks.state import DEFAULT_STATE_URL, make_engine
from tasks.records import FileProblem, QuarantineRow, utc_now

EXPORT_COLUMNS: tuple[str, ...] = (
    "model",
    "run_id",
    "origin",
    "record_id",
    "raw",
    "reasons",
    "quarantined_at",
)


def file_problem_rows(
    problems: Iterable[FileProblem], model: str, run_id: str, now: datetime | None = None
) -> list[QuarantineRow]:
    """Quarantine rows for whole files ingest could not read (the file's content is kept)."""
    moment = now or utc_now()
    return [
        QuarantineRow(
            model=model,
            run_id=run_id,
            origin=problem.origin,
            record_id=None,
            raw=problem.raw,
            reasons=[problem.reason],
            quarantined_at=moment,
        )
        for problem in problems
    ]


class QuarantineStore:
    """Append-only store of QuarantineRow (SQLAlchemy; SQLite file by default)."""

    def __init__(self, url: str = DEFAULT_STATE_URL) -> None:
        self.url = url
        self._engine = make_engine(url)
        meta = sa.MetaData()
        self._table = sa.Table(
            "patchflow_quarantine",
            meta,
            sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("model", sa.String(255), nullable=False, index=True),
            sa.Column("run_id", sa.String(255), nullable=False, index=True),
            sa.Column("origin", sa.Text, nullable=False),
            sa.Column("record_id", sa.Text, nullable=True),
            sa.Column("raw", sa.Text, nullable=False),
            sa.Column("reasons", sa.Text, nullable=False),
            sa.Column("quarantined_at", sa.DateTime(timezone=True), nullable=False),
        )
        meta.create_all(self._engine)

    def add(self, rows: list[QuarantineRow]) -> int:
        """Append rows (in one transaction); returns how many were added."""
        if not rows:
            return 0
        values = [
            {
                "model": row.model,
                "run_id": row.run_id,
                "origin": _storable(row.origin),
                "record_id": None if row.record_id is None else _storable(row.record_id),
                "raw": _storable(row.raw),
                "reasons": json.dumps(row.reasons, ensure_ascii=False),
                "quarantined_at": row.quarantined_at,
            }
            for row in rows
        ]
        with self._engine.begin() as conn:
            conn.execute(sa.insert(self._table), values)
        return len(values)

    def _where(self, query: sa.Select, model: str | None, run_id: str | None) -> sa.Select:
        if model is not None:
            query = query.where(self._table.c.model == model)
        if run_id is not None:
            query = query.where(self._table.c.run_id == run_id)
        return query

    def list(self, model: str | None = None, run_id: str | None = None) -> list[QuarantineRow]:
        """Rows in the order they were added, optionally of one model and/or one run."""
        query = self._where(sa.select(self._table), model, run_id).order_by(self._table.c.pk)
        with self._engine.connect() as conn:
            return [_to_row(record) for record in conn.execute(query).mappings()]

    def count(self, model: str | None = None, run_id: str | None = None) -> int:
        """How many rows are quarantined (optionally of one model and/or one run)."""
        query = self._where(sa.select(sa.func.count()).select_from(self._table), model, run_id)
        with self._engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def export(self, path: Path, model: str | None = None, run_id: str | None = None) -> int:
        """Write rows to `.jsonl` or `.csv` (by suffix) for a human to inspect; returns the count."""
        path = Path(path)
        rows = self.list(model=model, run_id=run_id)
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".csv"):
            raise ValueError(f"export path must end in .jsonl or .csv, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".jsonl":
            with path.open("w", encoding="utf-8") as out:
                for row in rows:
                    out.write(row.model_dump_json() + "\n")
        else:
            with path.open("w", encoding="utf-8", newline="") as out:
                writer = csv.DictWriter(out, fieldnames=list(EXPORT_COLUMNS))
                writer.writeheader()
                for row in rows:
                    record = row.model_dump(mode="json")
                    record["reasons"] = json.dumps(row.reasons, ensure_ascii=False)
                    writer.writerow(record)
        return len(rows)

    def close(self) -> None:
        """Release the connection pool."""
        self._engine.dispose()


def _storable(text: str) -> str:
    """Text any SQL backend stores: NUL becomes its backslash escape."""
    return text.replace("\x00", "\\x00")


def _to_row(record: sa.RowMapping) -> QuarantineRow:
    moment = record["quarantined_at"]
    if moment.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return QuarantineRow(
        model=record["model"],
        run_id=record["run_id"],
        origin=record["origin"],
        record_id=record["record_id"],
        raw=record["raw"],
        reasons=json.loads(record["reasons"]),
        quarantined_at=moment,
    )
