"""Patch sets (save/load/apply, the manifest, atomic saves), removing edits, and folding, on every family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from patcher import (Editor, PatchBlock, PatchedFFN, PatchedLinear, PatchError, PatchManifest, PatchSet, fingerprint,
                     load_model, resolve_device, resolve_dtype)
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
    ffn = s.editor.ffn
    assert (manifest["d_model"], manifest["d_out"]) == (ffn.d_model, ffn.d_out)
    assert manifest["base_dtype"] == "torch.float32"
    typed = PatchSet.load(path).manifest
    assert isinstance(typed, PatchManifest) and typed.edit_ids == ["e1", "e2", "e3"]
    assert typed.base_fingerprint == manifest["base_fingerprint"] and typed.neurons == manifest["neurons"]
    tensors = load_file(str(path / "patches.safetensors"))
    n_in = len(family.ffn_in)
    expected = {f"edit{i}.{name}" for i in range(3) for name in
                [f"in{j}.{w}" for j in range(n_in) for w in ("weight", "bias")] + ["out.weight"]}
    assert set(tensors) == expected
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
    assert len(loaded) == 0 and loaded.manifest.neurons == 0 and loaded.manifest.edits == []
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


@pytest.mark.parametrize("kind,threshold", [("distilbert", 0.0), ("llama", 0.0), ("t5-gated", 0.0), ("distilbert", 1.0)])
def test_clipped_patches_edit_round_trip_and_refuse_to_fold(kind, threshold, tmp_path):
    """clip_negative=True (with or without a clip_threshold): the edit is fixed, the manifest says
    how the neurons are clipped, applying the saved set clips them again (same logits), and an
    editor or a fold that would drop the clip is refused."""
    editor = C.editor_for(kind, clip_negative=True, clip_threshold=threshold, act_margin=threshold)
    request = C.wrong_request(editor)
    assert editor.edit(request).fixed and editor.is_correct(request.input, request.target)
    assert editor.patch_set().manifest.clip_negative and editor.patch_set().manifest.clip_threshold == threshold
    editor.patch_set().save(tmp_path)
    saved = PatchSet.load(tmp_path)
    model, tok = _fresh(kind)
    saved.apply(model)
    assert PatchedFFN.find(model).clip and PatchedFFN.find(model).clip_threshold == threshold
    assert torch.equal(C.logits(model, tok), C.logits(editor.model, tok))
    unclipped, _ = _fresh(kind)  # the same neurons unclipped are another model
    PatchSet(saved.manifest.model_copy(update={"clip_negative": False}), saved.blocks).apply(unclipped)
    assert not torch.equal(C.logits(unclipped, tok), C.logits(editor.model, tok))
    with pytest.raises(PatchError, match="new ones cannot use clip_negative=False"):
        Editor(editor.model, editor.tokenizer, C.config())
    with pytest.raises(PatchError, match="cannot be folded"):
        editor.folded()


def test_folded_model_serves_and_saves_state(tmp_path):
    s = C.stream("bert")
    folded = s.editor.folded()
    ffn = get_path(folded, "bert.encoder.layer.1.intermediate.dense")
    assert ffn.out_features == 64 + s.editor.ffn.neurons
    # the fold of an empty patch set is the base model itself
    model, tok = _fresh("bert")
    editor = Editor(model, tok, C.config())
    torch.testing.assert_close(C.logits(editor.folded(), tok), s.logits[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------- the manifest
def _handmade(kind: str, seed: int = 0, dtype=torch.float32, ids=("a", "b"), neurons=(2, 1), model=None):
    """A tiny model carrying hand-made patch blocks (fp32 masters) strong enough to move its logits."""
    if model is None:
        model, tok = _fresh(kind)
        model = model.to(dtype)
    family = resolve_family(model)
    ffn = PatchedFFN.of(model, family)
    gen = torch.Generator().manual_seed(seed)
    for edit_id, n in zip(ids, neurons):
        keys = [torch.randn(n, ffn.d_model, generator=gen) for _ in family.ffn_in]
        biases = [torch.full((n,), 2.0) for _ in family.ffn_in]
        ffn.add(PatchBlock(edit_id, keys, biases, 5.0 * torch.randn(n, ffn.d_out, generator=gen), {}))
    return model


def test_manifest_written_by_the_previous_code_still_loads(tmp_path):
    """A manifest as the untyped code wrote it (no d_model/d_out/base_dtype, meta flattened into
    each edit) loads, keeps its metadata, and saves back in the same shape."""
    model = _handmade("gpt2")
    PatchSet.from_model(model).save(tmp_path / "new")
    old = json.loads((tmp_path / "new" / "manifest.json").read_text())
    for key in ("d_model", "d_out", "base_dtype", "clip_negative", "clip_threshold"):
        del old[key]
    old["created_at"] = "2026-11-20T02:00:00.123456+00:00"
    old["edits"][0]["source"] = "ticket-7"
    old["night"] = "2026-11-20"  # an `extra` field
    (tmp_path / "new" / "manifest.json").write_text(json.dumps(old, indent=2, sort_keys=True))
    loaded = PatchSet.load(tmp_path / "new")
    assert loaded.edit_ids == ["a", "b"] and loaded.manifest.d_model is None and not loaded.manifest.clip_negative
    assert loaded.manifest.clip_threshold == 0.0
    assert loaded.manifest.edits[0].meta == {"source": "ticket-7"} and loaded.blocks[0].meta == {"source": "ticket-7"}
    assert loaded.manifest.model_extra == {"night": "2026-11-20"}
    resaved = json.loads((loaded.save(tmp_path / "again") / "manifest.json").read_text())
    assert resaved["edits"][0] == {"id": "a", "neurons": 2, "source": "ticket-7"} and resaved["night"] == "2026-11-20"
    fresh, tok = _fresh("gpt2")
    loaded.apply(fresh)
    assert torch.equal(C.logits(fresh, tok), C.logits(model, tok))
    assert loaded.manifest.edits[0].id == "a" and loaded.manifest.neurons == 3


def _tensors(path):
    return load_file(str(path / "patches.safetensors"))


@pytest.mark.parametrize("case, match", [
    ("extra tensor", "does not describe"),
    ("extra projection", "does not describe"),
    ("wrong neurons", "has shape"),
    ("wrong width", "has shape"),
    ("missing", "lacks tensor"),
    ("not float", "not a float tensor"),
])
def test_load_checks_tensors_against_the_manifest(tmp_path, case, match):
    path = PatchSet.from_model(_handmade("llama")).save(tmp_path / "ps")
    tensors = _tensors(path)
    if case == "extra tensor":
        tensors["edit2.out.weight"] = tensors["edit1.out.weight"].clone()
    elif case == "extra projection":
        tensors["edit0.in2.bias"] = tensors["edit0.in1.bias"].clone()
    elif case == "wrong neurons":  # edit a has 2 neurons: give it one in every tensor (consistent, but not 2)
        for name in [k for k in tensors if k.startswith("edit0.")]:
            tensors[name] = tensors[name][:1].clone()
    elif case == "wrong width":
        tensors["edit1.out.weight"] = torch.zeros(1, 7)
    elif case == "missing":
        del tensors["edit1.in1.bias"]
    else:
        tensors["edit0.in0.bias"] = tensors["edit0.in0.bias"].to(torch.int64)
    save_file(tensors, str(path / "patches.safetensors"))
    with pytest.raises(PatchError, match=match):
        PatchSet.load(path)


@pytest.mark.parametrize("edit, match", [
    ({"edits": "swap"}, "duplicate edit ids"),
    ({"neurons": 4}, "neurons is 4 but the edits add up to 3"),
    ({"edits": "drop"}, "neurons is 3 but the edits add up to 2"),
    ({"base_fingerprint": None}, "base_fingerprint"),
])
def test_load_checks_the_manifest_itself(tmp_path, edit, match):
    path = PatchSet.from_model(_handmade("bert")).save(tmp_path / "ps")
    manifest = json.loads((path / "manifest.json").read_text())
    if edit.get("edits") == "swap":
        manifest["edits"][1]["id"] = manifest["edits"][0]["id"]
    elif edit.get("edits") == "drop":
        manifest["edits"] = manifest["edits"][:1]
    else:
        manifest.update(edit)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PatchError, match=match):
        PatchSet.load(path)


def test_a_crash_while_saving_leaves_the_previous_patch_set_whole(tmp_path, monkeypatch):
    """Inject a crash between the tensors and the manifest: the folder still holds the previous
    patch set, tensors and manifest together, and no temporary folder is left behind."""
    path = tmp_path / "ps"
    PatchSet.from_model(_handmade("gpt2", seed=0)).save(path)
    before = _tensors(path)
    manifest_before = (path / "manifest.json").read_text()
    newer = PatchSet.from_model(_handmade("gpt2", seed=1, ids=("c",), neurons=(3,)))
    real_write_text = type(path).write_text

    def crash_on_manifest(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise OSError("disk full (injected)")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(type(path), "write_text", crash_on_manifest)
    with pytest.raises(OSError, match="injected"):
        newer.save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ps"]
    assert (path / "manifest.json").read_text() == manifest_before
    loaded = PatchSet.load(path)
    assert loaded.edit_ids == ["a", "b"]
    after = _tensors(path)
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    newer.save(path)  # and a save that completes replaces it whole
    assert PatchSet.load(path).edit_ids == ["c"] and set(_tensors(path)) == {"edit0.in0.weight", "edit0.in0.bias", "edit0.out.weight"}


def test_save_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(PatchError, match="holds other files"):
        PatchSet.from_model(_handmade("bert")).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and not (tmp_path / "manifest.json").exists()


# ---------------------------------------------------------------------------- load_model, device, dtype
def _saved_base(kind: str, folder):
    model, tok = _fresh(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_model_refuses_what_is_not_a_safetensors_model(tmp_path):
    with pytest.raises(PatchError, match="no config.json"):
        load_model(tmp_path)
    folder = _saved_base("bert", tmp_path / "m")
    for weights in folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(PatchError, match="no .safetensors weights"):
        load_model(folder)


def test_load_model_device_and_dtype(tmp_path):
    folder = _saved_base("llama", tmp_path / "m")
    model, tok = load_model(folder, device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    model, _ = load_model(folder, dtype="bfloat16", device="auto")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {auto} and not model.training
    assert resolve_dtype(None) is None and resolve_dtype("auto") is None and resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(PatchError, match="unknown dtype 'int8'"):
        load_model(folder, dtype="int8")
    with pytest.raises(PatchError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PatchError, match="CUDA is not available"):
            load_model(folder, device="cuda")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "t5-gated"])
def test_bf16_apply_save_load_remove_fold(kind, tmp_path):
    """A bf16 model: hand-made fp32 patches apply in bf16, survive save/load bit for bit, come out
    exactly with remove, and fold into bf16 layers with the same outputs to bf16 rounding."""
    folder = _saved_base(kind, tmp_path / "base")
    base, tok = load_model(folder, dtype=torch.bfloat16, device="cpu")
    base_logits = C.logits(base, tok)
    patched = _handmade(kind, model=load_model(folder, dtype=torch.bfloat16, device="cpu")[0])
    patched_logits = C.logits(patched, tok)
    assert patched_logits.dtype == torch.bfloat16 and not torch.equal(patched_logits, base_logits)
    ffn = PatchedFFN.find(patched)
    assert ffn.out.extra_weight.dtype == torch.bfloat16 and ffn.blocks[0].out_weight.dtype == torch.float32

    patch_set = PatchSet.from_model(patched)
    assert patch_set.manifest.base_dtype == "torch.bfloat16"
    loaded = PatchSet.load(patch_set.save(tmp_path / "ps"))
    assert loaded.blocks[0].out_weight.dtype == torch.float32  # the masters keep their precision
    fresh, _ = load_model(folder, dtype="bf16", device="cpu")
    loaded.apply(fresh)
    assert torch.equal(C.logits(fresh, tok), patched_logits)

    folded = Editor(copy.deepcopy(fresh), tok, C.config()).folded()
    assert {p.dtype for p in folded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(C.logits(folded, tok).float(), patched_logits.float(), atol=0.1, rtol=0.05)
    editor = Editor(fresh, tok, C.config())
    editor.remove("b")
    editor.remove("a")
    assert torch.equal(C.logits(fresh, tok), base_logits)

    fp32, _ = load_model(folder, dtype="float32", device="cpu")
    with pytest.raises(PatchError, match="trained on the base in torch.bfloat16, this model is torch.float32"):
        loaded.apply(fp32)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_apply_puts_the_patches_on_the_model_device(kind):
    """Every patch tensor follows the model to its device (here `meta`, which any CPU tensor left
    behind would not match)."""
    patch_set = PatchSet.from_model(_handmade(kind))
    model, _ = _fresh(kind)
    model.to("meta")
    patch_set.apply(model, check_base=False)
    ffn = PatchedFFN.find(model)
    tensors = [t for b in ffn.blocks for t in (*b.in_weight, *b.in_bias, b.out_weight)]
    tensors += [m.extra_weight for m in (*ffn.ins, ffn.out)] + [m.extra_bias for m in ffn.ins]
    assert tensors and {t.device.type for t in tensors} == {"meta"}
    assert {t.device.type for b in patch_set.blocks for t in (b.out_weight, *b.in_weight)} == {"cpu"}  # not moved
