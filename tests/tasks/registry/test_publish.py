"""Registering versions against a real MLflow (SQLite store in tmp_path); monkeypatch only injects faults."""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest
import yaml

import patcher
from tasks.records import read_ledger
from tasks.registry import CHALLENGER, CHAMPION, Registry, RegistryError, publish
from tasks.registry.pyfunc_model import local_path_of
from tests.tasks.registry.conftest import NAME, TEXTS, add_always_on_neuron, candidate, ledger_for, version_numbers


def _dir_size(uri: str) -> int:
    path = local_path_of(uri)
    assert path is not None, uri
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_base_registration_serves_and_is_idempotent(reg: Registry, assets):
    from mlflow.tracking._tracking_service import utils as tracking_utils

    ambient, fluent = os.environ["MLFLOW_TRACKING_URI"], tracking_utils._tracking_uri
    info = reg.register_base(NAME, assets["base"], "text-classification")
    # log_model's fluent tracking URI was set for the call only: the caller's settings are intact
    assert os.environ["MLFLOW_TRACKING_URI"] == ambient and tracking_utils._tracking_uri == fluent
    assert info.version == "1" and info.kind == "base" and info.aliases == (CHAMPION,)
    assert info.tags["patchflow.base_version"] == "1" and info.complete
    assert info.tags["patchflow.task"] == "text-classification"
    model, _ = patcher.load_model(assets["base"])
    assert info.tags["patchflow.base_fingerprint"] == patcher.fingerprint(model)

    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    preds = pm.predict(pd.DataFrame({"input": TEXTS}))
    assert list(preds) == assets["base_preds"] and set(preds) <= {"neg", "pos"}
    assert list(pm.predict(TEXTS[:2])) == assets["base_preds"][:2]  # a plain list works too

    again = reg.register_base(NAME, assets["base"], "text-classification")
    assert again.version == "1" and version_numbers(reg) == ["1"]
    with pytest.raises(RegistryError, match="fingerprint"):
        reg.register_base(NAME, assets["other"], "text-classification")


def test_versions_are_logged_by_log_model_as_code_with_the_patcher_package(reg: Registry, assets):
    base = reg.register_base(NAME, assets["base"], "text-classification")
    info = candidate(reg, assets)
    for version in (base, info):
        stored = local_path_of(version.source)
        flavor = yaml.safe_load((stored / "MLmodel").read_text())["flavors"]["python_function"]
        assert flavor["model_code_path"].endswith("pyfunc_model.py")  # models from code
        assert flavor["code"] == "code" and (stored / "code" / "patcher" / "patchset.py").is_file()
        assert (stored / "pyfunc_model.py").is_file()
        assert not list(stored.rglob("*.pkl")) and not list(stored.rglob("python_model*"))
        assert not list(stored.rglob("__pycache__"))


