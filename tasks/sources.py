"""What a source is (`SourceConfig`) and what reading it gives (`IngestBatch`), shared by the file
source (`tasks.file_source`), the SQL source (`tasks.sql_source`) and `tasks.ingest`."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, Field, model_validator

from tasks.records import FileProblem, RawRow

DEFAULT_SOURCE_URL = "sqlite:///.patchflow/errors.db"


class SourceError(RuntimeError):
    """The source itself is unusable (missing directory, missing table); the night cannot run."""


class SourceConfig(BaseModel):
    """Where a model's error log lives: a directory of files or a SQL table.

    For a table, `cursor_column` orders the rows (default ``logged_at``; better a monotonic
    insertion key or insertion time, so a row logged early but committed late is still read).
    `lookback` re-reads that far behind the last cursor value, in the column's units (seconds
    for a time column): rows committed late inside that window are read, rows already ingested
    are recognised by their content and skipped.
    """

    kind: Literal["files", "sql"]
    path: Path | None = None
    url: str = DEFAULT_SOURCE_URL
    table: str | None = None
    db_schema: str | None = None
    cursor_column: str = "logged_at"
    lookback: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _complete(self) -> "SourceConfig":
        if self.kind == "files" and self.path is None:
            raise ValueError("a files source needs `path` (a directory)")
        if self.kind == "sql" and not self.table:
            raise ValueError("a sql source needs `table`")
        return self


class IngestBatch(BaseModel):
    """What one ingest read: the rows, whole-file problems and the watermark to commit later.

    `skipped_known` counts rows recognised as already ingested by an earlier night (a rotated
    or rewritten log); `waiting` names files whose last line is still being written (read next
    night).
    """

    rows: list[RawRow] = Field(default_factory=list)
    file_problems: list[FileProblem] = Field(default_factory=list)
    pending_watermark: dict[str, Any]
    rows_read: int = 0
    skipped_known: int = 0
    waiting: list[str] = Field(default_factory=list)


def row_digest(raw: str, context: str = "") -> str:
    """A row's identity across files and nights: a hash of its content (and, for CSV, its header)."""
    digest = hashlib.sha256(context.encode("utf-8", "backslashreplace"))
    digest.update(b"\x00")
    digest.update(raw.encode("utf-8", "backslashreplace"))
    return digest.hexdigest()



def keep_unseen(
    rows: list[RawRow], digests: list[str], known: Callable[[Iterable[str]], set[str]] | None,
    also_known: Callable[[RawRow], bool] = lambda row: False,
) -> tuple[list[RawRow], list[str], int]:
    """Drop rows an earlier night ingested (`known` digests, or `also_known`) or read twice
    tonight; return the kept rows, their digests and how many were dropped."""
    earlier = known(digests) if known is not None and digests else set()
    kept_rows: list[RawRow] = []
    kept: dict[str, None] = {}
    for row, digest in zip(rows, digests):
        if digest in earlier or digest in kept or also_known(row):
            continue
        kept_rows.append(row)
        kept[digest] = None
    return kept_rows, list(kept), len(rows) - len(kept_rows)
