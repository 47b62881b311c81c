"""The fact-check base model's cache (no fine-tuning here: training is replaced by a stand-in only
to inject a crash or to count calls) and its judge on a tiny classifier."""

from __future__ import annotations

import dataclasses

import pytest

from editdata import factcheck as fc
from editdata import factcheck_model as fm
from patcher import predicted_labels
from tests import tiny

N = 600


@pytest.fixture(scope="module")
def data() -> fc.FactCheckData:
    return fc.build_factcheck(seed=0, n_cities=N)


def test_cache_key_changes_with_settings(data, tmp_path):
    s = fm.TrainSettings()
    key = fm.model_cache_key(data, s)
    assert key == fm.model_cache_key(data, fm.TrainSettings())
    assert key != fm.model_cache_key(data, dataclasses.replace(s, lr=1e-4))
    assert key != fm.model_cache_key(data, dataclasses.replace(s, epochs=s.epochs + 1))
    assert key != fm.model_cache_key(data, s, seed=1)
    assert key == fm.model_cache_key(data, dataclasses.replace(s, threads=1))  # speed only
    assert key != fm.model_cache_key(fc.build_factcheck(seed=0, n_cities=N - 10), s)
    assert fm.model_cache_dir(tmp_path, data, s).name == f"factcheck-minilm-{key}"


def test_default_cache_key_is_the_one_cached_models_carry():
    """Existing caches (.patchflow/cache, benchmarks/cache) stay valid across the move to editdata."""
    assert fm.model_cache_key(fc.build_factcheck(), fm.TrainSettings()) == "9ec04135c023"


def test_prepare_base_model_builds_once_and_never_leaves_a_half_folder(data, tmp_path, monkeypatch):
    calls = []

    def crash(out, *args):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-training")

    def train(out, *args):
        calls.append(out)
        (out / "config.json").write_text("{}")
        return {"val_accuracy": 1.0}

    monkeypatch.setattr(fm, "_train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        fm.prepare_base_model(tmp_path, data=data)
    folder = fm.model_cache_dir(tmp_path, data, fm.TrainSettings())
    assert not folder.exists()
    monkeypatch.setattr(fm, "_train", train)
    assert fm.prepare_base_model(tmp_path, data=data) == folder
    assert fm.prepare_base_model(tmp_path, data=data) == folder
    assert len(calls) == 1 and (folder / "config.json").is_file()


def test_mistakes_and_accuracy_agree_with_the_predicted_labels(data):
    model, tok = tiny.build("bert", num_labels=2)
    claims = data.test[:40]
    labels = predicted_labels(model, tok, [c.text for c in claims])
    wrong = [c for c, p in zip(claims, labels) if p != c.label]
    assert fm.mistakes(model, tok, claims, batch_size=16) == wrong
    assert fm.accuracy(model, tok, claims) == pytest.approx(1 - len(wrong) / len(claims))
    assert fm.mistakes(model, tok, []) == []


def test_training_examples_add_seeded_paraphrases(data):
    s = fm.TrainSettings(paraphrases_per_claim=1)
    ex = fm.training_examples(data.train, s, seed=0)
    assert len(ex) == 2 * len(data.train)
    assert ex == fm.training_examples(data.train, s, seed=0)
    assert fm.training_examples(data.train, dataclasses.replace(s, paraphrases_per_claim=0), 0) == \
        [(c.text, c.label) for c in data.train]


def test_minilm_folder_exists():
    assert (fm.minilm_folder() / "config.json").is_file()
