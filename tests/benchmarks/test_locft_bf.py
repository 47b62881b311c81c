"""LocFT-BF (breadth-first fine-tuning over every edit so far) on tiny models: it fixes every edit
so far, it trains on every accumulated edit at each new edit (seen in the model's own forward
passes), and it trains only the FFNs of the last ``layers`` layers."""

from __future__ import annotations

import pytest
import torch

from benchmarks.baselines import FineTuner, FTConfig, trainable_parameters
from patcher import EditRequest, served_correct, target_correct
from tests import tiny

torch.set_num_threads(1)

BF = dict(breadth_first=True, layers=2, lr=1e-2, max_steps=200, batch_size=2, kl_weight=1.0, kl_pool=8, kl_batch=4)


def wrong_labels(model, tok, texts: list[str]) -> list[int]:
    with torch.no_grad():
        return [1 - int(model(**tok(t, return_tensors="pt")).logits.argmax()) for t in texts]


class TrainingInputs:
    """The token rows of every forward pass run with gradients (training, not checking)."""

    def __init__(self, model):
        self.rows: list[tuple[int, ...]] = []
        self.handle = model.register_forward_pre_hook(self.take, with_kwargs=True)

    def take(self, module, args, kwargs):
        if torch.is_grad_enabled():
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            self.rows += [tuple(r[m.bool()].tolist()) for r, m in zip(ids, mask)]


def test_fixes_every_edit_so_far_and_trains_on_all_of_them_each_time():
    model, tok = tiny.build("bert", num_labels=2)
    texts, labels = tiny.SENTENCES[:5], []
    tuner = FineTuner(model, tok, FTConfig(**BF), kl_texts=tiny.SENTENCES[10:])
    seen = TrainingInputs(model)
    for i, text in enumerate(texts):
        labels.append(wrong_labels(model, tok, [text])[0])  # wrong for the current model, as the harness edits
        seen.rows.clear()
        result = tuner.edit(EditRequest(f"e{i}", text, labels[-1]))
        assert result.fixed and result.steps >= 1
        so_far = list(zip(texts[: i + 1], labels[: i + 1]))
        # every edit so far is right (patcher's judge, not the tuner's own check)
        assert all(target_correct(model, tok, [t for t, _ in so_far], [y for _, y in so_far]))
        # every accumulated edit went through a training forward pass during this edit
        trained_rows = set(seen.rows)
        for text_j, _ in so_far:
            assert tuple(tok(text_j)["input_ids"]) in trained_rows, (i, text_j)
        assert sorted(tuner.trained_ids[-1]) == [f"e{j}" for j in range(i + 1)]
        assert result.losses["edits_right"] == 1.0
    assert len(tuner.edits) == len(texts) and len(tuner.trained_ids) == len(texts)
    seen.handle.remove()


def test_depth_first_ft_trains_on_the_new_edit_alone():
    """The contrast: plain FT (breadth_first off) never revisits earlier edits."""
    model, tok = tiny.build("bert", num_labels=2)
    texts = tiny.SENTENCES[:3]
    tuner = FineTuner(model, tok, FTConfig(lr=1e-2, max_steps=50))
    seen = TrainingInputs(model)
    for i, text in enumerate(texts):
        seen.rows.clear()
        tuner.edit(EditRequest(f"e{i}", text, wrong_labels(model, tok, [text])[0]))
        assert set(seen.rows) == {tuple(tok(text)["input_ids"])}
        assert tuner.trained_ids[-1] == [f"e{i}"]
    assert tuner.edits == []


def test_generation_edits_are_fixed_token_by_token_and_stop():
    """A decoder-only answer is trained followed by a stop (as the patcher does), so every edit so
    far is right as served: greedy generation gives the answer and ends there."""
    model, tok = tiny.build("llama")
    prompts, target = tiny.SENTENCES[:3], " red car"
    tuner = FineTuner(model, tok, FTConfig(**{**BF, "max_steps": 300}), kl_texts=tiny.SENTENCES[10:])
    for i, prompt in enumerate(prompts):
        result = tuner.edit(EditRequest(f"g{i}", prompt, target))
        assert result.fixed
        assert all(target_correct(model, tok, prompts[: i + 1], [target] * (i + 1)))
        assert all(served_correct(model, tok, prompts[: i + 1], [target] * (i + 1)))


def test_an_edit_already_right_joins_the_set_and_costs_nothing():
    model, tok = tiny.build("bert", num_labels=2)
    text = tiny.SENTENCES[0]
    right = 1 - wrong_labels(model, tok, [text])[0]
    tuner = FineTuner(model, tok, FTConfig(**BF), kl_texts=tiny.SENTENCES[10:])
    result = tuner.edit(EditRequest("r", text, right))
    assert result.already_correct and result.steps == 0 and tuner.trained_ids == [[]]
    assert [e.id for e in tuner.edits] == ["r"]


def test_last_layers_ffn_only():
    model, tok = tiny.build("bert", num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    text = tiny.SENTENCES[0]
    FineTuner(model, tok, FTConfig(**BF), kl_texts=tiny.SENTENCES[10:]).edit(
        EditRequest("x", text, wrong_labels(model, tok, [text])[0]))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    ffn = (".intermediate.dense.", ".output.dense.")
    assert {k.split(".encoder.layer.")[1][0] for k in changed} == {"0", "1"}
    assert all(any(f in k for f in ffn) and ".attention." not in k for k in changed)
    assert len(trainable_parameters(model, "ffn", layers=2)) == 8
    with pytest.raises(ValueError, match="layers must be between 1 and 2"):
        trainable_parameters(model, "ffn", layers=3)
