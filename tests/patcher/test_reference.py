"""Reference mode: ``PatcherConfig.reference(task)`` follows the Transformer-Patcher reference code
(github.com/ZeroYuHuang/Transformer-Patcher): its defaults, value init, pooled top-k losses, label
smoothing, plateau scheduler, validation cadence and early stopping, the batch of copies with fresh
dropout and no paraphrases, memory as examples with a separate validation split, and the way it
remembers an edit."""

from __future__ import annotations

import math

import pytest
import torch

from patcher import EditRequest, Editor, PatcherConfig
from patcher.encoding import encode
from patcher.steps import init_neurons
from patcher.objective import Objective
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MEMORY, VAL = tiny.SENTENCES[:20], tiny.SENTENCES[20:]


def reference_editor(kind: str, model=None, tok=None, **overrides) -> Editor:
    if model is None:
        model, tok = tiny.build(kind)
    task = "classification" if kind in C.CLS_KINDS else "generation"
    editor = Editor(model, tok, PatcherConfig.reference(task, **overrides))
    editor.build_memory(MEMORY, val_texts=VAL)
    return editor


# ---------------------------------------------------------------- the preset
def test_preset_is_the_reference_defaults():
    cls, gen = PatcherConfig.reference("classification"), PatcherConfig.reference("generation")
    for c in (cls, gen):
        # src/utils.py main_args: memory_size, max_edit_step, example_repeat
        assert (c.memory_size, c.max_steps, c.batch_size) == (40_000, 2000, 8)
        # src/utils.py patch_related_args: optim adam, lr, weight_decay, lr_scheduler_factor/patience;
        # src/models/class_modules.py configure_optimizers: ReduceLROnPlateau(threshold=0.05) on "val_loss"
        assert (c.lr, c.weight_decay) == (1e-2, 0.01)
        assert (c.lr_scheduler, c.lr_factor, c.lr_patience, c.lr_threshold) == ("plateau", 0.5, 1, 0.05)
        # scripts/T-patch.py: Trainer(gradient_clip_val=5.0, check_val_every_n_epoch=25); src/utils.py
        # start_val_epoch=100 (its validation after epoch e sees the parameters after e + 1 updates)
        assert (c.grad_clip, c.val_every, c.val_start) == (5.0, 25, 101)
        # src/models/class_modules.py joint_validation: early_stop_editing(thd=0.001, patience=early_patience=1)
        assert (c.stop_rule, c.early_patience, c.early_threshold) == ("val_loss", 1, 1e-3)
        # src/utils.py: amplify_v=1, amplify_con=10, activate_loss top5_exp, act_margin_val 0, alc 1,
        # memory_loss top1000_exp+top1000_exp, max_add_neuron_num 5; src/models/patch.py: ModifyLinearInput
        assert (c.value_init, c.amplifier, c.act_topk, c.act_margin, c.act_loss_weight) == ("reference", 10.0, 5, 0.0, 1.0)
        assert (c.loss_topk, c.memory_topk, c.max_neurons_per_edit) == ("pooled", 1000, 5)
        # BertBinary / BartSeq2Seq hparams eps=0.1; src/utils.py label_smoothed_nll_loss
        assert (c.entropy_weight, c.label_smoothing, c.label_smoothing_form) == (0.1, 0.1, "reference")
        # scripts/T-patch.py: a full forward per step on the edit repeated, no rephrases in the batch;
        # the neuron is kept whether or not it fixed the edit, and the edit is memorised (update_memory=1)
        assert (c.cached, c.train_on_equivalents, c.keep_unfixed) == (False, False, True)
        # src/dataset/sme_dataset.py: memory_size examples, a separate val split; construct_memory(update=True)
        assert (c.memory_unit, c.edit_memory) == ("examples", "reference")
    # scripts/main.py: mlc = 5 for fever, 10 for zsre
    assert (cls.memory_loss_weight, gen.memory_loss_weight) == (5.0, 10.0)
    # src/utils.py margin_val1=3, margin_val2=-3, passed by the classifier's Editor.get_editors; the
    # seq2seq Editor.get_editors passes no margins, so ModifyLinearOutput's defaults (0, 0) apply
    assert (cls.memory_margin, gen.memory_margin) == (3.0, 0.0)
    assert PatcherConfig.reference("classification", max_steps=7).max_steps == 7
    with pytest.raises(ValueError):
        PatcherConfig.reference("translation")


