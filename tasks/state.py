"""The state store: each model's committed watermark and the rows it has already ingested.

A night only *proposes* a watermark (`IngestBatch.pending_watermark`); the flow commits it after a
successful night, so a failed night reads the same rows again and a committed one never does. The
watermark is JSON owned by the source that wrote it. Under the key ``new_rows`` it carries the
content digests of the rows tonight read; `commit_watermark` moves them into a table, so a row
that turns up again (a rotated log, a rewritten file, a SQL look-back) is recognised and skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

from tasks.records import utc_now

DEFAULT_STATE_URL = "sqlite:///.patchflow/state.db"
NEW_ROWS = "new_rows"  # watermark key: digests of the rows a batch read (stored apart on commit)
_CHUNK = 500  # bound parameters per IN (...) query


def make_engine(url: str) -> sa.Engine:
    """Create an engine; for a SQLite file, create its parent directory first."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(url)


def _chunks(items: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class StateStore:
    """Durable per-model watermark with its history, and the digests of ingested rows
    (SQLAlchemy; a SQLite file by default, PostgreSQL in production)."""

    def __init__(self, url: str = DEFAULT_STATE_URL) -> None:
        self.url = url
        self._engine = make_engine(url)
        meta = sa.MetaData()
        self._current = sa.Table(
            "patchflow_watermarks",
            meta,
            sa.Column("model", sa.String(255), primary_key=True),
            sa.Column("watermark", sa.Text, nullable=False),
            sa.Column("run_id", sa.String(255), nullable=False),
            sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
        )
        self._history = sa.Table(
            "patchflow_watermark_history",
            meta,
            sa.Column("pk", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("model", sa.String(255), nullable=False, index=True),
            sa.Column("watermark", sa.Text, nullable=False),
            sa.Column("run_id", sa.String(255), nullable=False),
            sa.Column("committed_at", sa.DateTime(timezone=True), nullable=False),
        )
        self._rows = sa.Table(
            "patchflow_ingested_rows",
            meta,
            sa.Column("model", sa.String(255), primary_key=True),
            sa.Column("digest", sa.String(64), primary_key=True),
            sa.Column("run_id", sa.String(255), nullable=False),
        )
        meta.create_all(self._engine)

    def get_watermark(self, model: str) -> dict[str, Any] | None:
        """The last committed watermark of `model`, or None before its first successful night."""
        with self._engine.connect() as conn:
            text = conn.execute(
                sa.select(self._current.c.watermark).where(self._current.c.model == model)
            ).scalar_one_or_none()
        return None if text is None else json.loads(text)

    def ingested(self, model: str, digests: Iterable[str]) -> set[str]:
        """Which of `digests` belong to rows a committed night of `model` has already read."""
        wanted = sorted(set(digests))
        found: set[str] = set()
        with self._engine.connect() as conn:
            for chunk in _chunks(wanted):
                found.update(
                    conn.execute(
                        sa.select(self._rows.c.digest).where(
                            self._rows.c.model == model, self._rows.c.digest.in_(chunk)
                        )
                    ).scalars()
                )
        return found

    def commit_watermark(self, model: str, watermark: dict[str, Any], run_id: str) -> None:
        """Make `watermark` the committed one for `model`, atomically with its history row and the
        digests of the rows it read (``watermark["new_rows"]``, kept in their own table)."""
        stored = {k: v for k, v in watermark.items() if k != NEW_ROWS}
        digests = sorted(set(watermark.get(NEW_ROWS) or []))
        values = {
            "model": model,
            "watermark": json.dumps(stored, sort_keys=True),
            "run_id": run_id,
            "committed_at": utc_now(),
        }
        with self._engine.begin() as conn:
            updated = conn.execute(
                sa.update(self._current)
                .where(self._current.c.model == model)
                .values(**{k: v for k, v in values.items() if k != "model"})
            ).rowcount
            if not updated:
                conn.execute(sa.insert(self._current).values(**values))
            conn.execute(sa.insert(self._history).values(**values))
            for chunk in _chunks(digests):
                known = set(
                    conn.execute(
                        sa.select(self._rows.c.digest).where(
                            self._rows.c.model == model, self._rows.c.digest.in_(chunk)
                        )
                    ).scalars()
                )
                fresh = [{"model": model, "digest": d, "run_id": run_id} for d in chunk if d not in known]
                if fresh:
                    conn.execute(sa.insert(self._rows), fresh)

    def history(self, model: str) -> list[dict[str, Any]]:
        """Every watermark committed for `model`, oldest first (for audits)."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                sa.select(self._history)
                .where(self._history.c.model == model)
                .order_by(self._history.c.pk)
            ).mappings()
            return [{**dict(r), "watermark": json.loads(r["watermark"])} for r in rows]

    def close(self) -> None:
        """Release the connection pool (tests on tmp dirs need it)."""
        self._engine.dispose()
