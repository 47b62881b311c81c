"""Parse log files into rows: JSON lines (``.jsonl``/``.json``), CSV with a header, parquet.

Nothing here judges a row's content (that is `tasks.validate`): a row that cannot be parsed comes
back with `RawRow.problem`, a file that cannot be read at all with `FileRead.problem`.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.records import RawRow, safe_text

TEXT_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv")
FILE_SUFFIXES: tuple[str, ...] = (*TEXT_SUFFIXES, ".parquet")
_BINARY_SNIFF_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
# NUL stands in as a lone surrogate while the csv module reads (before 3.11 it rejects NUL).
_NUL_STAND_IN = "\udc00"


class FileRead(BaseModel):
    """Rows of one file as parsed now, or the reason it could not be parsed. `context` is what a
    row's identity depends on besides its own text (a CSV file's header)."""

    rows: list[RawRow] = Field(default_factory=list)
    problem: str | None = None
    context: str = ""


def decode_lossless(data: bytes) -> str:
    """Bytes as text without losing anything: invalid UTF-8 becomes backslash escapes."""
    return data.decode("utf-8", "backslashreplace")


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_lossless(bytes(value))
    if hasattr(value, "tolist"):
        return value.tolist()
    return repr(value)


def to_json(value: Any) -> str:
    """A row as JSON text (for `raw`), keeping non-ASCII text readable."""
    return safe_text(json.dumps(value, default=_json_default, ensure_ascii=False))


def sniff_binary(data: bytes) -> str | None:
    """Why `data` is not a UTF-8 text file, or None when it looks like text."""
    boms = {
        b"\xff\xfe\x00\x00": "UTF-32",
        b"\x00\x00\xfe\xff": "UTF-32",
        b"\xff\xfe": "UTF-16",
        b"\xfe\xff": "UTF-16",
    }
    for bom, name in boms.items():
        if data.startswith(bom):
            return f"file_binary: {name} byte-order mark; log files must be UTF-8"
    magics = {b"PAR1": "a parquet file", b"\x1f\x8b": "gzip data", b"PK\x03\x04": "a zip archive"}
    for magic, name in magics.items():
        if data.startswith(magic):
            return f"file_binary: content is {name}, not text"
    head = data[:_BINARY_SNIFF_BYTES]
    if not head:
        return None
    control = sum(1 for b in head if b < 9 or 13 < b < 32 and b != 27)
    if b"\x00" in head and control / len(head) > 0.1:
        return f"file_binary: {control} of the first {len(head)} bytes are control bytes"
    return None


def complete_end(data: bytes, suffix: str) -> int:
    """Where the complete lines of a text log end. A last line without its newline is still
    being written and waits for the next night, unless it is already one whole JSON object."""
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if not tail.strip():
        return len(data)
    if suffix == ".csv":  # a cut CSV record can look whole ("nega" for "negative"): always wait
        return end
    try:
        whole = isinstance(json.loads(tail.removeprefix(_BOM)), dict)
    except (ValueError, RecursionError):
        whole = False
    return len(data) if whole else end


def parse_json_lines(path: Path, data: bytes, start: int = 0, first_line: int = 1) -> FileRead:
    """One JSON object per line of ``data[start:]`` (line numbers from `first_line`); a line that
    is not one comes back with a problem. Blank lines carry nothing and are skipped."""
    chunk = data[start:]
    if start == 0:
        chunk = chunk.removeprefix(_BOM)
    rows: list[RawRow] = []
    for number, line in enumerate(chunk.split(b"\n"), start=first_line):
        line = line.removesuffix(b"\r")
        if line.strip():
            rows.append(parse_json_line(f"{path}:{number}", line))
    return FileRead(rows=rows)


def parse_json_line(origin: str, line: bytes) -> RawRow:
    """Parse one JSON-lines line into a RawRow (data None + problem when it is not an object)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRow(
            origin=origin,
            data=None,
            raw=decode_lossless(line),
            problem=f"not_utf8: byte {exc.start} ({line[exc.start:exc.start + 1]!r}) is not UTF-8",
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRow(origin=origin, data=None, raw=text, problem=f"invalid_json: {exc}")
    except RecursionError:
        return RawRow(origin=origin, data=None, raw=text, problem="invalid_json: nested too deeply")
    if not isinstance(value, dict):
        return RawRow(
            origin=origin,
            data=None,
            raw=text,
            problem=f"not_a_json_object: a line must be one JSON object, got {type(value).__name__}",
        )
    return RawRow(origin=origin, data=value, raw=text)


def parse_csv(path: Path, data: bytes) -> FileRead:
    """CSV with a header row. Empty cells mean "absent"; ragged records come back as problems.

    Decoded with surrogateescape so one non-UTF-8 record does not spoil the whole file; a NUL
    is kept in its cell (validation rejects it), on every Python version.
    """
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff").replace("\x00", _NUL_STAND_IN)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[RawRow] = []
    try:
        header = next(reader, None)
        if header is None:
            return FileRead()
        header = [h.strip().replace(_NUL_STAND_IN, "\x00") for h in header]
        if _has_surrogates("".join(header)):
            return FileRead(problem="file_not_utf8: the CSV header is not UTF-8")
        start = reader.line_num + 1
        for record in reader:
            origin = f"{path}:{start}"
            start = reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            rows.append(_csv_row(origin, header, record))
    except csv.Error as exc:
        return FileRead(problem=f"file_unreadable: CSV error near line {reader.line_num}: {exc}")
    return FileRead(rows=rows, context=",".join(header))


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _csv_row(origin: str, header: list[str], record: list[str]) -> RawRow:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(record)
    raw_text = out.getvalue().replace(_NUL_STAND_IN, "\x00")
    record = [cell.replace(_NUL_STAND_IN, "\x00") for cell in record]
    raw = raw_text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if _has_surrogates(raw_text):
        return RawRow(origin=origin, data=None, raw=raw, problem="not_utf8: the record is not UTF-8")
    if len(record) != len(header):
        return RawRow(
            origin=origin,
            data=None,
            raw=raw,
            problem=f"csv_wrong_field_count: expected {len(header)} fields, got {len(record)}",
        )
    values = {key: (cell if cell != "" else None) for key, cell in zip(header, record)}
    return RawRow(origin=origin, data=values, raw=raw)


def parse_parquet(path: Path, data: bytes) -> FileRead:
    """Parquet: one row per table row (lists stay lists, timestamps become datetimes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as exc:  # pyarrow raises several types for corrupt files
        return FileRead(problem=f"file_unreadable: not a readable parquet file: {exc}")
    rows = [
        RawRow(origin=f"{path}:{index + 1}", data=record, raw=to_json(record))
        for index, record in enumerate(records)
    ]
    return FileRead(rows=rows)