def test_our_defaults_are_unchanged():
    c = PatcherConfig()
    assert (c.value_init, c.loss_topk, c.label_smoothing_form, c.lr_scheduler, c.val_every, c.val_start) == (
        "ours", "per_neuron", "ours", None, None, 0)
    assert (c.stop_rule, c.memory_unit, c.edit_memory, c.keep_unfixed, c.cached, c.memory_margin) == (
        "leak", "queries", "ours", False, True, None)


# ---------------------------------------------------------------- the losses, against the reference's code
def _ref_topk(loss: torch.Tensor, tk: int) -> torch.Tensor:  # src/models/patch.py top_k_loss_func('exp')
    loss = torch.exp(loss.contiguous().view(-1))
    return torch.topk(loss, k=tk if tk < loss.size(0) else loss.size(0))[0].mean()


def test_pooled_losses_are_the_reference_formulas():
    """calculate_act_loss / calculate_memory_loss of src/models/patch.py, transcribed, give our pooled terms."""
    torch.manual_seed(0)
    act = torch.nn.GELU()
    for margin, n in ((3.0, 1), (0.0, 3)):
        c = PatcherConfig.reference("generation", memory_margin=margin, memory_topk=50)
        objective = Objective(c, "generation", act, False, torch.device("cpu"))
        his = torch.randn(200, n)  # memory pre-activations (M, n)
        z_rows = torch.randn(8, n) + 2  # the batch's pre-activations on the mistake (B, n)
        his_b = torch.stack([his for _ in range(8)], 0).transpose(0, 1)  # (M, B, n) as the reference stacks it
        l1 = (his_b - z_rows + margin).unsqueeze(1)
        l2 = (his_b - (-margin)).squeeze()
        assert torch.allclose(objective.memory_term(his, z_rows), _ref_topk(l1, 50) + _ref_topk(l2, 50))
        assert torch.allclose(objective.act_loss(z_rows), _ref_topk((0.0 - z_rows).squeeze(), 5))
        # per neuron (ours) is a different number whenever the rows differ
        ours = Objective(PatcherConfig(memory_topk=50, memory_margin=margin), "generation", act, False, torch.device("cpu"))
        assert not torch.allclose(ours.memory_term(his, z_rows), objective.memory_term(his, z_rows))


def test_reference_label_smoothing():
    """src/utils.py label_smoothed_nll_loss, divided by the number of target tokens."""
    torch.manual_seed(0)
    logits, labels = torch.randn(5, 11), torch.randint(0, 11, (5,))
    eps = 0.1
    lprobs = logits.log_softmax(-1)
    nll = -lprobs.gather(-1, labels[:, None]).sum()
    smooth = -lprobs.sum()
    eps_i = eps / (11 - 1)
    expected = ((1.0 - eps - eps_i) * nll + eps_i * smooth) / 5
    objective = Objective(PatcherConfig.reference("generation"), "generation", torch.nn.GELU(), False, torch.device("cpu"))
    assert torch.allclose(objective.edit_loss(logits, labels), expected)
    ours = Objective(PatcherConfig(), "generation", torch.nn.GELU(), False, torch.device("cpu"))
    assert not torch.allclose(ours.edit_loss(logits, labels), expected)


def test_reference_value_init():
    """src/models/patch.py ModifyLinearInput(amplify=True): randn values times an amplifier per element, both trained."""
    q = torch.randn(2, 32)
    ref = init_neurons(q, 48, 10.0, False, seed=0, value_init="reference")
    ours = init_neurons(q, 48, 10.0, False, seed=0)
    assert ref["amp"].shape == (2, 48) and torch.all(ref["amp"] == 10.0) and ref["amp"].requires_grad
    assert ours["amp"].shape == (2, 1)
    assert torch.allclose(ref["value"], ours["value"] * math.sqrt(48))  # same draw, scale 1 rather than 1/sqrt(d)
    assert torch.allclose((ref["key"] * q).sum(-1), torch.ones(2))  # pre-activation 1 on the mistake


