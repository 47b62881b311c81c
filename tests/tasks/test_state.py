"""Tests of tasks.state: watermarks, their history and ingested-row digests, on SQLite and on a
real PostgreSQL (the production state store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.state import StateStore


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'nested' / 'state.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    from tests.conftest import sqlalchemy_url

    postgres = request.getfixturevalue("postgres")
    name = "state_" + request.node.name.split("[")[0].removeprefix("test_")[:40]
    return sqlalchemy_url(postgres(name))


def test_watermark_roundtrip_history_and_durability(url: str) -> None:
    store = StateStore(url)
    assert store.get_watermark("m") is None
    store.commit_watermark("m", {"kind": "files", "files": {"a": 1}, "new_rows": ["d1", "d2"]}, run_id="run-1")
    store.commit_watermark("m", {"kind": "files", "files": {"a": 2}, "new_rows": ["d2", "d3"]}, run_id="run-2")
    store.commit_watermark("other", {"kind": "sql"}, run_id="run-3")
    store.close()

    reopened = StateStore(url)  # a new process sees what was committed
    assert reopened.get_watermark("m") == {"kind": "files", "files": {"a": 2}}  # digests kept apart
    assert reopened.get_watermark("other") == {"kind": "sql"}
    assert [h["run_id"] for h in reopened.history("m")] == ["run-1", "run-2"]
    assert reopened.ingested("m", ["d1", "d3", "d9"]) == {"d1", "d3"}
    assert reopened.ingested("other", ["d1"]) == set()  # per model
    reopened.close()


def test_many_digests_in_chunks(url: str) -> None:
    store = StateStore(url)
    digests = [f"{i:064x}" for i in range(1234)]
    store.commit_watermark("m", {"kind": "sql", "new_rows": digests}, run_id="r")
    assert store.ingested("m", digests + ["f" * 64]) == set(digests)
    store.close()
