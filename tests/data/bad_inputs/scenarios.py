"""Bad input that takes several nights: a log written while the night runs, rotated or truncated
logs, rows committed late to a SQL table. Each scenario is a list of nights; a night changes the
log, then is ingested and validated, and says how many rows it must read, accept and quarantine.
After the last night a further run must read nothing (nothing read twice).

Rows come from a factory, ``make(key) -> dict`` (a valid row; the task tests use the corpus rows,
the flow tests rows their tiny model can take), so the same scenarios run at both levels. File
scenarios touch only files named after themselves, so they can share one log directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

Make = Callable[[str], dict]


@dataclass
class Night:
    act: Callable[[Path, Make], None]  # changes the log: a directory, or a SQLite database file
    read: int
    accepted: int
    quarantined: int = 0


@dataclass
class Scenario:
    name: str
    note: str
    nights: list[Night]
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "files"})


def _line(row: dict) -> bytes:
    return (json.dumps(row) + "\n").encode("utf-8")


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as out:
        out.write(data)


# --- a line half written when the night runs -------------------------------------------------


def _half_line_1(log: Path, make: Make) -> None:
    half = _line(make("half-2"))
    _append(log / "half.jsonl", _line(make("half-1")) + half[: len(half) // 2])


def _half_line_2(log: Path, make: Make) -> None:
    half = _line(make("half-2"))
    _append(log / "half.jsonl", half[len(half) // 2 :] + _line(make("half-3")))


# --- rotation: renamed to *.1, or copied and truncated; then the next generation ---------------


def _rotation(how: str) -> list[Night]:
    name = f"rot-{how}"

    def night1(log: Path, make: Make) -> None:
        _append(log / f"{name}.jsonl", _line(make(f"{name}-1")) + _line(make(f"{name}-2")))

    def night2(log: Path, make: Make) -> None:
        path, rotated = log / f"{name}.jsonl", log / f"{name}.jsonl.1"
        half = _line(make(f"{name}-4"))
        _append(path, _line(make(f"{name}-3")) + half[:10])  # unread rows, one half written
        if how == "rename":
            path.rename(rotated)
        else:
            rotated.write_bytes(path.read_bytes())
            path.write_bytes(b"")
        _append(rotated, half[10:])  # the writer finishes its line in the rotated file
        _append(path, _line(make(f"{name}-5")))

    def night3(log: Path, make: Make) -> None:
        path = log / f"{name}.jsonl"
        _append(path, _line(make(f"{name}-6")))
        (log / f"{name}.jsonl.1").rename(log / f"{name}.jsonl.2")
        path.rename(log / f"{name}.jsonl.1")
        _append(path, _line(make(f"{name}-7")))

    return [Night(night1, 2, 2), Night(night2, 3, 3), Night(night3, 2, 2)]


# --- truncated and restarted in place -----------------------------------------------------------


def _truncate_1(log: Path, make: Make) -> None:
    _append(log / "trunc.jsonl", _line(make("trunc-1")) + _line(make("trunc-2")))


def _truncate_2(log: Path, make: Make) -> None:
    (log / "trunc.jsonl").write_bytes(_line(make("trunc-3")))


# --- a SQL row committed after the night read, logged before the last row it read -------------

_TABLE = sa.Table(
    "errors", sa.MetaData(),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    *(sa.Column(name, sa.Text) for name in ("id", "logged_at", "input", "correction", "prediction")),
)


def _insert(database: Path, rows: list[dict]) -> None:
    engine = sa.create_engine(f"sqlite:///{database}")
    _TABLE.metadata.create_all(engine)
    columns = {c.name for c in _TABLE.columns}
    with engine.begin() as conn:
        conn.execute(sa.insert(_TABLE), [{k: v for k, v in r.items() if k in columns} for r in rows])
    engine.dispose()


def _late_sql_1(database: Path, make: Make) -> None:
    _insert(database, [make("sql-a"), make("sql-b")])


def _late_sql_2(database: Path, make: Make) -> None:
    early = make("sql-a")["logged_at"]  # logged with the first row, committed a night later
    _insert(database, [{**make("sql-a2"), "logged_at": early}])


def scenarios() -> list[Scenario]:
    return [
        Scenario("half_line", "the writer is mid-line when the night runs; the line waits a night",
                 [Night(_half_line_1, 1, 1), Night(_half_line_2, 2, 2)]),
        Scenario("rotation_rename", "rotated by rename to *.1 with unread rows; then .1 -> .2",
                 _rotation("rename")),
        Scenario("rotation_copytruncate", "rotated by copy to *.1 and truncation", _rotation("copytruncate")),
        Scenario("truncation", "truncated and restarted in place: a new file, not a problem",
                 [Night(_truncate_1, 2, 2), Night(_truncate_2, 1, 1)]),
        Scenario("late_sql_rows", "a row committed after the night read, logged before its last row",
                 [Night(_late_sql_1, 2, 2), Night(_late_sql_2, 1, 1)],
                 source={"kind": "sql", "table": "errors", "cursor_column": "seq"}),
    ]
