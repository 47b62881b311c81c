"""Regenerate the bad-input corpus: `python tests/data/bad_inputs/generate.py`.

Each case is one small file plus an entry in MANIFEST.json (which is not itself a case: the test
copies only the case files into a temporary source directory) saying what must become of it when the
whole directory is ingested and validated as one night (see tests/tasks/test_validate.py) with:
model "sentiment", labels ["positive", "negative"], max_input_tokens 32 (whitespace tokens),
known_ids {"applied-001"}, now 2025-06-01T00:00:00Z.

expect: "accepted" (control files), "quarantined" (every row of the file is quarantined and lists
`reason` among its reasons), "file_problem" (the whole file is reported with `reason`, no rows),
"no_rows" (nothing read, nothing reported). Cases that take several nights (a half-written line
completed later, rotation, truncation, late SQL rows) are in scenarios.py.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
TS = "2025-01-01T10:00:00Z"

NOT_NULL = "expect_column_values_to_not_be_null({})"
OF_TYPE = "expect_column_values_to_be_of_type({})"
EMPTY = "expect_column_values_to_be_between({}_stripped_chars)"
CONTROL = "expect_column_values_to_not_match_regex({}_text)"
TIMESTAMP = "expect_column_values_to_be_null(logged_at_error)"
EQUIVALENTS = "expect_column_values_to_be_null(equivalents_error)"


def row(case: str, n: int = 1, **fields: object) -> dict:
    """A valid row, unique per case, with `fields` overriding (None value = field absent)."""
    base = {
        "id": f"{case}-{n}",
        "logged_at": TS,
        "input": f"the {case.replace('_', ' ')} example number {n} was fine",
        "correction": "positive",
        "prediction": "negative",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def csv_bytes(header: list[str], records: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(records)
    return out.getvalue().encode("utf-8")


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def cases() -> list[tuple[str, str, bytes, str, str | None, int, str]]:
    """(case, file, content, expect, reason key, rows, note)."""
    c: list[tuple[str, str, bytes, str, str | None, int, str]] = []

    def add(case, file, content, expect, reason, rows, note):
        c.append((case, file, content, expect, reason, rows, note))

    # --- controls: must be accepted -----------------------------------------------------------
    add("good_jsonl", "good.jsonl",
        jsonl(row("good", 1), row("good", 2, equivalents=["a fine paraphrase"], model="sentiment",
                                   source="web", metadata={"user": "u1"}))
        + b"\n   \n",  # blank lines are not rows
        "accepted", None, 2, "valid rows, blank lines ignored")
    add("good_crlf_bom", "good_crlf_bom.jsonl",
        b"\xef\xbb\xbf" + jsonl(row("crlf", 1)).replace(b"\n", b"\r\n"),
        "accepted", None, 1, "UTF-8 BOM and CRLF line endings are tolerated")
    add("good_csv", "good.csv",
        csv_bytes(["id", "logged_at", "input", "correction", "prediction", "equivalents", "model"],
                  [["csv-good-1", TS, "a good csv row here", "negative", "", '["a paraphrase"]', ""]]),
        "accepted", None, 1, "CSV, equivalents as JSON list string, empty cells = absent")
    add("good_parquet", "good.parquet",
        parquet_bytes(pa.table({
            "id": ["pq-good-1"], "logged_at": [TS], "input": ["a good parquet row"],
            "correction": ["positive"], "equivalents": [["one paraphrase"]]})),
        "accepted", None, 1, "parquet with a list column")
    add("int_id", "int_id.parquet",
        parquet_bytes(pa.table({"id": [424242], "logged_at": [TS], "input": ["an integer id row"],
                                "correction": ["positive"]})),
        "accepted", None, 1, "an integer id is accepted as its decimal string (policy)")

    # --- unparseable rows ----------------------------------------------------------------------
    add("invalid_json", "invalid_json.jsonl",
        b'{"id": "ij-1", "input": "x" "correction": "positive"}\n',
        "quarantined", "invalid_json", 1, "syntax error (missing comma)")
    add("truncated_json", "truncated_json.jsonl",
        b'{"id": "tr-1", "logged_at": "2025-01-01T10:00:00Z", "input": "the film was\n',
        "quarantined", "invalid_json", 1, "line cut off mid-string")
    add("json_array", "json_array.jsonl", b'[{"id": "arr-1"}, {"id": "arr-2"}]\n',
        "quarantined", "not_a_json_object", 1, "a JSON array instead of an object")
    add("json_scalar", "json_scalar.json", b'"just a string"\n42\nnull\n',
        "quarantined", "not_a_json_object", 3, "scalars instead of objects (.json is JSON lines)")
    add("latin1", "latin1.jsonl",
        ('{"id": "l1-1", "logged_at": "%s", "input": "caf\u00e9 was awful", "correction": "negative"}\n'
         % TS).encode("latin-1"),
        "quarantined", "not_utf8", 1, "a line encoded in latin-1")
    add("half_line", "half_line.jsonl",
        jsonl(row("half", 1)) + jsonl(row("half", 2))[:30],
        "accepted", None, 1, "the last line is still being written: it waits, unread, for the next night")
    add("nul_byte", "nul_byte.jsonl",
        b'{"id": "nul-1", "logged_at": "2025-01-01T10:00:00Z", "input": "nul\x00byte", "correction": "positive"}\n',
        "quarantined", "invalid_json", 1, "a raw NUL byte inside a JSON string")
    add("ragged_csv", "ragged.csv",
        b"id,logged_at,input,correction\nrag-1,2025-01-01T10:00:00Z,too,many,fields,here\n",
        "quarantined", "csv_wrong_field_count", 1, "a CSV record with more fields than the header")
    add("unclosed_quote_csv", "unclosed_quote.csv",
        b'id,logged_at,input,correction\nuq-1,2025-01-01T10:00:00Z,"never closed,positive\n',
        "quarantined", "csv_wrong_field_count", 1, "an unclosed quote swallows the rest of the file")
    add("latin1_csv", "latin1.csv",
        "id,logged_at,input,correction\nlc-1,%s,cr\u00e8me br\u00fbl\u00e9e,positive\n".replace("%s", TS).encode("latin-1"),
        "quarantined", "not_utf8", 1, "a CSV record in latin-1")

    # --- whole-file problems ---------------------------------------------------------------------
    add("utf16", "utf16.jsonl", jsonl(row("utf16")).decode().encode("utf-16"),
        "file_problem", "file_binary", 0, "UTF-16 with BOM: the log must be UTF-8")
    add("binary_jsonl", "binary.jsonl", bytes(range(256)) * 4,
        "file_problem", "file_binary", 0, "binary bytes")
    add("binary_csv", "binary.csv", b"\x00\x01\x02\x03garbage\x00\x00\x00\xff\xfe" * 50,
        "file_problem", "file_binary", 0, "binary content in a .csv")
    add("corrupt_parquet", "corrupt.parquet", b"PAR1" + b"\x15\x04not really parquet" * 20 + b"PAR1",
        "file_problem", "file_unreadable", 0, "corrupt parquet")
    add("truncated_parquet", "truncated.parquet",
        parquet_bytes(pa.table({"id": ["tp-1"], "input": ["x"]}))[:-20],
        "file_problem", "file_unreadable", 0, "a parquet file cut short (no footer)")

    # --- empty files -------------------------------------------------------------------------------
    add("empty_jsonl", "empty.jsonl", b"", "no_rows", None, 0, "an empty file")
    add("whitespace_file", "whitespace.jsonl", b"  \n\n\t\n", "no_rows", None, 0, "only blank lines")
    add("header_only_csv", "header_only.csv", b"id,logged_at,input,correction\n",
        "no_rows", None, 0, "a CSV with a header and no rows")
    add("empty_parquet_file", "empty.parquet", b"", "no_rows", None, 0, "a 0-byte parquet file")

    # --- required fields, types ----------------------------------------------------------------------
    for field in ("id", "logged_at", "input", "correction"):
        add(f"missing_{field}", f"missing_{field}.jsonl", jsonl(row(f"missing-{field}", **{field: None})),
            "quarantined", NOT_NULL.format(field), 1, f"required field {field} absent")
    add("null_input", "null_input.jsonl", b'{"id": "ni-1", "logged_at": "2025-01-01T10:00:00Z", "input": null, "correction": "positive"}\n',
        "quarantined", NOT_NULL.format("input"), 1, "input is JSON null")
    add("empty_object", "empty_object.jsonl", b"{}\n",
        "quarantined", NOT_NULL.format("id"), 1, "an empty object (fails all four not-null checks)")
    add("missing_columns_csv", "missing_columns.csv",
        csv_bytes(["id", "input"], [["mc-1", "a csv without correction or time"]]),
        "quarantined", NOT_NULL.format("correction"), 1, "CSV lacks the logged_at and correction columns")
    add("empty_input", "empty_input.jsonl", jsonl(row("empty-input", input="")),
        "quarantined", EMPTY.format("input"), 1, "input is the empty string")
    add("whitespace_input", "whitespace_input.jsonl", jsonl(row("ws-input", input="  \t \n ")),
        "quarantined", EMPTY.format("input"), 1, "input is whitespace only")
    add("empty_correction", "empty_correction.jsonl", jsonl(row("empty-corr", correction="")),
        "quarantined", EMPTY.format("correction"), 1, "correction is the empty string")
    add("blank_id", "blank_id.jsonl", jsonl(row("blank-id", id="   ")),
        "quarantined", EMPTY.format("id"), 1, "id is whitespace only")
    add("number_input", "number_input.jsonl", jsonl(row("num-input", input=42)),
        "quarantined", OF_TYPE.format("input"), 1, "input is a number")
    add("bool_input", "bool_input.jsonl", jsonl(row("bool-input", input=True)),
        "quarantined", OF_TYPE.format("input"), 1, "input is a boolean")
    add("nan_input", "nan_input.jsonl", b'{"id": "nan-1", "logged_at": "2025-01-01T10:00:00Z", "input": NaN, "correction": "positive"}\n',
        "quarantined", NOT_NULL.format("input"), 1, "input is NaN (Python's JSON reader accepts it): counts as missing")
    add("list_correction", "list_correction.jsonl", jsonl(row("list-corr", correction=["positive"])),
        "quarantined", OF_TYPE.format("correction"), 1, "correction is a list")
    add("object_id", "object_id.jsonl", jsonl(row("obj-id", id={"value": 7})),
        "quarantined", OF_TYPE.format("id"), 1, "id is an object")
    add("number_prediction", "number_prediction.jsonl", jsonl(row("num-pred", prediction=3)),
        "quarantined", OF_TYPE.format("prediction"), 1, "optional prediction with a wrong type")
    add("parquet_wrong_types", "wrong_types.parquet",
        parquet_bytes(pa.table({"id": ["pw-1"], "logged_at": [TS], "input": [12345], "correction": ["positive"]})),
        "quarantined", OF_TYPE.format("input"), 1, "parquet int64 input column")

    # --- content checks ------------------------------------------------------------------------------
    add("too_long_input", "too_long_input.jsonl", jsonl(row("too-long", input=" ".join(["word"] * 500))),
        "quarantined", "expect_column_values_to_be_between(input_tokens)", 1, "500 tokens > 32")
    add("too_long_equivalent", "too_long_equivalent.jsonl",
        jsonl(row("too-long-eq", equivalents=[" ".join(["word"] * 100)])),
        "quarantined", "expect_column_values_to_be_between(equivalents_max_tokens)", 1, "a paraphrase longer than the model takes")
    add("unknown_label", "unknown_label.jsonl", jsonl(row("unknown-label", correction="neutral")),
        "quarantined", "expect_column_values_to_be_in_set(correction_text)", 1, "label not among the model's labels")
    add("duplicate_ids", "duplicate_ids.jsonl",
        jsonl(row("dup", 1, id="dup-1"), row("dup", 2, id="dup-1")),
        "quarantined", "expect_column_values_to_be_unique(id_text)", 2, "the same id twice: both copies quarantined")
    add("conflicting_corrections", "conflicting_corrections.jsonl",
        jsonl(row("conflict", 1, input="The plot was  THIN", correction="negative"),
              row("conflict", 2, input=" the plot was thin ", correction="positive")),
        "quarantined", "conflicting_corrections", 2, "same normalised input, different corrections")
    add("future_timestamp", "future_timestamp.jsonl", jsonl(row("future", logged_at="2099-01-01T00:00:00Z")),
        "quarantined", "expect_column_values_to_be_between(logged_at_utc)", 1, "logged in the future")
    add("unparseable_timestamp", "unparseable_timestamp.jsonl", jsonl(row("bad-ts", logged_at="yesterday")),
        "quarantined", TIMESTAMP, 1, "not ISO-8601")
    add("naive_timestamp", "naive_timestamp.jsonl", jsonl(row("naive-ts", logged_at="2025-01-01T10:00:00")),
        "quarantined", TIMESTAMP, 1, "no time zone: rejected (policy; naive_timestamps='utc' accepts as UTC)")
    add("number_timestamp", "number_timestamp.jsonl", jsonl(row("num-ts", logged_at=1735725600)),
        "quarantined", TIMESTAMP, 1, "epoch number instead of a timestamp")
    add("equivalents_not_list", "equivalents_not_list.jsonl", jsonl(row("eq-str", equivalents="a paraphrase")),
        "quarantined", EQUIVALENTS, 1, "equivalents is a plain string")
    add("equivalents_empty_string", "equivalents_empty_string.jsonl", jsonl(row("eq-empty", equivalents=["fine", ""])),
        "quarantined", EQUIVALENTS, 1, "equivalents contains an empty string")
    add("equivalents_non_string", "equivalents_non_string.jsonl", jsonl(row("eq-num", equivalents=["fine", 3])),
        "quarantined", EQUIVALENTS, 1, "equivalents contains a number")
    add("metadata_not_object", "metadata_not_object.jsonl", jsonl(row("meta-list", metadata=[1, 2])),
        "quarantined", "expect_column_values_to_be_null(metadata_error)", 1, "metadata is a list")
    add("known_id", "known_id.jsonl", jsonl(row("known", id="applied-001")),
        "quarantined", "already_applied", 1, "id applied in an earlier night")
    add("wrong_model", "wrong_model.jsonl", jsonl(row("wrong-model", model="other-model")),
        "quarantined", "wrong_model", 1, "row is for another model")
    add("control_chars", "control_chars.jsonl", jsonl(row("ctrl", input="bell\u0007 and escape\u001b here")),
        "quarantined", CONTROL.format("input"), 1, "C0 control characters in the input")
    add("c1_control_correction", "c1_control.jsonl", jsonl(row("c1", prediction="neg\u0085ative")),
        "quarantined", CONTROL.format("prediction"), 1, "a C1 control character in the prediction")
    add("lone_surrogate", "lone_surrogate.jsonl",
        b'{"id": "sur-1", "logged_at": "2025-01-01T10:00:00Z", "input": "broken \\ud800 text", "correction": "positive"}\n',
        "quarantined", CONTROL.format("input"), 1, "a lone surrogate escape (not text)")
    add("nul_escape", "nul_escape.jsonl", jsonl(row("nul-esc", input="nul \u0000 escaped")),
        "quarantined", CONTROL.format("input"), 1, "a NUL written as the JSON escape \\u0000")
    add("nul_csv", "nul_csv.csv",
        b"id,logged_at,input,correction\nnulcsv-1,2025-01-01T10:00:00Z,nul\x00in csv,positive\n",
        "quarantined", CONTROL.format("input"), 1, "a raw NUL byte in a CSV cell (read the same on every Python)")
    add("huge_single_token", "huge_single_token.jsonl", jsonl(row("huge", input="x" * 50_000)),
        "quarantined", "expect_column_values_to_be_between(input_chars)", 1,
        "50,000 characters without a space: one token, over the 4,000-character limit")
    add("id_number", "id_number.jsonl", jsonl(row("id-num", id=31337)),
        "quarantined", "expect_column_values_to_be_unique(id_text)", 1,
        "id 31337 as a number here and as a string in id_string.jsonl: the same id twice")
    add("id_string", "id_string.jsonl", jsonl(row("id-str", id="31337")),
        "quarantined", "expect_column_values_to_be_unique(id_text)", 1, "the other copy of id 31337")
    add("replacement_char", "replacement_char.jsonl", jsonl(row("fffd", input="mojibake \ufffd here")),
        "quarantined", CONTROL.format("input"), 1, "U+FFFD: the text was already damaged upstream")
    return c


def main() -> None:
    manifest = []
    for old in HERE.iterdir():
        if old.suffix in (".jsonl", ".json", ".csv", ".parquet") and old.name != "MANIFEST.json":
            old.unlink()
    for case, file, content, expect, reason, rows, note in cases():
        (HERE / file).write_bytes(content)
        manifest.append({"case": case, "file": file, "expect": expect, "reason": reason, "rows": rows, "note": note})
    (HERE / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    lines = [
        "# Bad-input corpus",
        "",
        "Generated by `generate.py` (run it to rebuild). Ingested and validated as one night by",
        "`tests/tasks/test_validate.py::test_bad_input_corpus` with model `sentiment`, labels",
        "`positive`/`negative`, 32 whitespace tokens max, 4,000 characters max, known id",
        "`applied-001`, now 2025-06-01Z. Cases that take several nights are in `scenarios.py`",
        "(half lines completed later, rotation by rename and by copy-truncate, truncation, late SQL",
        "rows), run by `test_bad_input_scenarios` and `tests/flows/test_bad_input_flow.py`.",
        "",
        "| case | file | expect | reason | rows | note |",
        "|---|---|---|---|---|---|",
    ]
    for m in manifest:
        lines.append(f"| {m['case']} | `{m['file']}` | {m['expect']} | `{m['reason'] or ''}` | {m['rows']} | {m['note']} |")
    (HERE / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
