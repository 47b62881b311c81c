"""Each field of a logged row parsed once: `parse_row` turns a RawRow into a `ParsedRow`, whose
values feed the validation frame and, when every check passes, become the `ErrorRecord`.

Policies: an integer `id` is its decimal string; a timestamp without a time zone is rejected
unless ``naive="utc"``; equivalents and metadata may also come as JSON text (CSV, SQL).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from tasks.records import KNOWN_FIELDS, ErrorRecord, RawRow

_SURROGATES = re.compile("[\ud800-\udfff]")
# ISO 8601 as logs write it, parsed here rather than by datetime.fromisoformat, which before
# Python 3.11 rejects "Z", "+0200" and fractions other than 3 or 6 digits.
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2})(?::?(\d{2})(?::?(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?)?"
)


def short_repr(value: Any, limit: int = 80) -> str:
    """A value for a human-readable reason, cut to `limit` characters: numbers and timestamps
    plainly, anything else (ids, texts, odd types) as its repr."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalar -> python
    if isinstance(value, dt.datetime):  # pandas Timestamps included
        text = value.isoformat()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalise_input(text: str) -> str:
    """Input as compared for conflicts: NFKC, whitespace collapsed and stripped, casefolded."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def normalise_correction(text: str) -> str:
    """Correction as compared for conflicts: whitespace collapsed and stripped, case kept."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def coerce_id(value: Any) -> Any:
    """Integer ids (SQL/parquet) become their decimal string; anything else is left to checks."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def parse_iso(text: str) -> dt.datetime:
    """An ISO-8601 date-time (``Z``, ``±HH[:MM]``, any fraction digits), the same on every Python."""
    match = _ISO.fullmatch(text)
    if match is None:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    micro = int((fraction or "")[:6].ljust(6, "0"))
    zone = None
    if zulu:
        zone = dt.timezone.utc
    elif sign:
        offset = dt.timedelta(hours=int(off_h), minutes=int(off_m or 0))
        zone = dt.timezone(-offset if sign == "-" else offset)
    return dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                       micro, tzinfo=zone)


def parse_timestamp(value: Any, naive: str = "reject") -> tuple[dt.datetime | None, str | None]:
    """(UTC datetime, None) or (None, why not). A missing value is (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = parse_iso(value.strip())
        except ValueError:
            return None, f"not an ISO-8601 timestamp: {short_repr(value)}"
    else:
        return None, f"must be an ISO-8601 string or a timestamp, got {type(value).__name__}"
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        if naive != "utc":
            return None, f"timestamp has no time zone: {short_repr(value)}"
        parsed = parsed.replace(tzinfo=dt.timezone.utc)
    try:
        return parsed.astimezone(dt.timezone.utc), None
    except (OverflowError, ValueError) as exc:
        return None, f"timestamp out of range: {exc}"


def parse_equivalents(value: Any) -> tuple[list[str], str | None]:
    """Equivalents as a list of non-empty strings, or why not (a JSON list string is accepted)."""
    if value is None:
        return [], None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [], "must be a list of strings (or a JSON list), got a plain string"
    if not isinstance(value, (list, tuple)):
        return [], f"must be a list of strings, got {type(value).__name__}"
    for index, item in enumerate(value):
        if not isinstance(item, str):
            return [], f"item {index} is not a string ({type(item).__name__})"
        if not item.strip():
            return [], f"item {index} is empty"
    return list(value), None


def parse_metadata(value: Any) -> tuple[dict[str, Any], str | None]:
    """Metadata as a dict, or why not (a JSON object string is accepted)."""
    if value is None:
        return {}, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}, "must be an object (or a JSON object string)"
    if not isinstance(value, dict):
        return {}, f"must be an object, got {type(value).__name__}"
    return value, None


def text_view(value: Any) -> str | None:
    """The value if it is text, with lone surrogates made visible as U+FFFD; else None."""
    if not isinstance(value, str):
        return None
    return _SURROGATES.sub("\ufffd", value)


@dataclass
class ParsedRow:
    """A parseable row's fields as logged (`values`, id coerced) and as parsed, with the reason
    each parse failed. The checks run on these; `record` is the row once they all pass."""

    origin: str
    values: dict[str, Any]
    logged_at: dt.datetime | None
    logged_at_error: str | None
    equivalents: list[str]
    equivalents_error: str | None
    metadata: dict[str, Any]
    metadata_error: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def text(self, name: str) -> str | None:
        return text_view(self.values[name])

    def record(self) -> ErrorRecord:
        """The ErrorRecord of a row that passed every check (pydantic still guards the types)."""
        metadata = self.metadata
        if self.extra:
            metadata = {**metadata, "extra_fields": json.loads(json.dumps(self.extra, default=str))}
        v = self.values
        return ErrorRecord(id=v["id"], logged_at=self.logged_at, input=v["input"], correction=v["correction"],
                           prediction=v["prediction"], equivalents=self.equivalents, model=v["model"],
                           source=v["source"], metadata=metadata, origin=self.origin)


def parse_row(row: RawRow, naive: str = "reject") -> ParsedRow:
    """Parse every field of a row that ingest could read (``row.data`` is a dict)."""
    data = row.data or {}
    values = {name: data.get(name) for name in KNOWN_FIELDS}
    values["id"] = coerce_id(values["id"])
    stamp, stamp_error = parse_timestamp(values["logged_at"], naive)
    equivalents, equivalents_error = parse_equivalents(values["equivalents"])
    metadata, metadata_error = parse_metadata(values["metadata"])
    extra = {k: v for k, v in data.items() if k not in KNOWN_FIELDS}
    return ParsedRow(row.origin, values, stamp, stamp_error, equivalents, equivalents_error, metadata,
                     metadata_error, extra)