# ---------------------------------------------------------------- memory
def test_memory_as_examples_with_a_separate_validation_split():
    model, tok = tiny.build("bart")
    editor = Editor(model, tok, PatcherConfig.reference("generation", memory_size=5))
    editor.build_memory(MEMORY, val_texts=VAL)
    positions = lambda texts: sum(len(encode(model, tok, editor.family, t).positions) - 1 for t in texts)  # noqa: E731
    assert editor.val_memory.shape[0] == positions(VAL)  # all of the split; the decoder's first position is not read
    lengths = {len(encode(model, tok, editor.family, t).positions) - 1 for t in MEMORY}
    assert editor.memory.shape[0] <= 5 * max(lengths)  # 5 examples, not 5 queries
    assert editor.memory.shape[0] >= 5 * min(lengths)
    ours = Editor(model, tok, C.config(memory_size=5))
    ours.build_memory(MEMORY)
    assert ours.memory.shape[0] + ours.val_memory.shape[0] == 5


# ---------------------------------------------------------------- editing
@pytest.mark.parametrize("kind", ["bert", "bart"])
def test_reference_mode_fixes_edits_and_remembers_them_as_the_reference(kind):
    editor = reference_editor(kind)
    for i in range(2):
        request = C.wrong_request(editor, i)
        n_mem, n_val = editor.memory.shape[0], editor.val_memory.shape[0]
        result = editor.edit(request)
        assert result.fixed and result.neurons >= 1, result
        assert editor.is_correct(request.input, request.target)
        # every stop is at a validation (every 25 steps), from step 125 on (start_val_epoch=100)
        assert (result.steps - 1) % 25 == 0 and result.steps - 1 >= 125 and result.steps - 1 in result.validations
        assert result.validations == list(range(25, result.steps, 25))
        # the batch's eval-mode queries (8 copies) join both memories; for generators the flattened
        # batch loses its first and last row (construct_memory(update=True) in the reference)
        n_pos = len(editor._variants(request)[0].positions)
        added = 8 * n_pos - (2 if editor.task == "generation" else 0)
        assert editor.memory.shape[0] - n_mem == added and editor.val_memory.shape[0] - n_val == added
    for request in [C.wrong_request(reference_editor(kind), i) for i in range(2)]:
        assert editor.is_correct(request.input, request.target)
    # replay adds exactly what the edits added
    fresh = reference_editor(kind)
    fresh.remember([C.wrong_request(fresh, i) for i in range(2)])
    assert torch.equal(fresh.memory, editor.memory) and torch.equal(fresh.val_memory, editor.val_memory)


def test_stops_by_the_validation_rule():
    """Once fixed, the edit stops at the first counted validation that does not improve the
    validation-memory loss by more than early_threshold (a huge threshold: the second one)."""
    base = reference_editor("bert")
    request = C.wrong_request(base)
    result = base.edit(request)
    assert result.fixed
    first = 125  # first counted validation (val_start=101, every 25)
    never_better = reference_editor("bert", early_threshold=1e6).edit(request)
    assert never_better.steps - 1 == first + 25, "stops at the second fixed counted validation"
    patient = reference_editor("bert", early_threshold=1e6, early_patience=3).edit(request)
    assert patient.steps - 1 == first + 3 * 25
    later = reference_editor("bert", early_threshold=1e6, val_every=10, val_start=200).edit(request)
    assert later.steps - 1 == 210 and later.validations == list(range(10, 211, 10))
    # the leak rule and our patience play no part
    assert reference_editor("bert", leak_tol=1e9, patience=1, fixed_patience=1).edit(request).steps == result.steps


def test_plateau_scheduler_lowers_the_lr():
    """ReduceLROnPlateau on the validation edit loss: when it stops falling by 5%, the lr halves,
    which changes the patch; without the scheduler nothing is lowered."""
    request = C.wrong_request(reference_editor("bert"))
    kw = dict(max_steps=400, val_start=10**6)  # no early stop: watch the scheduler alone
    with_plateau = reference_editor("bert", **kw)
    result = with_plateau.edit(request)
    assert result.lr_drops, "the validation edit loss plateaus on a fixed edit"
    assert set(result.lr_drops) <= set(result.validations) and len(result.lr_drops) >= 2
    without = reference_editor("bert", lr_scheduler=None, **kw)
    plain = without.edit(request)
    assert plain.lr_drops == [] and plain.validations == result.validations  # same cadence, nothing lowered
    assert not torch.equal(with_plateau.ffn.blocks[0].out_weight, without.ffn.blocks[0].out_weight)


