"""The file source: new rows of a directory of log files, with nothing lost and nothing read twice.

Watermark: ``{"kind": "files", "version": 2, "files": {name: entry}}``. For a text log (JSON lines,
CSV) an entry is the file's inode, the offset just after its last complete line (``size``), a
hash of the bytes before it (``sha256``) and the CSV records before it (``rows``). A night reads on
from the entry whose consumed bytes the file still starts with, whatever its name now:

- appended: same file, read from the offset; a last line still being written waits;
- rotated (renamed to ``errors.jsonl.1``, or copied there and truncated): the rotated file
  continues the old entry, the new file starts from 0;
- truncated or rewritten: no entry matches, so it is a new file read from the start.

Parquet files (and files reported as unreadable) are whole: an entry is the hash of all their
bytes, unchanged means nothing new. Every row also has a content digest; rows an earlier night
ingested (kept by `tasks.state.StateStore`) or read twice tonight are skipped and counted, which
covers rewritten files and rows copied between files.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import BaseModel, Field

from tasks.file_formats import (
    FILE_SUFFIXES,
    FileRead,
    complete_end,
    decode_lossless,
    parse_csv,
    parse_json_lines,
    parse_parquet,
    sniff_binary,
)
from tasks.records import FileProblem, RawRow
from tasks.sources import IngestBatch, SourceError, keep_unseen, row_digest
from tasks.state import NEW_ROWS

Known = Callable[[Iterable[str]], set[str]]
_ROTATED = re.compile(r"\.\d+$")  # errors.jsonl.1, errors.csv.12


class _FileResult(BaseModel):
    rows: list[RawRow] = Field(default_factory=list)
    digests: list[str] = Field(default_factory=list)
    problem: FileProblem | None = None
    entry: dict[str, Any]
    waiting: str | None = None


def log_format(path: Path) -> str | None:
    """The format suffix of a log file (``.jsonl`` for ``errors.jsonl.1``), or None if not a log."""
    suffix = Path(_ROTATED.sub("", path.name)).suffix.lower()
    return suffix if suffix in FILE_SUFFIXES else None


def list_source_files(directory: Path) -> list[Path]:
    """The log files of a directory, sorted by name (the order rows are read)."""
    if not directory.exists():
        raise SourceError(f"source directory does not exist: {directory}")
    if not directory.is_dir():
        raise SourceError(f"source path is not a directory: {directory}")
    return sorted(p for p in directory.iterdir() if p.is_file() and log_format(p) is not None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ingest_files(directory: Path, previous: dict[str, Any] | None, known: Known | None = None) -> IngestBatch:
    """Read the rows of `directory` that the watermark `previous` has not consumed (see module
    docstring). `known` says which row digests an earlier night already ingested."""
    directory = Path(directory)
    entries = {name: _upgrade(e) for name, e in ((previous or {}).get("files") or {}).items()}
    batch = IngestBatch(pending_watermark={})
    files: dict[str, Any] = {}
    digests: list[str] = []
    for path in list_source_files(directory):
        name = path.relative_to(directory).as_posix()
        result = _read_file(path, name, entries)
        files[name] = result.entry
        batch.rows.extend(result.rows)
        digests.extend(result.digests)
        if result.problem is not None:
            batch.file_problems.append(result.problem)
        if result.waiting is not None:
            batch.waiting.append(result.waiting)
    kept_rows, kept_digests, batch.skipped_known = keep_unseen(batch.rows, digests, known)
    batch.rows = kept_rows
    batch.rows_read = len(kept_rows)
    batch.pending_watermark = {"kind": "files", "version": 2, "files": files, NEW_ROWS: kept_digests}
    return batch


def _upgrade(entry: dict[str, Any]) -> dict[str, Any]:
    """A watermark entry in the current form (version 1 entries hashed the whole file they read)."""
    if "whole" in entry:
        return entry
    return {"inode": None, "size": entry.get("size", 0), "sha256": entry.get("sha256", ""),
            "rows": entry.get("rows", 0), "whole": False, "v1_rows_sha256": entry.get("rows_sha256")}


def _read_file(path: Path, name: str, entries: dict[str, dict[str, Any]]) -> _FileResult:
    data = path.read_bytes()
    inode = path.stat().st_ino
    whole = {"inode": inode, "size": len(data), "sha256": _sha(data), "rows": 0, "whole": True}
    if any(e["whole"] and e["sha256"] == whole["sha256"] and e["size"] == len(data) for e in entries.values()):
        return _FileResult(entry=whole)  # an unchanged whole file (perhaps renamed): nothing new
    fmt = log_format(path)
    if fmt == ".parquet":
        return _read_parquet(path, data, whole, entries.get(name))
    resume = _resume_point(data, inode, name, entries)
    start = resume["size"] if resume else 0
    binary = sniff_binary(data if start == 0 else data[start:])
    if binary is not None:
        problem = FileProblem(origin=str(path), reason=binary, raw=decode_lossless(data[start:]))
        return _FileResult(problem=problem, entry=whole)
    end = max(complete_end(data, fmt or ""), start)  # a version 1 entry may end mid-line
    entry = {"inode": inode, "size": end, "sha256": _sha(data[:end]), "rows": 0, "whole": False}
    waiting = f"{path}: {len(data) - end} bytes of an unfinished last line" if end < len(data) else None
    if fmt == ".csv":
        parsed = parse_csv(path, data[:end])
        if parsed.problem is not None:
            problem = FileProblem(origin=str(path), reason=parsed.problem, raw=decode_lossless(data))
            return _FileResult(problem=problem, entry=whole)
        entry["rows"] = len(parsed.rows)
        parsed.rows = parsed.rows[resume["rows"] if resume else 0 :]
    else:
        parsed = parse_json_lines(path, data[:end], start, data[:start].count(b"\n") + 1)
    return _FileResult(**_with_digests(parsed), entry=entry, waiting=waiting)


def _with_digests(parsed: FileRead) -> dict[str, Any]:
    return {"rows": parsed.rows, "digests": [row_digest(r.raw, parsed.context) for r in parsed.rows]}


def _resume_point(data: bytes, inode: int, name: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The entry this file continues: one whose consumed bytes it still starts with. The same
    inode (appended, or renamed by rotation) wins over the same name, then the most consumed."""
    best, best_rank = None, None
    hashes: dict[int, str] = {}
    for prev_name, entry in entries.items():
        size = entry["size"]
        if entry["whole"] or size <= 0 or size > len(data):
            continue
        if size not in hashes:
            hashes[size] = _sha(data[:size])
        if hashes[size] != entry["sha256"]:
            continue
        rank = (entry.get("inode") == inode, prev_name == name, size)
        if best_rank is None or rank > best_rank:
            best, best_rank = entry, rank
    return best


def _read_parquet(path: Path, data: bytes, whole: dict[str, Any], before: dict[str, Any] | None) -> _FileResult:
    parsed = parse_parquet(path, data) if data.strip() else FileRead()
    if parsed.problem is not None:
        problem = FileProblem(origin=str(path), reason=parsed.problem, raw=decode_lossless(data))
        return _FileResult(problem=problem, entry=whole)
    consumed = int(before.get("rows") or 0) if before else 0
    if before and before.get("v1_rows_sha256") and _v1_rows_sha(parsed.rows[:consumed]) == before["v1_rows_sha256"]:
        parsed.rows = parsed.rows[consumed:]  # read by a version 1 night: no digests were kept
    return _FileResult(**_with_digests(parsed), entry=whole)


def _v1_rows_sha(rows: list[RawRow]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.raw.encode("utf-8", "backslashreplace") + b"\n")
    return digest.hexdigest()
