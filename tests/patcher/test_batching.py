"""``Editor.edit_batch``: edits trained side by side, kept in order, each as ``edit`` would keep it."""

from __future__ import annotations

import pytest
import torch

from patcher import EditRequest, PatchError, PatcherConfig, batching
from patcher.batching import train_together
from patcher.steps import init_neurons, to_block
from patcher.training import TrainLog
from tests import tiny
from tests.patcher import _common as C
from tests.patcher.test_device import _DefaultDevice

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("kind,steps,clip", [("distilbert", 40, False), ("gpt2", 40, False), ("t5-gated", 120, False),
                                            ("distilbert", 40, True), ("gpt2", 40, True)])
def test_each_edit_of_a_pack_trains_as_it_would_alone_after_the_ones_before_it(kind, steps, clip):
    """Three edits in one pack, stopping at different steps (the pack shrinks as they stop; one may
    run to ``max_steps``): each edit's neurons, steps and losses are those ``_train`` gives it
    alone, against the memory plus the queries of the edits before it in the batch and not after
    (to float rounding): per-edit losses, clip, stopping rules and memory masks."""
    editor = C.editor_for(kind, max_steps=steps, dropout_rounds=2, leak_tol=1e9, memory_candidates=16, memory_topk=8,
                          clip_negative=clip)
    requests = [C.wrong_request(editor, i) for i in range(3)]
    preps = [editor._prepare(r, 0.0) for r in requests]
    packed = train_together(editor, preps)
    assert len({log.steps for _, log in packed}) > 1, "test premise: the edits stop at different steps"
    memory = editor.memory
    for p, (block, log) in zip(preps, packed):
        batches = editor._training_batches(p.cap, p.variants, len(p.labels), p.seed)
        alone, alone_log = editor._train(p.request.id, p.positions, p.cap, p.variants[0], p.variants, p.labels,
                                         batches, p.seed)
        assert log.steps == alone_log.steps
        assert log.losses == pytest.approx(alone_log.losses, rel=1e-4)
        for a, b in zip(block.in_weight + block.in_bias + [block.out_weight],
                        alone.in_weight + alone.in_bias + [alone.out_weight]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        editor.memory = torch.cat([editor.memory, p.cap.q.float()])  # what edit remembers once it is kept
    editor.memory = memory


@pytest.mark.parametrize("kind", ["gpt2", "t5-gated"])
def test_candidates_scored_as_their_union_or_per_neuron_train_the_same_neurons(kind, monkeypatch):
    """CPUs score the memory candidates as one product over their union, other devices per neuron
    (no data-dependent size): the same pre-activations, so the same neurons (to float rounding)."""
    editor = C.editor_for(kind, max_steps=40, memory_candidates=16, memory_topk=8, memory_refresh=3)
    preps = [editor._prepare(C.wrong_request(editor, i), 0.0) for i in range(2)]
    union = train_together(editor, preps)
    monkeypatch.setattr(batching, "UNION_DEVICES", ())
    own = train_together(editor, preps)
    for (a, log_a), (b, log_b) in zip(union, own):
        assert log_a.steps == log_b.steps
        for s, t in zip(a.in_weight + [a.out_weight], b.in_weight + [b.out_weight]):
            torch.testing.assert_close(s, t, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "distilbert", "gpt2", "llama", "bart", "t5-gated"])
def test_every_kept_edit_is_fixed_on_the_model_and_remembered(kind):
    editor = C.editor_for(kind, edit_batch=3)
    memory_before = editor.memory.shape[0]
    requests = [C.wrong_request(editor, i) for i in range(3)]
    results = editor.edit_batch(requests)
    assert [r.id for r in results] == [r.id for r in requests]
    assert all(r.fixed for r in results), [r.message for r in results]
    kept = [r for r, res in zip(requests, results) if res.neurons]  # the others were right at their turn
    assert len(kept) >= 2 and editor.edit_ids == [r.id for r in kept]
    assert editor.is_correct(requests[-1].input, requests[-1].target)  # the last one nothing came after
    # the memory grew by exactly the queries edit remembers for each kept edit
    queries = sum(len(v.positions) for r in kept for v in editor._variants(r))
    assert editor.memory.shape[0] == memory_before + queries
    assert sum(r.train_seconds for r in results) > 0 and all(r.seconds > 0 for r in results)


