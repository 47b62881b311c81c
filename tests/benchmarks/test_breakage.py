"""benchmarks.breakage on a tiny BERT: neurons built by hand to break one input each way (one
firing, one below zero, several below zero adding up) are told apart, and the model is left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.breakage import CAUSES, broken_causes
from patcher import Editor, PatcherConfig
from patcher.layer import PatchBlock
from tests import tiny


@pytest.fixture()
def setup():
    """An input, its query q, a direction v in the FFN's output at the query (the only position the
    head reads) that turns the base's label into the other one, and t: the least multiple of v that does."""
    torch.manual_seed(0)
    model, tok = tiny.build("bert", num_labels=2)
    editor = Editor(model, tok, PatcherConfig(memory_size=10))
    text = tiny.SENTENCES[0]
    cap = editor.capture([editor._encode(text)])
    label = int(cap.logits[0].argmax())
    v = torch.zeros_like(cap.y, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.1)
    with torch.enable_grad():
        for _ in range(200):
            logits = editor._logits_from(cap.y + v, cap.resid)[0]
            opt.zero_grad()
            F.relu(logits[label] - logits[1 - label] + 1).backward()
            opt.step()
    v = v.detach()[0]

    def wrong(t: float) -> bool:
        return int(editor._logits_from(cap.y + t * v, cap.resid)[0].argmax()) != label

    assert wrong(1.0), "the direction should break the input"
    lo, hi = 0.0, 1.0
    for _ in range(30):
        lo, hi = (lo, (lo + hi) / 2) if wrong((lo + hi) / 2) else ((lo + hi) / 2, hi)
    return editor, text, editor.model.config.id2label[label], cap.q[0], v, hi


def _add(editor, name, q, zs, contributions, v):
    """Neurons with pre-activations zs on the query q, each adding contribution * v to the FFN's output there."""
    keys = torch.stack([q / q.dot(q) for _ in zs])
    zt = torch.tensor(zs, dtype=torch.float32)
    values = torch.stack([c / float(a) * v for c, a in zip(contributions, editor.ffn.act(zt))])
    editor.ffn.add(PatchBlock(name, [keys], [zt - 1], values))  # key . q = 1


def test_each_cause_is_told_apart_and_the_model_is_left_as_it_was(setup):
    editor, text, label, q, v, t = setup
    pairs = [(text, label)]

    def causes():
        after = [editor.is_correct(text, label)]
        assert after == [False], "the neurons built should break the input"
        return broken_causes(editor, lambda p: editor.is_correct(*p), pairs, [True], after)

    # one neuron firing (z = 1) and breaking it; one far below zero beside it
    _add(editor, "fires", q, [1.0, -4.0], [1.5 * t, 0.0001 * t], v)
    out = causes()
    assert out["counts"]["firing"] == 1 and out["items"][0]["top_edit"] == "fires" and out["items"][0]["firing"] == 1
    editor.remove("fires")

    # one neuron below zero (z = -0.75, where GELU is most negative): its negative lobe breaks it
    _add(editor, "lobe", q, [-0.75, -4.0], [1.5 * t, 0.0001 * t], v)
    values = editor.ffn.out.extra_weight.clone()
    out = causes()
    assert out["counts"]["below_zero_one"] == 1 and out["items"][0]["firing"] == 0
    assert out["items"][0]["within_3_of_zero"] == 1
    assert torch.equal(editor.ffn.out.extra_weight, values)  # the values are put back
    editor.remove("lobe")

    # six neurons below zero, each adding 0.3 of what breaks it: all six break it, and so do the
    # five left without the highest
    zs = [-0.75, -0.8, -0.7, -0.85, -0.65, -0.9]
    _add(editor, "many", q, zs, [0.3 * t] * len(zs), v)
    out = causes()
    assert out["counts"]["below_zero_many"] == 1 and out["items"][0]["within_3_of_zero"] == len(zs)
    assert sum(out["counts"].values()) == out["broken"] == 1
    editor.remove("many")
    assert editor.is_correct(text, label)
    # nothing broken: the same keys, all zero (what the README's table reads)
    assert broken_causes(editor, lambda p: editor.is_correct(*p), pairs, [True], [True]) == {
        "broken": 0, "counts": dict.fromkeys(CAUSES, 0), "top_edit_neighbour": 0, "items": []}


def test_with_a_clip_threshold_only_neurons_above_it_count_as_firing(setup):
    """Clipped at 1.5, a neuron at z = 1 passes nothing: the one at z = 2 breaks the input alone and
    is the only one counted as firing."""
    editor, text, label, q, v, t = setup
    editor.ffn.set_clip(True, 1.5)
    _add(editor, "weak", q, [1.0], [1.5 * t], v)
    assert editor.is_correct(text, label)  # below the threshold: nothing passes
    _add(editor, "strong", q, [2.0], [1.5 * t], v)
    after = [editor.is_correct(text, label)]
    out = broken_causes(editor, lambda p: editor.is_correct(*p), [(text, label)], [True], after)
    assert after == [False] and out["counts"]["firing"] == 1
    assert out["items"][0]["firing"] == 1 and out["items"][0]["top_edit"] == "strong"
