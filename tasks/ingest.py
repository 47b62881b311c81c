"""Ingest: the new rows of a model's error log since its last committed watermark.

Incremental and idempotent: `ingest` only *proposes* a watermark (`IngestBatch.pending_watermark`);
the flow commits it with `StateStore.commit_watermark` after a successful night. Until then a
re-run reads the same rows again, and after it nothing old is read twice. How each source keeps
its place: `tasks.file_source` (a directory of log files) and `tasks.sql_source` (a table).

Nothing here judges a row's content (that is `tasks.validate`); ingest only reports rows it
cannot parse (`RawRow.problem`) and files it cannot read (`FileProblem`), so nothing is dropped.
"""

from __future__ import annotations

from functools import partial

from tasks.file_source import ingest_files
from tasks.sources import IngestBatch, SourceConfig, SourceError
from tasks.sql_source import ingest_sql
from tasks.state import StateStore

__all__ = ["IngestBatch", "SourceConfig", "SourceError", "StateStore", "ingest"]


def ingest(source: SourceConfig, state: StateStore, model: str) -> IngestBatch:
    """Read the rows of `source` that `model`'s committed watermark has not consumed yet."""
    previous = state.get_watermark(model)
    if previous is not None and previous.get("kind") != source.kind:
        raise SourceError(
            f"the committed watermark of model {model!r} is for a {previous.get('kind')!r} "
            f"source but the configured source is {source.kind!r}; reset the state to switch"
        )
    known = partial(state.ingested, model)
    if source.kind == "files":
        return ingest_files(source.path, previous, known)  # type: ignore[arg-type]
    return ingest_sql(source, previous, known)
