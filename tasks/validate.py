"""Validate ingested rows with a Great Expectations suite; split them into accepted and quarantined.

How it works: parseable rows become a pandas frame with the raw fields plus derived columns (text
views, stripped lengths, token counts, the parsed UTC timestamp, per-row errors of nested fields,
how many corrections the same normalised input has). A GX 1.x suite defined in `build_checks` runs
on that frame with ``result_format="COMPLETE"``; each failed expectation's unexpected rows (keyed by
the ``__row`` column) are mapped back so every quarantined row lists *every* check it failed.

A reason reads ``"<key>: <detail>"``. The key is ``<expectation type>(<column the suite ran on>)``
(e.g. ``expect_column_values_to_not_be_null(input)``, ``expect_column_values_to_be_between(
input_tokens)``), or a domain name for ``conflicting_corrections``, ``wrong_model`` and
``already_applied`` (id in ``ctx.known_ids``); rows that could not be parsed keep the key ingest
gave them (``invalid_json``, ``not_utf8``, ``not_a_json_object``, ``csv_wrong_field_count``).
`tasks.records.reason_key` extracts the key; ``counts["by_reason"]`` counts rows per key.

Policies: an integer `id` is accepted as its decimal string; a timestamp without a time zone is
rejected unless ``naive_timestamps="utc"``; duplicate ids in a batch quarantine *all* copies, as
conflicting corrections quarantine all rows of that input; a row with `model` set to another model
is quarantined as ``wrong_model`` (never silently dropped); NaN counts as missing; tab, newline
and carriage return are allowed in text, other control characters and U+FFFD are not.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.records import (
    KNOWN_FIELDS,
    REQUIRED_FIELDS,
    ErrorRecord,
    QuarantineRow,
    RawRow,
    reason_key,
    utc_now,
)

log = logging.getLogger(__name__)

SUITE_NAME = "patchflow_error_records"
CLOCK_SKEW = timedelta(minutes=5)
TEXT_FIELDS: tuple[str, ...] = ("id", "input", "correction", "prediction", "model", "source")
# Control characters (C0 except tab/newline/carriage return, DEL, C1) and U+FFFD, which marks
# bytes that were not valid text (lone surrogates are mapped to it before GX sees the text).
# Written so that both Python `re` and pyarrow's RE2 (pandas 3 strings) accept it.
CONTROL_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|" + "\ufffd"
_SURROGATES = re.compile("[\ud800-\udfff]")
_ROW = "__row"
# GX 1.x keeps a process-wide "project context" that a ValidationDefinition resolves at run time;
# two validations in threads (e.g. a Prefect thread pool) must not interleave on it.
_GX_LOCK = threading.Lock()


class ValidationContext(BaseModel):
    """What validation needs to know about the model and the night."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: str
    run_id: str
    labels: list[str] | None = None
    max_input_tokens: int
    count_tokens: Callable[[str], int]
    known_ids: set[str] = Field(default_factory=set)
    now: datetime = Field(default_factory=utc_now)
    data_docs_dir: Path | None = None
    naive_timestamps: Literal["reject", "utc"] = "reject"

    @field_validator("now")
    @classmethod
    def _utc_now(cls, value: datetime) -> datetime:
        return _aware(value).astimezone(timezone.utc)


class ValidationResult(BaseModel):
    """Accepted records, quarantined rows and counts; every input row is in exactly one list."""

    accepted: list[ErrorRecord] = Field(default_factory=list)
    quarantined: list[QuarantineRow] = Field(default_factory=list)
    counts: dict[str, Any] = Field(default_factory=dict)
    data_docs_index: Path | None = None
    gx_success: bool | None = None


@dataclass(frozen=True)
class Check:
    """One expectation of the suite and how to explain its failures to a human."""

    expectation: Any
    detail: str
    key: str | None = None
    plain: bool = False  # the column holds our own message: show it without quotes

    @property
    def column(self) -> str:
        return self.expectation.column

    @property
    def reason_key(self) -> str:
        return self.key or f"{self.expectation.expectation_type}({self.column})"

    def reason(self, value: Any) -> str:
        shown = value if isinstance(value, str) and self.plain else short_repr(value)
        return f"{self.reason_key}: " + self.detail.format(value=shown)


