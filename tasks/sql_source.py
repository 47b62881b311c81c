"""The SQL source: new rows of an error table, including rows committed late.

Rows are ordered by `SourceConfig.cursor_column` (default ``logged_at``; better a monotonic
insertion key or time). A night reads the rows at or after the last cursor value minus
`SourceConfig.lookback`, and skips rows already ingested (by content digest, kept by the state
store), so the boundary rows and the look-back window are never delivered twice, while a row
committed after a night read, with an earlier cursor value inside the window, is still read.
Rows whose cursor is NULL (or, in a text column, not a timestamp) cannot be ordered: they are
read every night and delivered once, by digest. Timestamps stored as text are parsed, never
compared as text.

Watermark: ``{"kind": "sql", "version": 2, "table", "cursor": {"column", "value"} | None}``, the
value tagged with its type (`encode_cursor_value`).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
from typing import Any, Callable, Iterable

import sqlalchemy as sa

from tasks.fields import parse_timestamp
from tasks.file_formats import to_json
from tasks.records import RawRow
from tasks.sources import IngestBatch, SourceConfig, SourceError, keep_unseen, row_digest
from tasks.state import NEW_ROWS, make_engine

Known = Callable[[Iterable[str]], set[str]]


def encode_cursor_value(value: Any) -> dict[str, Any]:
    """A DB value as tagged JSON, so it can be bound again with its original type."""
    if isinstance(value, dt.datetime):
        return {"type": "datetime", "value": value.isoformat()}
    if isinstance(value, dt.date):
        return {"type": "date", "value": value.isoformat()}
    if isinstance(value, bool):
        return {"type": "int", "value": int(value)}
    if isinstance(value, int):
        return {"type": "int", "value": value}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, decimal.Decimal):
        return {"type": "decimal", "value": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "bytes", "value": base64.b64encode(bytes(value)).decode("ascii")}
    return {"type": "str", "value": str(value)}


def decode_cursor_value(tagged: dict[str, Any]) -> Any:
    """Inverse of `encode_cursor_value`."""
    kind, value = tagged["type"], tagged["value"]
    decoders = {
        "datetime": dt.datetime.fromisoformat,  # our own isoformat() output: every Python reads it
        "date": dt.date.fromisoformat,
        "int": int,
        "float": float,
        "decimal": decimal.Decimal,
        "bytes": base64.b64decode,
        "str": str,
    }
    return decoders[kind](value)


def _source_table(engine: sa.Engine, source: SourceConfig) -> tuple[sa.TableClause, bool]:
    """The table with untyped columns (values come back exactly as the driver gives them), and
    whether the cursor column holds text."""
    inspector = sa.inspect(engine)
    if not inspector.has_table(source.table, schema=source.db_schema):  # type: ignore[arg-type]
        raise SourceError(f"table {source.table!r} does not exist in {engine.url!r}")
    columns = {c["name"]: c["type"] for c in inspector.get_columns(source.table, schema=source.db_schema)}  # type: ignore[arg-type]
    missing = {"id", "logged_at", source.cursor_column} - set(columns)
    if missing:
        raise SourceError(
            f"table {source.table!r} lacks the column(s) {sorted(missing)} needed to read it incrementally"
        )
    text = isinstance(columns[source.cursor_column], sa.String)
    return sa.table(source.table, *(sa.column(n) for n in columns), schema=source.db_schema), text  # type: ignore[arg-type]


def _order_key(value: Any, text: bool) -> Any:
    """The comparable cursor value of a row (text parsed as a timestamp), or None if unordered."""
    if value is None:
        return None
    if text:
        return parse_timestamp(value, naive="utc")[0]
    return value


def _back(value: Any, lookback: float) -> Any:
    """`value` moved `lookback` units back (seconds for times)."""
    if not lookback:
        return value
    if isinstance(value, (dt.datetime, dt.date)):
        return value - dt.timedelta(seconds=lookback)
    if isinstance(value, decimal.Decimal):
        return value - decimal.Decimal(str(lookback))
    if isinstance(value, (int, float)):
        return value - lookback
    return value  # a text key has no distance: re-read from the last value only


def ingest_sql(source: SourceConfig, previous: dict[str, Any] | None, known: Known | None = None) -> IngestBatch:
    """Read the rows of `source` from the watermark `previous` on (see module docstring)."""
    previous = previous or {}
    cursor = previous.get("cursor")
    if cursor is not None and "column" in cursor and cursor["column"] != source.cursor_column:
        cursor = None  # a new cursor column: read everything once, rows already read are skipped
    legacy = cursor is not None and "column" not in cursor  # version 1: (logged_at, id)
    if legacy and source.cursor_column != "logged_at":
        raise SourceError(
            f"the committed watermark of table {source.table!r} predates cursor_column; run one night "
            "with cursor_column: logged_at (the default) before switching to "
            f"{source.cursor_column!r}, so the rows read so far are known"
        )
    last = None if cursor is None else decode_cursor_value(cursor["logged_at" if legacy else "value"])
    engine = make_engine(source.url)
    try:
        table, text = _source_table(engine, source)
        column = table.c[source.cursor_column]
        query = sa.select(table)
        if last is not None and not text:
            bound = _back(last, source.lookback)
            if legacy:
                last_id = decode_cursor_value(cursor["id"])
                query = query.where(sa.or_(column.is_(None), column > sa.literal(bound),
                                           sa.and_(column == sa.literal(bound), table.c.id > sa.literal(last_id))))
            else:
                query = query.where(sa.or_(column.is_(None), column >= sa.literal(bound)))
        with engine.connect() as conn:
            records = [dict(r._mapping) for r in conn.execute(query)]
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"cannot read table {source.table!r}: {exc}") from exc
    finally:
        engine.dispose()

    keyed = [(_order_key(r[source.cursor_column], text), r) for r in records]
    last_key = _order_key(last, True) if text and isinstance(last, str) else last
    if last_key is not None and text:
        bound = _back(last_key, source.lookback)
        if legacy:  # version 1 read up to (logged_at, id) exactly
            last_id = decode_cursor_value(cursor["id"])
            after = lambda k, r: k > bound or (k == bound and r["id"] is not None and r["id"] > last_id)  # noqa: E731
            keyed = [(k, r) for k, r in keyed if k is None or after(k, r)]
        else:
            keyed = [(k, r) for k, r in keyed if k is None or k >= bound]
    ordered = sorted(((k, r) for k, r in keyed if k is not None), key=lambda kr: (kr[0], str(kr[1]["id"])))
    unordered = [r for k, r in keyed if k is None]

    rows = [RawRow(origin=f"{source.table}:{r['id']}", data=r, raw=to_json(r)) for _, r in ordered]
    rows += [RawRow(origin=f"{source.table}:{r['id']}", data=r, raw=to_json(r)) for r in unordered]
    legacy_seen = set(previous.get("null_keys") or [])  # version 1: hashes of rows without a cursor
    kept, digests, skipped = keep_unseen(
        rows, [row_digest(r.raw, str(source.table)) for r in rows], known,
        also_known=lambda row: hashlib.sha256(row.raw.encode()).hexdigest() in legacy_seen,
    )
    keys = [k for k, _ in ordered] + ([] if last_key is None else [last_key])
    newest = max(keys) if keys else None
    value = None if newest is None else {"column": source.cursor_column, "value": encode_cursor_value(newest)}
    watermark = {"kind": "sql", "version": 2, "table": source.table, "cursor": value, NEW_ROWS: digests}
    return IngestBatch(rows=kept, pending_watermark=watermark, rows_read=len(kept), skipped_known=skipped)
