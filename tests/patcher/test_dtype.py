"""bf16 models of every family: the neurons train in fp32 and are applied in bf16, and an edit the
editor calls fixed is fixed by the patched bf16 model's own forward (and by its saved, applied
and folded forms); removing every edit gives the bf16 base back bit for bit."""

from __future__ import annotations

import pytest
import torch

from patcher import Editor, PatchSet, target_correct
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _bf16(kind: str):
    model, tok = tiny.build(kind)
    return model.to(torch.bfloat16), tok


@pytest.mark.parametrize("kind", C.KINDS)
def test_bf16_edits_are_fixed_by_the_real_forward(kind, tmp_path):
    model, tok = _bf16(kind)
    editor = Editor(model, tok, C.config())
    editor.build_memory(tiny.SENTENCES)
    assert editor.memory.dtype == torch.float32 and editor.val_memory.dtype == torch.float32
    base = C.logits(model, tok)
    assert base.dtype == torch.bfloat16
    requests = [C.wrong_request(editor, i) for i in range(2)]
    results = []
    for request in requests:  # the editor's word is the model's own bf16 forward, checked as it is given
        results.append(editor.edit(request))
        if results[-1].fixed:
            assert target_correct(editor.model, tok, [request.input], [request.target]) == [True]
    assert any(r.fixed for r in results), [r.message for r in results]
    fixed = [r for r, res in zip(requests, results) if res.fixed]
    assert editor.edit_ids == [r.id for r in fixed]
    for block in editor.ffn.blocks:
        assert block.out_weight.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in block.in_weight)
    assert fixed[-1] and editor.is_correct(fixed[-1].input, fixed[-1].target)
    patched = C.logits(model, tok)

    # saved and applied to a fresh bf16 base: the same outputs, bit for bit
    editor.patch_set().save(tmp_path / "p")
    fresh, _ = _bf16(kind)
    PatchSet.load(tmp_path / "p").apply(fresh)
    assert torch.equal(C.logits(fresh, tok), patched)

    # folded into plain bf16 layers: the last edit still right, weights in bf16
    folded = editor.folded()
    assert all(p.dtype == torch.bfloat16 for p in folded.parameters())
    assert target_correct(folded, tok, [fixed[-1].input], [fixed[-1].target]) == [True]

    for request in fixed:
        editor.remove(request.id)
    assert torch.equal(C.logits(model, tok), base)


def test_bf16_check_of_fixed_is_in_the_models_dtype():
    """The cached loop's "fixed" rounds the neurons to bf16 and runs the tail in bf16: on the
    mistake it gives the same logits as the patched model's own forward."""
    from patcher.steps import CachedStep, init_neurons, to_block

    model, tok = _bf16("llama")
    editor = Editor(model, tok, C.config())
    request = C.wrong_request(editor)
    variants = editor._variants(request)
    cap = editor.capture(variants)
    n = len(variants[0].labels)
    params = init_neurons(cap.q[:n].float(), editor.ffn.d_out, 10.0, True, seed=0)
    labels = torch.tensor(variants[0].labels)
    step = CachedStep(editor._logits_from, editor.ffn.act, True, editor._training_batches(cap, variants, n, 0),
                      labels, list(range(n)), 10)
    out = step(params, *step.batch(0))
    assert out.logits.dtype == torch.float32 and out.z_rows.dtype == torch.float32
    editor.ffn.add(to_block("x", params, True, torch.bfloat16))
    with torch.no_grad():
        real = editor._forward(variants[:1])[1]
        q, resid, y = step.clean
        from patcher.steps import contribution, rounded

        _, delta = contribution(rounded(params, torch.bfloat16), q, editor.ffn.act, True)
        cached = editor._logits_from(y + delta, resid)
    assert real.dtype == cached.dtype == torch.bfloat16
    assert bool(out.fixed) == bool((real.argmax(-1) == labels).all())
    torch.testing.assert_close(cached.float(), real.float(), atol=0.1, rtol=0.05)


def test_assigned_memory_is_kept_in_fp32():
    """A memory saved by a bf16 run (or made elsewhere) is scored against the fp32 neurons: it is
    stored as fp32 on the model's device whatever is assigned, and an edit then trains on it."""
    model, tok = _bf16("distilbert")
    editor = Editor(model, tok, C.config())
    editor.build_memory(tiny.SENTENCES)
    memory, val = editor.memory.clone(), editor.val_memory.clone()
    editor.memory, editor.val_memory = memory.to(torch.bfloat16), val.to(torch.float64)
    assert editor.memory.dtype == editor.val_memory.dtype == torch.float32
    assert torch.equal(editor.memory, memory.to(torch.bfloat16).float())
    assert editor.edit(C.wrong_request(editor)).steps >= 1


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_bf16_full_forward_mode(kind):
    """The reference-faithful mode puts the fp32 neurons into the bf16 model (cast where they join it)."""
    model, tok = _bf16(kind)
    editor = Editor(model, tok, C.config(cached=False, max_steps=150))
    editor.build_memory(tiny.SENTENCES)
    request = C.wrong_request(editor)
    result = editor.edit(request)
    assert result.fixed, result.message
    assert target_correct(model, tok, [request.input], [request.target]) == [True]
    assert editor.ffn.out.live_weight is None and editor.ffn.blocks[0].out_weight.dtype == torch.bfloat16