def short_repr(value: Any, limit: int = 80) -> str:
    """A value for a human-readable reason, cut to `limit` characters.

    Messages computed by us (the ``*_error`` columns) are shown as they are, numbers and
    timestamps plainly, anything else (ids, texts, odd types) as its repr.
    """
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy scalar -> python
    if isinstance(value, (pd.Timestamp, datetime)):
        text = value.isoformat()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Field normalisation (pure functions, used to build the frame and the accepted records)
# --------------------------------------------------------------------------------------------


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


def parse_timestamp(value: Any, naive: str = "reject") -> tuple[datetime | None, str | None]:
    """(UTC datetime, None) or (None, why not). A missing value is (None, None)."""
    if value is None:
        return None, None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None, f"not an ISO-8601 timestamp: {short_repr(value)}"
    else:
        return None, f"must be an ISO-8601 string or a timestamp, got {type(value).__name__}"
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        if naive != "utc":
            return None, f"timestamp has no time zone: {short_repr(value)}"
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.astimezone(timezone.utc), None
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


def frame_value(value: Any) -> Any:
    """A raw value safe to put in the GX frame (GX hashes it; surrogates would crash pyarrow)."""
    return text_view(value) if isinstance(value, str) else value


# --------------------------------------------------------------------------------------------
# Frame and suite
# --------------------------------------------------------------------------------------------


def _stripped_chars(value: str | None) -> int | None:
    return None if value is None else len(value.strip())


def build_frame(rows: list[RawRow], ctx: ValidationContext) -> pd.DataFrame:
    """One row per parseable RawRow: raw fields plus the derived columns the suite checks."""
    columns: dict[str, list[Any]] = {name: [] for name in _frame_columns()}
    for index, row in enumerate(rows):
        data = row.data or {}
        raw = {f: coerce_id(data.get(f)) if f == "id" else data.get(f) for f in KNOWN_FIELDS}
        texts = {f: text_view(raw[f]) for f in TEXT_FIELDS}
        stamp, stamp_error = parse_timestamp(raw["logged_at"], ctx.naive_timestamps)
        equivalents, equivalents_error = parse_equivalents(raw["equivalents"])
        _, metadata_error = parse_metadata(raw["metadata"])
        columns[_ROW].append(index)
        for f in (*REQUIRED_FIELDS, "prediction", "model", "source"):
            columns[f].append(frame_value(raw[f]))
        for f in TEXT_FIELDS:
            columns[f"{f}_text"].append(texts[f])
        for f in ("id", "input", "correction"):
            columns[f"{f}_stripped_chars"].append(_stripped_chars(texts[f]))
        columns["input_tokens"].append(None if texts["input"] is None else ctx.count_tokens(texts["input"]))
        columns["equivalents_text"].append(" ".join(text_view(e) or "" for e in equivalents) or None)
        columns["equivalents_max_tokens"].append(
            max((ctx.count_tokens(e) for e in equivalents), default=None)
        )
        columns["id_applied_before"].append(None if texts["id"] is None else texts["id"] in ctx.known_ids)
        columns["logged_at_utc"].append(stamp)
        columns["logged_at_error"].append(stamp_error)
        columns["equivalents_error"].append(equivalents_error)
        columns["metadata_error"].append(metadata_error)
    columns["corrections_per_input"] = corrections_per_input(columns["input_text"], columns["correction_text"])
    frame = pd.DataFrame({name: pd.Series(values, dtype=_dtype(name)) for name, values in columns.items()})
    return frame


def _frame_columns() -> list[str]:
    return [
        _ROW,
        *REQUIRED_FIELDS,
        "prediction",
        "model",
        "source",
        *(f"{f}_text" for f in TEXT_FIELDS),
        "id_stripped_chars",
        "input_stripped_chars",
        "correction_stripped_chars",
        "input_tokens",
        "equivalents_text",
        "equivalents_max_tokens",
        "id_applied_before",
        "logged_at_utc",
        "logged_at_error",
        "equivalents_error",
        "metadata_error",
    ]


def _dtype(name: str) -> str:
    if name == _ROW:
        return "int64"
    if name == "logged_at_utc":
        return "datetime64[us, UTC]"
    if name.endswith(("_chars", "_tokens")) or name == "corrections_per_input":
        return "Int64"
    return "object"


def corrections_per_input(inputs: list[str | None], corrections: list[str | None]) -> list[int | None]:
    """For each row, how many distinct corrections its normalised input has in the batch."""
    groups: dict[str, set[str]] = {}
    keys: list[str | None] = []
    for text, correction in zip(inputs, corrections):
        if not text or not text.strip() or correction is None or not correction.strip():
            keys.append(None)
            continue
        key = normalise_input(text)
        groups.setdefault(key, set()).add(normalise_correction(correction))
        keys.append(key)
    return [None if key is None else len(groups[key]) for key in keys]


