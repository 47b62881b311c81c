"""Stores the tests start from, made once per test process.

Creating an MLflow SQLite store runs MLflow's schema migrations: about 2.5 s on a 2-core
machine, paid by every test that builds a world of its own. ``mlflow_sqlite`` copies one store
migrated at first use instead; MLflow then opens it as any store it made itself. The CLI tests
and the registry's own first-use path still create theirs from nothing.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def _migrated_mlflow_db() -> Path:
    from tasks.registry import Registry, default_tracking_uri

    folder = Path(tempfile.mkdtemp(prefix="patchflow-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    client = Registry(default_tracking_uri(folder)).client
    client.search_experiments()  # the tracking store: migrated
    client.search_registered_models()  # the model registry store (same file): migrated
    return folder / "mlflow.db"


def mlflow_sqlite(folder: Path) -> str:
    """A tracking URI for an empty, migrated MLflow SQLite store at ``folder / "mlflow.db"``."""
    from tasks.registry import default_tracking_uri

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(_migrated_mlflow_db(), folder / "mlflow.db")
    return default_tracking_uri(folder)
