"""The patch-cost benchmark on small configurations (seconds): the real MiniLM with 10 patches through
the CLI, a tiny gated Llama through ``measure``; every field is there, the byte counts are what
the patch shapes imply, and the folded model predicts what the unfolded one does."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import patch_cost, tables
from tests import tiny

torch.set_num_threads(1)

FAST = ["--repeats", "2", "--warmup", "1", "--check-inputs", "8", "--query-texts", "16"]


def check_variants(m: dict, neurons: int, bytes_per_neuron: int, repeats: int, folded_per_neuron: int) -> None:
    v = m["variants"]
    assert list(v) == list(patch_cost.VARIANTS)
    for row in v.values():
        for b in patch_cost.BATCHES:
            lat = row[f"batch{b}"]
            assert len(lat["runs_ms"]) == repeats and 0 < lat["min_ms"] <= lat["median_ms"]
    assert m["neurons"] == neurons
    assert v["base"]["patch_bytes"] == v["folded"]["patch_bytes"] == 0
    assert v["unfolded"]["patch_bytes"] == neurons * bytes_per_neuron
    # unfolded: the base parameters plus the patches in buffers; folded: the patches in the parameters
    assert v["unfolded"]["parameter_bytes"] == v["base"]["parameter_bytes"]
    assert v["unfolded"]["buffer_bytes"] == v["base"]["buffer_bytes"] + neurons * bytes_per_neuron
    assert v["folded"]["parameter_bytes"] == v["base"]["parameter_bytes"] + neurons * folded_per_neuron
    check = m["folded_vs_unfolded"]
    assert check["predictions_equal"] is True and check["prediction_agreement"] == 1.0
    assert check["max_abs_logit_diff"] < 1e-3
    assert set(m["overhead"]) == {f"{k}_batch{b}" for k in ("unfolded", "folded") for b in patch_cost.BATCHES}
    assert all(r > 0 for r in m["overhead"].values())


def test_minilm_with_10_patches(tmp_path):
    out = tmp_path / "patch-cost.json"
    returned = patch_cost.main(["--patches", "10", "--out", str(out), *FAST])
    data = json.loads(out.read_text())  # strict JSON
    assert data == json.loads(json.dumps(returned))
    assert data["benchmark"] == "patch-cost" and data["patches"] == 10 and data["device"] == "cpu"
    assert data["dtype"] == "float32" and data["batch_sizes"] == [1, 32] and list(data["models"]) == ["minilm"]
    assert data["command"].startswith("python -m benchmarks.patch_cost --patches 10")
    m = data["models"]["minilm"]
    assert m["model"]["architecture"] == "BertForSequenceClassification" and m["model"]["d_model"] == 384
    assert m["model"]["layer"] == "bert.encoder.layer.5" and m["patches"] == 10
    per_neuron = (384 + 1 + 384) * 4  # key, bias, value in fp32
    check_variants(m, neurons=10, bytes_per_neuron=per_neuron, repeats=2, folded_per_neuron=per_neuron)
    table = tables.patch_cost_table({"pc": data})
    assert "| `pc` | minilm | 10 (10) | cpu, float32, 1 | folded |" in table and "yes (8 inputs)" in table
    assert tables.load_results(tmp_path) == {"patch-cost": data}


def test_gated_generator_two_neurons_per_patch():
    model, tok = tiny.build("llama")
    args = patch_cost.parser().parse_args(["--patches", "6", "--neurons-per-patch", "2", *FAST])
    m = patch_cost.measure("tiny-llama", model, tok, args)
    assert m["model"]["task"] == "generation" and m["patches"] == 6
    # gate row + bias, up row + bias, value row: d = 32, fp32; Llama's FFN has no biases and the
    # patches' are zero at initialisation, so folding adds no bias vectors
    check_variants(m, neurons=12, bytes_per_neuron=(32 + 1 + 32 + 1 + 32) * 4, repeats=2,
                   folded_per_neuron=3 * 32 * 4)


@pytest.mark.parametrize("bad, message", [(["--patches", "0"], "--patches must be >= 1"),
                                          (["--device", "cuda:99"], "cuda:99"),
                                          (["--dtype", "int8"], "unknown dtype"),
                                          (["--no-minilm"], "no model left")])
def test_bad_options_exit_with_one_line(bad, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        patch_cost.main(bad + ["--out", str(tmp_path / "x.json")])
    text = str(exc.value.code)
    assert text.startswith("error:") and message in text and "\n" not in text
    assert not (tmp_path / "x.json").exists()