def build_checks(ctx: ValidationContext) -> list[Check]:
    """The expectation suite, with a human explanation of each expectation."""
    import great_expectations.expectations as gxe

    checks: list[Check] = []
    for field in REQUIRED_FIELDS:
        checks.append(Check(gxe.ExpectColumnValuesToNotBeNull(column=field), f"required field {field} is missing"))
    for field in ("id", "input", "correction", "prediction", "model", "source"):
        checks.append(
            Check(gxe.ExpectColumnValuesToBeOfType(column=field, type_="str"), f"{field} must be a string, got {{value}}")
        )
    for field in ("id", "input", "correction"):
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeBetween(column=f"{field}_stripped_chars", min_value=1),
                f"{field} is empty or whitespace only",
            )
        )
    for field in (*TEXT_FIELDS, "equivalents"):
        checks.append(
            Check(
                gxe.ExpectColumnValuesToNotMatchRegex(column=f"{field}_text", regex=CONTROL_REGEX),
                f"{field} contains control characters or undecodable bytes: {{value}}",
            )
        )
    checks += [
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="input_tokens", max_value=ctx.max_input_tokens),
            f"input has {{value}} tokens, more than the model's {ctx.max_input_tokens}",
        ),
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="equivalents_max_tokens", max_value=ctx.max_input_tokens),
            f"an equivalent has {{value}} tokens, more than the model's {ctx.max_input_tokens}",
        ),
        Check(gxe.ExpectColumnValuesToBeNull(column="logged_at_error"), "logged_at {value}", plain=True),
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="logged_at_utc", max_value=pd.Timestamp(_aware(ctx.now) + CLOCK_SKEW)),
            "logged_at is in the future: {value}",
        ),
        Check(gxe.ExpectColumnValuesToBeNull(column="equivalents_error"), "equivalents {value}", plain=True),
        Check(gxe.ExpectColumnValuesToBeNull(column="metadata_error"), "metadata {value}", plain=True),
        Check(gxe.ExpectColumnValuesToBeUnique(column="id_text"), "id {value} occurs more than once in this batch"),
        Check(
            gxe.ExpectColumnValuesToBeBetween(column="corrections_per_input", max_value=1),
            "the same input (normalised) has {value} different corrections in this batch",
            key="conflicting_corrections",
        ),
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="model_text", value_set=[ctx.model]),
            f"row is for model {{value}}, not {ctx.model!r}",
            key="wrong_model",
        ),
    ]
    # known ids are looked up in pandas (the ledger can hold many thousand ids; as a GX value set
    # they would be serialised into the suite and every data docs page)
    checks.append(
        Check(
            gxe.ExpectColumnValuesToBeInSet(column="id_applied_before", value_set=[False]),
            "id was already applied in an earlier night",
            key="already_applied",
        )
    )
    if ctx.labels is not None:
        checks.append(
            Check(
                gxe.ExpectColumnValuesToBeInSet(column="correction_text", value_set=list(ctx.labels)),
                "correction {value} is not one of the model's labels",
            )
        )
    return checks


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------------------------
# Running GX
# --------------------------------------------------------------------------------------------


def _gx_context(data_docs_dir: Path | None) -> Any:
    """An ephemeral, offline GX context (no analytics, no progress bars, our docs site only)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    if data_docs_dir is not None:
        context.add_data_docs_site(
            site_name="patchflow",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(data_docs_dir).resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
    return context


def _safe_name(name: str) -> str:
    """A GX object name that is also a safe file name in the data docs (models look like org/x)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _raised(info: Any) -> str | None:
    """The exception message of a GX result, or None (exception_info is flat or per-metric)."""
    if not info:
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message") or "unknown error"
    return None


