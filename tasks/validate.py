"""Validate ingested rows with a Great Expectations suite; split them into accepted and quarantined.

Each row is parsed once (`tasks.fields.parse_row`); the suite (`tasks.checks`) runs on a frame of
the parsed rows, and a row that passes every check becomes its `ErrorRecord` from the same parse.

A reason reads ``"<key>: <detail>"``. The key is ``<expectation type>(<column the suite ran on>)``
(e.g. ``expect_column_values_to_not_be_null(input)``, ``expect_column_values_to_be_between(
input_chars)``), or a domain name: ``conflicting_corrections``, ``wrong_model``,
``already_applied`` (id in ``ctx.known_ids``) and ``unpatchable`` (``ctx.check_edit`` gave a
reason); rows that could not be parsed keep the key ingest gave them (``invalid_json``,
``not_utf8``, ``not_a_json_object``, ``csv_wrong_field_count``). `tasks.records.reason_key`
extracts the key; ``counts["by_reason"]`` counts rows per key.

Policies: duplicate ids in a batch quarantine *all* copies, as conflicting corrections quarantine
all rows of that input; a row for another model is quarantined as ``wrong_model`` (never silently
dropped); NaN counts as missing; tab, newline and carriage return are allowed in text, other
control characters and U+FFFD are not; input, correction and each equivalent are at most
``max_chars`` characters (a huge input can be a single [UNK] token) and at most the model's tokens.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.checks import build_checks, build_frame, run_suite
from tasks.fields import ParsedRow, coerce_id, parse_row
from tasks.records import ErrorRecord, QuarantineRow, RawRow, reason_key, utc_now

# GX 1.x keeps a process-wide "project context" that a ValidationDefinition resolves at run time;
# two validations in threads (e.g. a Prefect thread pool) must not interleave on it.
_GX_LOCK = threading.Lock()


class ValidationContext(BaseModel):
    """What validation needs to know about the model and the night.

    `check_edit(input, correction)` returns why patching cannot use the pair (e.g. prompt +
    target longer than the model takes), or None; it is asked for the input and each equivalent.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    run_id: str
    labels: list[str] | None = None
    max_input_tokens: int
    count_tokens: Callable[[str], int]
    max_chars: int = Field(4000, ge=1)
    check_edit: Callable[[str, str], str | None] | None = None
    known_ids: set[str] = Field(default_factory=set)
    now: datetime = Field(default_factory=utc_now)
    data_docs_dir: Path | None = None
    naive_timestamps: Literal["reject", "utc"] = "reject"

    @field_validator("now")
    @classmethod
    def _utc_now(cls, value: datetime) -> datetime:
        aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        return aware.astimezone(timezone.utc)


class ValidationResult(BaseModel):
    """Accepted records, quarantined rows and counts; every input row is in exactly one list."""

    accepted: list[ErrorRecord] = Field(default_factory=list)
    quarantined: list[QuarantineRow] = Field(default_factory=list)
    counts: dict[str, Any] = Field(default_factory=dict)
    data_docs_index: Path | None = None
    gx_success: bool | None = None


def quarantine_row(row: RawRow, reasons: list[str], ctx: ValidationContext) -> QuarantineRow:
    """The quarantine entry of a rejected row; its raw text is kept whole."""
    record_id = coerce_id((row.data or {}).get("id"))
    return QuarantineRow(
        model=ctx.model,
        run_id=ctx.run_id,
        origin=row.origin,
        record_id=record_id if isinstance(record_id, str) else None,
        raw=row.raw,
        reasons=reasons,
        quarantined_at=ctx.now,
    )


def validate(batch_rows: list[RawRow], ctx: ValidationContext) -> ValidationResult:
    """Split rows into accepted records and quarantined rows (each with all its reasons)."""
    result = ValidationResult()
    parsed: dict[int, ParsedRow] = {
        position: parse_row(row, ctx.naive_timestamps)
        for position, row in enumerate(batch_rows)
        if row.data is not None and row.problem is None
    }
    frame_index = {position: index for index, position in enumerate(parsed)}
    reasons: dict[int, list[str]] = {}
    if parsed:
        checks = build_checks(ctx)
        frame = build_frame(list(parsed.values()), ctx)
        with _GX_LOCK:
            reasons, result.gx_success, result.data_docs_index = run_suite(frame, checks, ctx)

    for position, row in enumerate(batch_rows):
        if position not in parsed:
            result.quarantined.append(quarantine_row(row, [row.problem or "unparseable: no data"], ctx))
        elif frame_index[position] in reasons:
            result.quarantined.append(quarantine_row(row, reasons[frame_index[position]], ctx))
        else:
            try:
                result.accepted.append(parsed[position].record())
            except (ValidationError, TypeError, ValueError) as exc:  # a check we lack
                result.quarantined.append(quarantine_row(row, [f"record_invalid: {exc}"], ctx))

    if len(result.accepted) + len(result.quarantined) != len(batch_rows):
        raise RuntimeError("validation lost a row")  # cannot happen; never let it pass silently
    result.counts = summarise(batch_rows, result)
    return result


def summarise(rows: list[RawRow], result: ValidationResult) -> dict[str, Any]:
    """Counts for logs and MLflow: totals and how many quarantined rows failed each check."""
    by_reason: dict[str, int] = {}
    for row in result.quarantined:
        for key in dict.fromkeys(reason_key(r) for r in row.reasons):
            by_reason[key] = by_reason.get(key, 0) + 1
    return {
        "rows_read": len(rows),
        "accepted": len(result.accepted),
        "quarantined": len(result.quarantined),
        "unparseable": sum(1 for r in rows if r.data is None or r.problem is not None),
        "by_reason": dict(sorted(by_reason.items())),
    }
