"""Shared setup for the registry tests: a tiny BERT base, cumulative patch sets built without
training, and a Registry over a real MLflow SQLite store in tmp_path (no mocks)."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from pathlib import Path

import pytest
import torch

import patcher
from tasks.records import LedgerEntry
from tasks.registry import CHALLENGER, Registry
from tests import tiny
from tests.stores import mlflow_sqlite

NAME = "tiny-sentiment"
TEXTS = ["the movie was great", "terrible film", "i loved it", "boring and long", "what a waste"]


def make_base(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny.MINILM).save_pretrained(folder)
    return folder


def add_always_on_neuron(model, edit_id: str, sign: float) -> None:
    """A patch neuron that fires on every input and pushes the FFN output along a fixed direction:
    deterministic, instant, and it changes predictions (no training needed)."""
    ffn = patcher.PatchedFFN.of(model, patcher.resolve_family(model))
    gen = torch.Generator().manual_seed(len(ffn.blocks) + 1)
    key = torch.zeros(1, ffn.d_model)
    value = sign * 50.0 * torch.randn(1, ffn.d_out, generator=gen)
    ffn.add(patcher.PatchBlock(edit_id, [key], [torch.full((1,), 10.0)], value, {}))


def ledger_for(n: int) -> list[LedgerEntry]:
    return [LedgerEntry(id=f"e{i}", input=TEXTS[i], correction="pos", equivalents=[f"para {i}"]) for i in range(n)]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny base model folder and cumulative patch sets: p1 = [e0], p2 = [e0, e1], p3 = [e0, e1, e2]."""
    root = tmp_path_factory.mktemp("assets")
    base_dir = make_base(root / "base")
    model, tok = patcher.load_model(base_dir)
    base_preds = patcher.predict(model, tok, TEXTS)
    for sign in (1.0, -1.0):  # the sign that makes the patched model disagree with the base on TEXTS[0]
        m, _ = patcher.load_model(base_dir)
        add_always_on_neuron(m, "e0", sign)
        if patcher.predict(m, tok, TEXTS[:1]) != base_preds[:1]:
            break
    else:  # pragma: no cover
        pytest.fail("could not build a prediction-changing patch")
    out = {"base": base_dir, "other": make_base(root / "other", seed=1), "base_preds": base_preds}
    out["p1"] = patcher.PatchSet.from_model(m).save(root / "p1")
    out["p1_preds"] = patcher.predict(m, tok, TEXTS)
    add_always_on_neuron(m, "e1", -sign)
    out["p2"] = patcher.PatchSet.from_model(m).save(root / "p2")
    out["p2_preds"] = patcher.predict(m, tok, TEXTS)
    add_always_on_neuron(m, "e2", sign)
    out["p3"] = patcher.PatchSet.from_model(m).save(root / "p3")
    out["p3_preds"] = patcher.predict(m, tok, TEXTS)
    return out


@pytest.fixture
def reg(tmp_path, monkeypatch) -> Registry:
    uri = mlflow_sqlite(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.pyfunc.load_model("models:/...")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    return Registry(uri)


def candidate(reg: Registry, assets, patch: str = "p1", parent: str = "1", night: str = "night-1",
              alias: str | None = CHALLENGER):
    n = int(patch[1:])
    return reg.register_candidate(
        NAME, assets[patch],
        metrics={"SR": 1.0, "ER": 1.0, "TestR": 0.98, "neurons": float(n)},
        step_metrics=[{"step": i + 1, "SR": 1.0, "TestR": 1.0 - 0.01 * i} for i in range(n)],
        ledger=ledger_for(n), parent_version=parent, flow_run_id=f"flow-{night}", alias=alias,
        report={"passed": True, "checks": {"TestR": ">= 0.95"}}, night_key=night,
    )


def version_numbers(reg: Registry) -> list[str]:
    return [v["version"] for v in reg.status(NAME)["versions"]]