def run_suite(
    frame: pd.DataFrame, checks: list[Check], ctx: ValidationContext
) -> tuple[dict[int, list[str]], bool, Path | None]:
    """Run the suite on `frame`; return reasons per frame row, overall success, docs index."""
    import great_expectations as gx

    context = _gx_context(ctx.data_docs_dir)
    batch = (
        context.data_sources.add_pandas("patchflow_source")
        .add_dataframe_asset(f"{_safe_name(ctx.model)}_error_log")
        .add_batch_definition_whole_dataframe("night")
    )
    # Expectations go in at construction: suite.add_expectation re-serialises the whole suite
    # each time (quadratic, ~1 s for this suite). `meta.check` maps a result back to its Check.
    for index, check in enumerate(checks):
        check.expectation.meta = {**(check.expectation.meta or {}), "check": index, "reason_key": check.reason_key}
    suite = context.suites.add(
        gx.ExpectationSuite(name=SUITE_NAME, expectations=[c.expectation for c in checks])
    )
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=_safe_name(f"{ctx.model}-{ctx.run_id}"), data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW]},
    )
    reasons: dict[int, list[str]] = {}
    for outcome in result.results:
        config = outcome.expectation_config
        index = (config.meta or {}).get("check")
        check = checks[index] if isinstance(index, int) and 0 <= index < len(checks) else None
        error = _raised(outcome.exception_info)
        if check is None or error is not None:
            raise RuntimeError(f"GX expectation {config.type} failed to run: {error or 'unknown expectation'}")
        if outcome.success:
            continue
        for item in outcome.result.get("unexpected_index_list") or []:
            reasons.setdefault(int(item[_ROW]), []).append(check.reason(item.get(check.column)))
    index_path = None
    if ctx.data_docs_dir is not None:
        urls = context.build_data_docs(site_names=["patchflow"])
        index_path = Path(ctx.data_docs_dir).resolve() / "index.html"
        log.info("GX data docs: %s", urls.get("patchflow"))
    return reasons, bool(result.success), index_path


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def to_record(row: RawRow, ctx: ValidationContext) -> ErrorRecord:
    """Build the ErrorRecord of a row that passed every check."""
    data = row.data or {}
    stamp, _ = parse_timestamp(data.get("logged_at"), ctx.naive_timestamps)
    equivalents, _ = parse_equivalents(data.get("equivalents"))
    metadata, _ = parse_metadata(data.get("metadata"))
    extra = {k: v for k, v in data.items() if k not in KNOWN_FIELDS}
    if extra:
        metadata = {**metadata, "extra_fields": json.loads(json.dumps(extra, default=str))}
    return ErrorRecord(
        id=coerce_id(data["id"]),
        logged_at=stamp,
        input=data["input"],
        correction=data["correction"],
        prediction=data.get("prediction"),
        equivalents=equivalents,
        model=data.get("model"),
        source=data.get("source"),
        metadata=metadata,
        origin=row.origin,
    )


def _record_id(row: RawRow) -> str | None:
    value = coerce_id((row.data or {}).get("id"))
    return value if isinstance(value, str) else None


def quarantine_row(row: RawRow, reasons: list[str], ctx: ValidationContext) -> QuarantineRow:
    """The quarantine entry of a rejected row; its raw text is kept whole."""
    return QuarantineRow(
        model=ctx.model,
        run_id=ctx.run_id,
        origin=row.origin,
        record_id=_record_id(row),
        raw=row.raw,
        reasons=reasons,
        quarantined_at=ctx.now,
    )


def validate(batch_rows: list[RawRow], ctx: ValidationContext) -> ValidationResult:
    """Split rows into accepted records and quarantined rows (each with all its reasons)."""
    result = ValidationResult()
    positions = [i for i, row in enumerate(batch_rows) if row.data is not None and row.problem is None]
    parseable = [batch_rows[i] for i in positions]
    frame_index = {position: index for index, position in enumerate(positions)}
    reasons: dict[int, list[str]] = {}
    if parseable:
        checks = build_checks(ctx)
        frame = build_frame(parseable, ctx)
        with _GX_LOCK:
            reasons, result.gx_success, result.data_docs_index = run_suite(frame, checks, ctx)

    for position, row in enumerate(batch_rows):
        if row.data is None or row.problem is not None:
            result.quarantined.append(quarantine_row(row, [row.problem or "unparseable: no data"], ctx))
            continue
        index = frame_index[position]
        if index in reasons:
            result.quarantined.append(quarantine_row(row, reasons[index], ctx))
            continue
        try:
            result.accepted.append(to_record(row, ctx))
        except (ValidationError, KeyError, TypeError, ValueError) as exc:  # a check we lack
            result.quarantined.append(quarantine_row(row, [f"record_invalid: {exc}"], ctx))

    assert len(result.accepted) + len(result.quarantined) == len(batch_rows), "a row was lost"
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