def test_batch_of_copies_with_fresh_dropout_and_no_paraphrases():
    """Every training forward is the mistake alone, batch_size times, with new dropout masks on
    every copy and at every step; the paraphrases are never trained on."""
    model, tok = tiny.build("bert")
    model.bert.encoder.layer[0].output.dropout.p = 0.1
    editor = reference_editor("bert", model, tok, max_steps=6, val_every=3)
    request = C.wrong_request(editor)
    request = EditRequest(request.id, request.input, request.target, equivalents=["a river in the north", "the old cat"])
    main_ids = encode(model, tok, editor.family, request.input, request.target).inputs["input_ids"]
    seen = []

    def hook(module, args, kwargs):
        seen.append((module.training, kwargs["input_ids"].clone()))

    q_seen = []
    handles = [model.register_forward_pre_hook(hook, with_kwargs=True),
               editor.ffn.ins[0].register_forward_pre_hook(lambda m, a: q_seen.append((m.training, a[0][:, 0].detach().clone())))]
    try:
        editor.edit(request)
    finally:
        for h in handles:
            h.remove()
    train_ids = [ids for training, ids in seen if training]
    assert len(train_ids) == 6  # one full forward per step
    for ids in train_ids:
        assert ids.shape[0] == 8 and all(row.tolist() == main_ids for row in ids)  # no paraphrase rows
    train_q = [q for training, q in q_seen if training]
    for q in train_q:
        assert len({tuple(r.tolist()) for r in q}) == 8  # a different mask on every copy
    assert all(not torch.equal(a, b) for a, b in zip(train_q, train_q[1:]))  # and at every step
    eval_q = [q for training, q in q_seen if not training]
    assert eval_q and all(torch.equal(q[0], eval_q[0][0]) for q in eval_q)  # validations see no dropout


def test_unfixed_edit_keeps_its_neurons_as_the_reference():
    """scripts/T-patch.py keeps the patch (editor.step()) and memorises the edit even when it failed."""
    editor = reference_editor("bert", max_steps=1)
    request = C.wrong_request(editor)
    n_mem = editor.memory.shape[0]
    result = editor.edit(request)
    assert not result.fixed and result.neurons == 1 and editor.edit_ids == [request.id]
    assert editor.memory.shape[0] == n_mem + 8
    ours = reference_editor("bert", max_steps=1, keep_unfixed=False)
    result = ours.edit(request)
    assert not result.fixed and result.neurons == 0 and ours.edit_ids == []


def test_reference_rules_also_run_on_the_cached_step():
    """Each difference is a field of its own: the reference's rules with our cached step."""
    editor = reference_editor("bert", cached=True)
    request = C.wrong_request(editor)
    result = editor.edit(request)
    assert result.fixed and editor.is_correct(request.input, request.target)
    assert (result.steps - 1) % 25 == 0 and result.validations == list(range(25, result.steps, 25))


@pytest.mark.parametrize("kind", ["bert", "bart"])
def test_reference_mode_makes_no_stray_tensor(kind):
    """Every tensor reference mode makes is on the model's device (the meta trick of test_device):
    memory as examples, validations, the scheduler, the val_loss rule, the edit memory, replay."""
    from tests.patcher.test_device import _DefaultDevice

    model, tok = tiny.build(kind)
    task = "classification" if kind in C.CLS_KINDS else "generation"
    editor = Editor(model, tok, PatcherConfig.reference(task, max_steps=60, val_every=10, val_start=20))
    request = C.wrong_request(editor)
    with _DefaultDevice("meta"):
        editor.build_memory(MEMORY, val_texts=VAL)
        result = editor.edit(request)
        assert editor.remember([request]) == 1
    assert result.validations == list(range(10, result.steps, 10))
    for tensor in (editor.memory, editor.val_memory):
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
