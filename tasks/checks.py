"""The Great Expectations suite that validation runs, and the frame it runs on.

Each parsed row becomes one frame row: the fields as logged plus derived columns (text views,
lengths in characters and tokens, the parsed UTC timestamp, why a nested field or the edit
could not be used, how many corrections the same normalised input has). A GX 1.x suite runs on
the frame with ``result_format="COMPLETE"``; each failed expectation's unexpected rows (keyed by
the ``__row`` column) map back, so a quarantined row lists *every* check it failed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tasks.fields import ParsedRow, normalise_correction, normalise_input, short_repr, text_view
from tasks.records import REQUIRED_FIELDS

if TYPE_CHECKING:
    from tasks.validate import ValidationContext

log = logging.getLogger(__name__)

SUITE_NAME = "patchflow_error_records"
CLOCK_SKEW = timedelta(minutes=5)
ROW = "__row"
TEXT_FIELDS: tuple[str, ...] = ("id", "input", "correction", "prediction", "model", "source")
# Control characters (C0 except tab/newline/carriage return, DEL, C1) and U+FFFD, which marks
# bytes that were not valid text (lone surrogates are mapped to it before GX sees the text).
# Written so that both Python `re` and pyarrow's RE2 (pandas 3 strings) accept it.
CONTROL_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]|" + "\ufffd"


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


def _frame_value(value: Any) -> Any:
    """A raw value safe to put in the GX frame (GX hashes it; surrogates would crash pyarrow)."""
    return text_view(value) if isinstance(value, str) else value


def _length(text: str | None, strip: bool = False) -> int | None:
    return None if text is None else len(text.strip() if strip else text)


def edit_error(row: ParsedRow, ctx: "ValidationContext", tokens: list[int | None]) -> str | None:
    """Why patching cannot use this row (`ctx.check_edit` on the input and each equivalent), or
    None. Rows the cheaper checks already reject (not text, empty, too many characters or
    tokens, not a label) are not asked, so each problem is reported once."""
    texts = [row.text("input"), row.text("correction"), *row.equivalents]
    correction = texts[1]
    if (
        ctx.check_edit is None
        or any(t is None or not t.strip() or len(t) > ctx.max_chars for t in texts)
        or any(n is None or n > ctx.max_input_tokens for n in tokens)
        or (ctx.labels is not None and correction not in ctx.labels)
    ):
        return None
    for label, text in [("", texts[0])] + [(f"equivalent {i}: ", e) for i, e in enumerate(row.equivalents)]:
        try:
            problem = ctx.check_edit(text, correction)  # type: ignore[arg-type]
        except Exception as exc:  # one row's failure must not stop the night
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            return label + problem
    return None


def build_frame(rows: list[ParsedRow], ctx: "ValidationContext") -> pd.DataFrame:
    """One frame row per parsed row: its fields plus the derived columns the suite checks."""
    columns: dict[str, list[Any]] = {}

    def put(name: str, value: Any) -> None:
        columns.setdefault(name, []).append(value)

    def tokens(text: str | None) -> int | None:  # a text over the character limit is not tokenised
        return None if text is None or len(text) > ctx.max_chars else ctx.count_tokens(text)

    for index, row in enumerate(rows):
        texts = {f: row.text(f) for f in TEXT_FIELDS}
        equivalents = [text_view(e) or "" for e in row.equivalents]
        put(ROW, index)
        for f in (*REQUIRED_FIELDS, "prediction", "model", "source"):
            put(f, _frame_value(row.values[f]))
        for f in TEXT_FIELDS:
            put(f"{f}_text", texts[f])
        for f in ("id", "input", "correction"):
            put(f"{f}_stripped_chars", _length(texts[f], strip=True))
        put("input_chars", _length(texts["input"]))
        put("correction_chars", _length(texts["correction"]))
        counts = [tokens(texts["input"]), *map(tokens, equivalents)]
        put("input_tokens", counts[0])
        put("equivalents_text", " ".join(equivalents) or None)
        put("equivalents_max_chars", max(map(len, equivalents), default=None))
        put("equivalents_max_tokens", max((t for t in counts[1:] if t is not None), default=None))
        put("id_applied_before", None if texts["id"] is None else texts["id"] in ctx.known_ids)
        put("logged_at_utc", row.logged_at)
        put("logged_at_error", row.logged_at_error)
        put("equivalents_error", row.equivalents_error)
        put("metadata_error", row.metadata_error)
        put("edit_error", edit_error(row, ctx, counts))
    if not rows:
        return pd.DataFrame()
    columns["corrections_per_input"] = corrections_per_input(columns["input_text"], columns["correction_text"])
    return pd.DataFrame({name: pd.Series(values, dtype=_dtype(name)) for name, values in columns.items()})


def _dtype(name: str) -> str:
    if name == ROW:
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


def build_checks(ctx: "ValidationContext") -> list[Check]:
    """The expectation suite, with a human explanation of each expectation."""
    import great_expectations.expectations as gxe

    between, null, in_set = gxe.ExpectColumnValuesToBeBetween, gxe.ExpectColumnValuesToBeNull, gxe.ExpectColumnValuesToBeInSet
    checks: list[Check] = []
    for f in REQUIRED_FIELDS:
        checks.append(Check(gxe.ExpectColumnValuesToNotBeNull(column=f), f"required field {f} is missing"))
    for f in TEXT_FIELDS:
        checks.append(Check(gxe.ExpectColumnValuesToBeOfType(column=f, type_="str"), f"{f} must be a string, got {{value}}"))
    for f in ("id", "input", "correction"):
        checks.append(Check(between(column=f"{f}_stripped_chars", min_value=1), f"{f} is empty or whitespace only"))
    for f in (*TEXT_FIELDS, "equivalents"):
        checks.append(Check(gxe.ExpectColumnValuesToNotMatchRegex(column=f"{f}_text", regex=CONTROL_REGEX),
                            f"{f} contains control characters or undecodable bytes: {{value}}"))
    limit, chars = ctx.max_input_tokens, ctx.max_chars
    checks += [
        Check(between(column="input_chars", max_value=chars), f"input has {{value}} characters, more than {chars}"),
        Check(between(column="correction_chars", max_value=chars), f"correction has {{value}} characters, more than {chars}"),
        Check(between(column="equivalents_max_chars", max_value=chars),
              f"an equivalent has {{value}} characters, more than {chars}"),
        Check(between(column="input_tokens", max_value=limit), f"input has {{value}} tokens, more than the model's {limit}"),
        Check(between(column="equivalents_max_tokens", max_value=limit),
              f"an equivalent has {{value}} tokens, more than the model's {limit}"),
        Check(null(column="logged_at_error"), "logged_at {value}", plain=True),
        Check(between(column="logged_at_utc", max_value=pd.Timestamp(ctx.now + CLOCK_SKEW)),
              "logged_at is in the future: {value}"),
        Check(null(column="equivalents_error"), "equivalents {value}", plain=True),
        Check(null(column="metadata_error"), "metadata {value}", plain=True),
        Check(gxe.ExpectColumnValuesToBeUnique(column="id_text"), "id {value} occurs more than once in this batch"),
        Check(between(column="corrections_per_input", max_value=1),
              "the same input (normalised) has {value} different corrections in this batch", key="conflicting_corrections"),
        Check(in_set(column="model_text", value_set=[ctx.model]), f"row is for model {{value}}, not {ctx.model!r}",
              key="wrong_model"),
        # known ids are looked up in pandas (the ledger can hold many thousand ids; as a GX value
        # set they would be serialised into the suite and every data docs page)
        Check(in_set(column="id_applied_before", value_set=[False]), "id was already applied in an earlier night",
              key="already_applied"),
        Check(null(column="edit_error"), "{value}", key="unpatchable", plain=True),
    ]
    if ctx.labels is not None:
        checks.append(Check(in_set(column="correction_text", value_set=list(ctx.labels)),
                            "correction {value} is not one of the model's labels"))
    return checks


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
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(Path(data_docs_dir).resolve())},
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
    frame: pd.DataFrame, checks: list[Check], ctx: "ValidationContext"
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
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME, expectations=[c.expectation for c in checks]))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=_safe_name(f"{ctx.model}-{ctx.run_id}"), data=batch, suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
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
            reasons.setdefault(int(item[ROW]), []).append(check.reason(item.get(check.column)))
    index_path = None
    if ctx.data_docs_dir is not None:
        urls = context.build_data_docs(site_names=["patchflow"])
        index_path = Path(ctx.data_docs_dir).resolve() / "index.html"
        log.info("GX data docs: %s", urls.get("patchflow"))
    return reasons, bool(result.success), index_path