def test_candidate_version_lineage_and_artifacts(reg: Registry, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    info = candidate(reg, assets)
    assert info.version == "2" and info.kind == "patch" and info.aliases == (CHALLENGER,)
    t = info.tags
    assert t["patchflow.base_version"] == "1" and t["patchflow.parent_version"] == "1"
    assert t["patchflow.patch_count"] == "1" and t["patchflow.flow_run_id"] == "flow-night-1"
    assert t["patchflow.night_key"] == "night-1" and info.complete
    assert reg.info(NAME, CHAMPION).version == "1"  # a challenger does not move the champion

    run = reg.client.get_run(info.run_id)  # metrics, per-edit series, plot, ledger, gate report
    assert run.data.metrics["SR"] == 1.0 and run.data.metrics["TestR"] == pytest.approx(0.98)
    assert run.data.params["patch.neurons"] == "1"
    assert len(reg.client.get_metric_history(info.run_id, "stream/SR")) == 1
    run_files = {f.path for f in reg.client.list_artifacts(info.run_id)}
    assert {"metrics.png", "ledger.json", "gate_report.json", "metrics.json"} <= run_files

    stored = local_path_of(info.source)  # only the patch set + pointer + JSONs, well under 1 MB
    arts = stored / "artifacts"
    assert (arts / "patches" / "manifest.json").is_file() and (arts / "patches" / "patches.safetensors").is_file()
    assert not (arts / "hf_model").exists()
    assert (arts / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_ledger(arts / "ledger.json") == ledger_for(1)  # written by write_ledger, typed
    pointer = json.loads((arts / "patchflow.json").read_text())
    assert pointer["kind"] == "patch" and pointer["base_model_uri"] == f"models:/{NAME}/1"
    assert _dir_size(info.source) < 1_000_000
    assert _dir_size(reg.info(NAME, "1").source + "/artifacts") > 3 * _dir_size(info.source + "/artifacts")

    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    assert list(pm.predict(pd.DataFrame({"input": TEXTS}))) == assets["p1_preds"]


def test_same_night_key_registers_once(reg: Registry, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    first = candidate(reg, assets, night="2024-05-01")
    second = candidate(reg, assets, night="2024-05-01")
    assert first.version == second.version == "2"
    assert version_numbers(reg) == ["1", "2"]
    assert reg.find_night(NAME, "2024-05-01").version == "2"


def test_unknown_model_and_bad_inputs(reg: Registry, assets, tmp_path):
    with pytest.raises(RegistryError, match="nope"):
        reg.status("nope")
    with pytest.raises(RegistryError, match="nope"):
        reg.promote("nope", reason="x")
    with pytest.raises(RegistryError, match="nope"):
        reg.load_version("nope", CHAMPION)
    reg.register_base(NAME, assets["base"], "text-classification")
    with pytest.raises(RegistryError, match="alias 'challenger'"):
        reg.load_version(NAME, CHALLENGER)
    # a patch set made for another base is refused before anything is registered
    m, _ = patcher.load_model(assets["other"])
    add_always_on_neuron(m, "e0", 1.0)
    foreign = patcher.PatchSet.from_model(m).save(tmp_path / "foreign")
    with pytest.raises(RegistryError, match="fingerprint"):
        reg.register_candidate(NAME, foreign, {}, [], ledger_for(1), "1", "f", CHALLENGER, {}, night_key="foreign")
    # a ledger that does not list exactly the patch set's edits is refused (issue 10 #6)
    with pytest.raises(RegistryError, match=r"ledger does not match.*\['e1'\]"):
        reg.register_candidate(NAME, assets["p2"], {}, [], ledger_for(1), "1", "f", CHALLENGER, {}, night_key="short")
    with pytest.raises(RegistryError, match="not a patch set"):
        reg.register_candidate(NAME, tmp_path, {}, [], [], "1", "f", CHALLENGER, {}, night_key="empty")
    assert version_numbers(reg) == ["1"]


def test_incomplete_artifacts_never_get_an_alias(reg: Registry, assets, monkeypatch):
    reg.register_base(NAME, assets["base"], "text-classification")
    real_copy = publish.copy_patch_dir

    def lossy_copy(src, dst):  # fault: the patches file does not reach the store
        real_copy(src, dst)
        (dst / "patches.safetensors").unlink()

    monkeypatch.setattr(publish, "copy_patch_dir", lossy_copy)
    with pytest.raises(RegistryError, match="patches.safetensors"):
        candidate(reg, assets, alias=CHAMPION)
    assert version_numbers(reg) == ["1"]
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}

    monkeypatch.setattr(publish, "copy_patch_dir", real_copy)
    info = candidate(reg, assets, alias=CHAMPION)  # the same night, retried, goes through
    assert CHAMPION in info.aliases and info.complete


def test_failure_between_version_and_alias_leaves_no_alias(reg: Registry, assets, monkeypatch):
    reg.register_base(NAME, assets["base"], "text-classification")

    def broken_alias(*args, **kwargs):
        raise RuntimeError("injected: registry went away")

    monkeypatch.setattr(reg.client, "set_registered_model_alias", broken_alias)
    with pytest.raises(RegistryError, match="injected") as err:
        candidate(reg, assets)
    assert "removed" in str(err.value)
    monkeypatch.undo()
    assert version_numbers(reg) == ["1"]
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}

    def failing_verify(name, version):  # verification failing after the version exists: same outcome
        raise RegistryError(f"injected: version {version} unreadable")

    monkeypatch.setattr(reg, "verify_version", failing_verify)
    with pytest.raises(RegistryError, match="unreadable"):
        candidate(reg, assets)
    monkeypatch.undo()
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}
    assert all(v["complete"] for v in reg.status(NAME)["versions"])

    from tasks.registry import lifecycle

    def failing_history(reg_, name, entry):  # auto-promotion failing after the alias moved
        raise RuntimeError("injected: history write failed")

    monkeypatch.setattr(lifecycle, "append_history", failing_history)
    with pytest.raises(RegistryError, match="history write failed"):
        candidate(reg, assets, alias=CHAMPION)
    monkeypatch.undo()
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}  # the champion was put back
    assert version_numbers(reg) == ["1"]
    assert candidate(reg, assets).aliases == (CHALLENGER,)
