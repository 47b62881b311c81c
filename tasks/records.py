"""Data records shared by ingest, validation, quarantine and the later tasks.

These are the contracts between the parts of patchflow: an `ErrorRecord` is a logged mistake that
passed validation; a `RawRow` is what ingest read before anyone judged it; a `QuarantineRow` is a
rejected row with every reason it was rejected; a `FileProblem` is a whole file that could not be
read row by row; a `LedgerEntry` is one edit a registered model version contains (its `ledger.json`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

REQUIRED_FIELDS: tuple[str, ...] = ("id", "logged_at", "input", "correction")
OPTIONAL_FIELDS: tuple[str, ...] = ("prediction", "equivalents", "model", "source", "metadata")
KNOWN_FIELDS: tuple[str, ...] = REQUIRED_FIELDS + OPTIONAL_FIELDS


def utc_now() -> datetime:
    """Current time, tz-aware UTC (naive datetimes are never produced by patchflow)."""
    return datetime.now(timezone.utc)


def safe_text(text: str) -> str:
    """Make text encodable as UTF-8 without losing content.

    Lone surrogates (e.g. from a JSON escape like "\\ud800") cannot be stored in a database or
    written to a file, and PostgreSQL text cannot hold NUL; both are replaced by their backslash
    escape so the content survives.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def reason_key(reason: str) -> str:
    """The stable part of a reason string (before the first ': '), used to count reasons."""
    return reason.split(": ", 1)[0]


class ErrorRecord(BaseModel):
    """One validated, logged mistake of a deployed model."""

    id: str
    logged_at: datetime
    input: str
    correction: str
    prediction: str | None = None
    equivalents: list[str] = Field(default_factory=list)
    model: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    origin: str

    @field_validator("logged_at")
    @classmethod
    def _tz_aware_utc(cls, value: datetime) -> datetime:
        # Records are compared and ordered across sources; a naive time would be ambiguous.
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("logged_at must be timezone-aware")
        return value.astimezone(timezone.utc)


class RawRow(BaseModel):
    """A row as ingest read it, before validation.

    `data` is None when the row could not even be parsed (invalid JSON, non-UTF-8 bytes, a ragged
    CSV record); `problem` then says why, as `"<check>: <detail>"`. `raw` always holds the row's
    content as text so that a quarantined row can be inspected and re-fed later.
    """

    origin: str
    data: dict[str, Any] | None
    raw: str
    problem: str | None = None


class FileProblem(BaseModel):
    """A whole file that could not be read row by row (binary, corrupt, rewritten)."""

    origin: str
    reason: str
    raw: str = ""


class QuarantineRow(BaseModel):
    """A rejected row, kept forever, with every check it failed."""

    model: str
    run_id: str
    origin: str
    record_id: str | None = None
    raw: str
    reasons: list[str]
    quarantined_at: datetime = Field(default_factory=utc_now)

    @field_validator("raw")
    @classmethod
    def _storable_raw(cls, value: str) -> str:
        return safe_text(value)

    @field_validator("reasons")
    @classmethod
    def _storable_reasons(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a quarantined row needs at least one reason")
        return [safe_text(r) for r in value]

    @field_validator("record_id")
    @classmethod
    def _storable_id(cls, value: str | None) -> str | None:
        return None if value is None else safe_text(value)

    @field_validator("quarantined_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class LedgerEntry(BaseModel):
    """One edit contained in a model version. A version's ledger lists every edit since the base
    model, so retention (ER) and the memory of later nights cover all of them.

    ``equivalents`` are the paraphrases the patch was trained on; ``heldout_equivalents`` were given
    by the user but kept out of training, so the gate measures generalisation on wordings the patch
    never saw.
    """

    id: str
    input: str
    correction: str
    equivalents: list[str] = Field(default_factory=list)
    heldout_equivalents: list[str] = Field(default_factory=list)
    logged_at: datetime | None = None
    origin: str = ""
    neurons: int = 0
    steps: int = 0


def write_ledger(path: str | os.PathLike, entries: list[LedgerEntry]) -> Path:
    """Write a ledger as JSON (a list of entries), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
    os.replace(tmp, path)
    return path


def read_ledger(path: str | os.PathLike) -> list[LedgerEntry]:
    """Read a ledger written by `write_ledger`; a missing or malformed file raises."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ledger is a JSON list of entries")
    return [LedgerEntry.model_validate(e) for e in data]