def test_the_commit_sees_the_model_as_the_edits_before_left_it():
    """Binary classifier, one sentence. e1 flips it. e2, the same fix under another id, trains with
    e1 but is right once e1 is kept: it gets nothing. e3, back to what the base says, is right at
    capture (not trained with the others) but wrong once e1 is kept: it is trained then."""
    editor = C.editor_for("bert", edit_batch=3)
    text = C.CLS_TEXTS[0]
    base = editor.predict([text])[0]
    other = next(lab for lab in editor.model.config.label2id if lab != base)
    results = editor.edit_batch([EditRequest("e1", text, other), EditRequest("e2", text, other),
                                 EditRequest("e3", text, base)])
    e1, e2, e3 = results
    assert e1.fixed and e1.neurons == 1
    assert e2.already_correct and e2.neurons == 0
    assert e3.fixed and e3.neurons >= 1 and e3.steps > 0
    assert editor.edit_ids == ["e1", "e3"] and editor.predict([text]) == [base]


@pytest.mark.parametrize("stale,neurons", [(True, 1), (False, 2)])
def test_a_batched_try_that_misses_is_followed_as_edit_would_follow_it(stale, neurons):
    """The batch's neurons do not fix the edit on the model (here: a try that adds nothing). Trained
    on a capture that has changed since, the edit is trained again alone from one neuron, as ``edit``
    trains it; trained on the capture it has now, the next try is ``retry_neurons`` per position."""
    editor = C.editor_for("bert", retry_neurons=2)
    request = C.wrong_request(editor, 0)
    p = editor._prepare(request, 0.0)
    params = init_neurons(p.cap.q[p.positions].float(), editor.ffn.d_out, 1.0, False, 0)
    params["amp"] = torch.zeros_like(params["amp"])  # outputs nothing: it cannot fix anything
    dud = (to_block(request.id, params, False, editor.dtype), TrainLog(7, {}), 0.0)
    result = editor._train_and_keep(p, 0.0, dud, stale=stale)
    assert result.fixed and result.neurons == neurons, result.message
    assert result.steps > 7 and editor.edit_ids == [request.id]
    assert editor.ffn.blocks[0].neurons == neurons


def test_a_bad_or_repeated_request_gets_its_error_and_the_others_are_patched():
    editor = C.editor_for("distilbert", edit_batch=4)
    good = [C.wrong_request(editor, i) for i in range(2)]
    requests = [good[0], EditRequest("", "x", good[0].target), EditRequest(good[0].id, good[0].input, good[0].target), good[1]]
    results = editor.edit_batch(requests)
    assert results[0].fixed and results[3].fixed
    assert isinstance(results[1], PatchError) and "non-empty" in str(results[1])
    assert isinstance(results[2], PatchError) and "already patched" in str(results[2])
    assert editor.edit_ids == [good[0].id, good[1].id]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_batched_training_makes_no_stray_tensor(kind):
    model, tok = tiny.build(kind)
    if kind == "bert":
        model.bert.encoder.layer[0].output.dropout.p = 0.1
    editor = C.Editor(model, tok, C.config(memory_refresh=3, memory_candidates=20, dropout_rounds=2, edit_batch=2))
    editor.build_memory(tiny.SENTENCES)
    requests = [C.wrong_request(editor, i) for i in range(2)]
    with _DefaultDevice("meta"):
        results = editor.edit_batch(requests)
    assert all(r.fixed for r in results), results


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_bf16_batched_edits_are_fixed_by_the_real_forward(kind):
    model, tok = tiny.build(kind)
    model = model.to(torch.bfloat16)
    editor = C.Editor(model, tok, C.config(edit_batch=2))
    editor.build_memory(tiny.SENTENCES)
    requests = [C.wrong_request(editor, i) for i in range(2)]
    results = editor.edit_batch(requests)
    assert any(r.fixed for r in results), [r.message for r in results]
    assert editor.is_correct(requests[-1].input, requests[-1].target) == results[-1].fixed
    assert editor.edit_ids == [r.id for r in results if r.neurons]
    assert all(b.out_weight.dtype == torch.bfloat16 for b in editor.ffn.blocks)


@pytest.mark.parametrize("off", [dict(cached=False), dict(stop_rule="val_loss"), dict(lr_scheduler="plateau"),
                                 dict(edit_memory="reference"), dict(loss_topk="pooled")])
def test_edit_batch_refuses_what_it_does_not_do(off):
    with pytest.raises(ValueError, match="edit_batch=4"):
        PatcherConfig(edit_batch=4, **off)
    PatcherConfig(edit_batch=1, **off)
