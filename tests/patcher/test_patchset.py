"""Patch sets (save/load/apply), removing edits, and folding, on every family."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from patcher import Editor, PatchedFFN, PatchedLinear, PatchError, PatchSet, fingerprint
from patcher.families import get_path, resolve_family
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fresh(kind: str, seed: int = 0):
    return tiny.build(kind, seed=seed)


# ---------------------------------------------------------------------------- save / load / apply
@pytest.mark.parametrize("kind", C.KINDS)
def test_save_load_apply_gives_identical_logits(kind, tmp_path):
    s = C.stream(kind)
    s.editor.patch_set().save(tmp_path)
    loaded = PatchSet.load(tmp_path)
    assert loaded.edit_ids == ["e1", "e2", "e3"] and loaded.neurons == s.editor.ffn.neurons
    model, tok = _fresh(kind)
    assert torch.equal(C.logits(model, tok), s.logits[0])  # same-seed build is the same base
    assert loaded.apply(model) is model
    assert torch.equal(C.logits(model, tok), s.logits[-1])
    # the applied model is editable further and saves the same patches again
    editor = Editor(model, tok, C.config())
    assert editor.edit_ids == ["e1", "e2", "e3"]
    for a, b in zip(editor.ffn.blocks, s.editor.ffn.blocks):
        assert torch.equal(a.out_weight, b.out_weight)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_patch_set_format(kind, tmp_path):
    s = C.stream(kind)
    path = s.editor.patch_set().save(tmp_path / "ps")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "patches.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    family = resolve_family(s.model)
    assert manifest["format"] == "patchflow.patchset/1"
    assert manifest["model_type"] == kind and manifest["architecture"] == type(s.model).__name__
    assert manifest["base_fingerprint"] == fingerprint(_fresh(kind)[0])
    assert manifest["layer"] == family.layer.replace("-1", "1")  # resolved index (2 layers)
    assert manifest["ffn_in"] == list(family.ffn_in) and manifest["ffn_out"] == family.ffn_out
    assert [e["id"] for e in manifest["edits"]] == ["e1", "e2", "e3"]
    assert [e["neurons"] for e in manifest["edits"]] == [r.neurons for r in s.results]
    assert manifest["neurons"] == sum(r.neurons for r in s.results)
    assert manifest["hyperparameters"] == s.editor.config.model_dump()
    assert {"library_version", "created_at"} <= set(manifest)
    tensors = load_file(str(path / "patches.safetensors"))
    n_in = len(family.ffn_in)
    expected = {f"edit{i}.{name}" for i in range(3) for name in
                [f"in{j}.{w}" for j in range(n_in) for w in ("weight", "bias")] + ["out.weight"]}
    assert set(tensors) == expected
    ffn = s.editor.ffn
    for i, result in enumerate(s.results):
        assert tensors[f"edit{i}.in0.weight"].shape == (result.neurons, ffn.d_model)
        assert tensors[f"edit{i}.in0.bias"].shape == (result.neurons,)
        assert tensors[f"edit{i}.out.weight"].shape == (result.neurons, ffn.d_out)


def test_fingerprint_ignores_patches():
    s = C.stream("gpt2")
    assert fingerprint(s.model) == fingerprint(_fresh("gpt2")[0])
    assert fingerprint(_fresh("gpt2", seed=1)[0]) != fingerprint(s.model)


@pytest.mark.parametrize("kind", C.KINDS)
def test_apply_to_a_different_base_is_refused(kind):
    patch_set = C.stream(kind).editor.patch_set()
    other, _ = _fresh(kind, seed=1)
    with pytest.raises(PatchError, match="fingerprint mismatch"):
        patch_set.apply(other)
    assert PatchedFFN.find(other) is None or PatchedFFN.find(other).blocks == []


def test_apply_checks_type_and_freshness(tmp_path):
    patch_set = C.stream("bert").editor.patch_set()
    with pytest.raises(PatchError, match="model type 'bert'"):
        patch_set.apply(_fresh("roberta")[0])
    gated = C.stream("t5").editor.patch_set()
    with pytest.raises(PatchError, match="model type 't5'"):
        gated.apply(_fresh("t5-gated")[0])
    model, tok = _fresh("bert")
    patch_set.apply(model)
    with pytest.raises(PatchError, match="already carries patches"):
        patch_set.apply(model)
    # check_base=False skips only the fingerprint check
    other, tok = _fresh("bert", seed=1)
    patch_set.apply(other, check_base=False)
    assert PatchedFFN.find(other).edit_ids() == ["e1", "e2", "e3"]


def test_load_rejects_what_is_not_a_patch_set(tmp_path):
    with pytest.raises(PatchError, match="not a patch set"):
        PatchSet.load(tmp_path)
    path = C.stream("distilbert").editor.patch_set().save(tmp_path / "ps")
    manifest = path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text("{not json")
    with pytest.raises(PatchError, match="not valid JSON"):
        PatchSet.load(path)
    manifest.write_text(json.dumps(dict(json.loads(good), format="other/9")))
    with pytest.raises(PatchError, match="unknown format"):
        PatchSet.load(path)
    manifest.write_text(good)
    tensors = load_file(str(path / "patches.safetensors"))
    del tensors["edit1.out.weight"]
    save_file(tensors, str(path / "patches.safetensors"))
    with pytest.raises(PatchError, match="lacks tensor"):
        PatchSet.load(path)


def test_empty_patch_set_round_trips(tmp_path):
    model, tok = _fresh("gpt2")
    editor = Editor(model, tok, C.config())
    loaded = PatchSet.load(editor.patch_set().save(tmp_path))
    assert len(loaded) == 0 and loaded.manifest["neurons"] == 0
    fresh, _ = _fresh("gpt2")
    loaded.apply(fresh)
    assert torch.equal(C.logits(fresh, tok), C.logits(model, tok))


# ---------------------------------------------------------------------------- removing edits
@pytest.mark.parametrize("kind", C.KINDS)
def test_remove_restores_logits_exactly(kind):
    s = C.stream(kind)
    editor = Editor(s.copy_model(), s.tokenizer, C.config())
    editor.remove("e3")
    assert torch.equal(C.logits(editor.model, s.tokenizer), s.logits[2])
    editor.remove("e2")
    assert torch.equal(C.logits(editor.model, s.tokenizer), s.logits[1])
    editor.remove("e1")
    assert editor.edit_ids == [] and editor.ffn.neurons == 0
    assert torch.equal(C.logits(editor.model, s.tokenizer), s.logits[0])
    with pytest.raises(PatchError, match="no patch for edit 'e1'"):
        editor.remove("e1")


@pytest.mark.parametrize("kind", C.KINDS)
def test_remove_from_the_middle(kind):
    s = C.stream(kind)
    editor = Editor(s.copy_model(), s.tokenizer, C.config())
    editor.remove("e2")
    assert editor.edit_ids == ["e1", "e3"]
    full = s.editor.patch_set()
    expected, tok = _fresh(kind)
    PatchSet(full.manifest, [b for b in full.blocks if b.edit_id != "e2"]).apply(expected)
    got = C.logits(editor.model, s.tokenizer)
    assert torch.equal(got, C.logits(expected, tok))
    assert not torch.equal(got, s.logits[-1])
    # removing one of two
    editor.remove("e1")
    only3, tok = _fresh(kind)
    PatchSet(full.manifest, [full.blocks[2]]).apply(only3)
    assert torch.equal(C.logits(editor.model, s.tokenizer), C.logits(only3, tok))


# ---------------------------------------------------------------------------- folding
@pytest.mark.parametrize("kind", C.KINDS)
def test_fold_changes_no_output(kind):
    s = C.stream(kind)
    folded = s.editor.folded()
    assert folded is not s.model and PatchedFFN.find(folded) is None
    assert s.editor.edit_ids == ["e1", "e2", "e3"]  # the editor's model keeps its patches
    assert not any(isinstance(m, PatchedLinear) for m in folded.modules())
    # fp32: folding changes the summation order (one wider matmul instead of base + extras), so
    # logits agree to fp32 rounding (bart: up to 2.7e-5 on logits of magnitude 7.5) ...
    torch.testing.assert_close(C.logits(folded, s.tokenizer), s.logits[-1], atol=5e-4, rtol=1e-3)
    # ... and in float64 the fold is exact up to float64 rounding
    m64 = s.copy_model().double()
    patched64 = C.logits(m64, s.tokenizer)
    folded64 = PatchedFFN.find(m64).fold(m64)
    torch.testing.assert_close(C.logits(folded64, s.tokenizer), patched64, atol=1e-10, rtol=1e-10)
    # the FFN is a plain, wider linear pair (Conv1D for GPT-2)
    family, n = s.editor.family, s.editor.ffn.neurons
    base_model, _ = _fresh(kind)
    layer, base_layer = get_path(folded, family.layer), get_path(base_model, family.layer)
    for name in family.ffn_in + (family.ffn_out,):
        module, base = get_path(layer, name), get_path(base_layer, name)
        assert type(module) is type(base) and type(module) in (nn.Linear, Conv1D)
        grow = 0 if name == family.ffn_out else n  # in: more outputs; out: more inputs
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            b_in, b_out = base.weight.shape
        else:
            d_out, d_in = module.weight.shape
            b_out, b_in = base.weight.shape
        assert (d_in, d_out) == ((b_in + n, b_out) if name == family.ffn_out else (b_in, b_out + grow))
        assert not module.weight.requires_grad


def test_folded_model_serves_and_saves_state(tmp_path):
    s = C.stream("bert")
    folded = s.editor.folded()
    ffn = get_path(folded, "bert.encoder.layer.1.intermediate.dense")
    assert ffn.out_features == 64 + s.editor.ffn.neurons
    # the fold of an empty patch set is the base model itself
    model, tok = _fresh("bert")
    editor = Editor(model, tok, C.config())
    torch.testing.assert_close(C.logits(editor.folded(), tok), s.logits[0], atol=0, rtol=0)
