"""Loading versions back: base + patch set + typed ledger, one download cache, device and dtype."""

from __future__ import annotations

import mlflow
import pytest
import torch

import patcher
from patcher.storage import DONE_MARKER
from tasks.registry import CHALLENGER, Registry, RegistryError
from tasks.registry.pyfunc_model import local_path_of
from tests.tasks.registry.conftest import NAME, TEXTS, candidate, ledger_for


def test_load_version_gives_model_patch_set_and_typed_ledger(reg: Registry, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    candidate(reg, assets)
    lv = reg.load_version(NAME, CHALLENGER)
    assert lv.version == "2" and lv.kind == "patch" and lv.base_version == "1"
    assert lv.ledger == ledger_for(1) and lv.edit_ids == ["e0"]  # LedgerEntry objects, not dicts
    assert len(lv.patch_set) == 1 and lv.patch_dir.is_relative_to(reg.cache_dir)
    assert lv.base_fingerprint == reg.info(NAME, "1").tags["patchflow.base_fingerprint"]
    assert patcher.predict(lv.model, lv.tokenizer, TEXTS) == assets["p1_preds"]

    base_lv = reg.load_version(NAME, "1")
    assert base_lv.patch_set is None and base_lv.ledger == [] and base_lv.patch_dir is None
    assert patcher.predict(base_lv.model, base_lv.tokenizer, TEXTS) == assets["base_preds"]


def test_every_download_goes_through_one_cache_built_once(reg: Registry, assets, monkeypatch):
    reg.register_base(NAME, assets["base"], "text-classification")
    candidate(reg, assets)
    first = reg.load_version(NAME, "2")
    assert first.base_folder.is_relative_to(reg.cache_dir) and (first.base_folder / "config.json").is_file()
    for folder in (first.base_folder, first.patch_dir):  # build_once's layout: <key>/DONE + <key>/<download>
        assert (folder.parent / DONE_MARKER).is_file()
    downloads = []
    real = reg.download
    monkeypatch.setattr(reg, "download", lambda uri, dst: downloads.append(uri) or real(uri, dst))
    again = reg.load_version(NAME, "2")
    assert again.base_folder == first.base_folder and again.patch_dir == first.patch_dir
    assert [u.rsplit("/", 1)[-1] for u in downloads] == ["ledger.json"]  # only the ledger is read again


def test_a_missing_ledger_is_fatal(reg: Registry, assets):
    """Issue 10 #6: a patch version whose ledger cannot be read is not loaded with an empty ledger."""
    reg.register_base(NAME, assets["base"], "text-classification")
    info = candidate(reg, assets)
    ledger = local_path_of(info.source) / "artifacts" / "ledger.json"
    ledger.write_text('[{"id": "e0"')  # corrupt
    with pytest.raises(RegistryError, match=r"version 2: its ledger .*ledger.json.* cannot be read"):
        reg.load_version(NAME, "2")
    ledger.unlink()  # missing
    with pytest.raises(RegistryError, match=r"version 2: its ledger .*ledger.json.* cannot be read"):
        reg.load_version(NAME, CHALLENGER)
    assert reg.load_version(NAME, "1").ledger == []  # the base has none, and needs none


def test_device_and_dtype_on_load(reg: Registry, assets):
    reg.register_base(NAME, assets["base"], "text-classification")
    candidate(reg, assets)
    lv = reg.load_version(NAME, "2", device="cpu", dtype="bfloat16")
    assert next(lv.model.parameters()).dtype == torch.bfloat16
    assert lv.patch_set is not None and len(lv.patch_set) == 1
    default = reg.load_version(NAME, "2")
    assert next(default.model.parameters()).dtype == torch.float32  # the saved dtype

    pm = mlflow.pyfunc.load_model(f"models:/{NAME}/2", model_config={"device": "cpu", "dtype": "bfloat16"})
    model = pm.unwrap_python_model().model
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    assert len(pm.predict(TEXTS)) == len(TEXTS)
    auto = mlflow.pyfunc.load_model(f"models:/{NAME}/2").unwrap_python_model().model
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(auto.parameters()).device.type == expected and next(auto.parameters()).dtype == torch.float32
    with pytest.raises(Exception, match="unknown dtype"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/2", model_config={"dtype": "float8"})
