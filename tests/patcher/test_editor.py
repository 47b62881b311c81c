"""Editing on tiny models of every family: fixes, silence on memory, the cached tail, failure
paths, cached vs reference-faithful training, determinism, and use with generate()/pipeline()."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from patcher import EditRequest, Editor, PatchedFFN, PatcherConfig, PatchSet
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _block_z(block, queries: torch.Tensor) -> torch.Tensor:
    """Pre-activations k.q + b of a block's neurons (gate rows for gated FFNs): (N, n)."""
    return queries @ block.in_weight[0].T + block.in_bias[0]


# ---------------------------------------------------------------------------- fixing mistakes
@pytest.mark.parametrize("kind", C.KINDS)
def test_edit_flips_wrong_prediction(kind):
    s = C.stream(kind)
    cfg = s.editor.config
    for request, result in zip(s.requests, s.results):
        assert result.fixed and not result.already_correct
        assert result.id == request.id and 1 <= result.steps <= cfg.max_steps and result.seconds > 0
        if s.editor.task == "classification":
            assert result.neurons == 1
        else:
            assert 1 <= result.neurons <= cfg.max_neurons_per_edit
        assert set(result.losses) == {"edit", "activation", "memory", "total"}
    assert s.editor.edit_ids == ["e1", "e2", "e3"]
    assert s.editor.ffn.neurons == sum(r.neurons for r in s.results)
    # each edit is right right after it: rebuild "the model after edit t" from the first t blocks.
    # (Not asserted: that earlier edits survive later ones. GELU is not 0 below 0, so a later
    # neuron that stays silent on an earlier mistake can still nudge it; on gpt2 e3 undoes e2.)
    assert s.editor.is_correct(s.requests[-1].input, s.requests[-1].target)
    patch_set = s.editor.patch_set()
    for t, request in enumerate(s.requests):
        model, tok = tiny.build(kind)
        PatchSet(patch_set.manifest, patch_set.blocks[: t + 1]).apply(model)
        assert Editor(model, tok, C.config()).is_correct(request.input, request.target)


@pytest.mark.parametrize("kind", C.KINDS)
def test_new_neurons_silent_on_training_memory(kind):
    """The memory loss pushes every memory pre-activation below -margin (and below the edit).

    What `training.train` guarantees: nothing hard unless it stopped on the leak criterion (then no memory
    *or* validation query gets more than ``leak_tol`` of the patch's output on the mistake, see the
    next test); a stop on patience or max_steps only means the edit was fixed. On these tiny models the training-memory
    pre-activations end below 0 for every edit; the held-out validation memory is not trained
    against and is not asserted here (for t5-gated it can end slightly above 0).
    """
    s = C.stream(kind)
    for i, (request, mem) in enumerate(zip(s.requests, s.memory_before)):
        block = s.editor.ffn.blocks[i]
        assert block.edit_id == request.id
        assert mem.shape[0] > 0
        assert _block_z(block, mem).max() < 0, f"{kind} edit {request.id}"
    # Not asserted: that each neuron fires (z > act_margin) on its own mistake. A patience stop
    # accepts any fixed edit, and with GELU an edit can be fixed through the negative lobe
    # (z slightly below 0) -- seen on bert/roberta/distilbert/bart.
    # the memory grows by the edits' queries, so a later edit stays silent on an earlier mistake
    assert s.memory_before[1].shape[0] > s.memory_before[0].shape[0]
    assert _block_z(s.editor.ffn.blocks[2], s.memory_before[2]).max() < 0


@pytest.mark.parametrize("kind", ["distilbert", "llama", "bart"])
def test_leak_stop_bounds_what_memory_queries_receive(kind):
    """With patience out of reach, the only early stop is the leak criterion: then no memory or
    validation query can receive more than leak_tol of what the patch gives its mistake -- checked
    here from the kept block, independently of the editor's own bookkeeping."""
    # the answer alone (no stop position): the neurons here are those of the answer's tokens
    editor = C.editor_for(kind, patience=10**6, fixed_patience=10**6, max_steps=1000, train_stop=False)
    mem, val = editor.memory.clone(), editor.val_memory.clone()
    request = C.wrong_request(editor)
    enc = editor._encode(request.input, request.target)
    cap = editor.capture([enc])
    wrong = (cap.logits.argmax(-1) != torch.tensor(enc.labels)).nonzero().flatten()
    q_edit = cap.q[wrong[: editor.config.max_neurons_per_edit]] if editor.task == "generation" else cap.q[:1]
    result = editor.edit(request)
    assert result.fixed and result.steps < 1000, "expected the leak criterion to stop training"
    block = editor.ffn.blocks[-1]
    act = editor.ffn.act

    grid = torch.linspace(-30, 30, 6001)
    envelope = act(grid).abs().cummax(0).values  # max |act| over everything at or below grid[j]

    def gain(queries):  # the most neuron i can pass to each query, up to its value vector: (N, n)
        env = envelope[torch.searchsorted(grid, _block_z(block, queries).contiguous()).clamp(max=6000)]
        if editor.family.gated:
            env = env * (queries @ block.in_weight[1].T + block.in_bias[1]).abs()
        return env

    n = block.neurons
    z_e = _block_z(block, q_edit)[torch.arange(n), torch.arange(n)]  # neuron i at its own position
    own = act(z_e).abs()
    if editor.family.gated:
        own = own * ((q_edit * block.in_weight[1]).sum(-1) + block.in_bias[1]).abs()
    worst = torch.cat([gain(mem), gain(val)]).max(0).values / own
    assert (worst < editor.config.leak_tol * 1.001).all(), worst


@pytest.mark.parametrize("kind", C.KINDS)
def test_cached_tail_equals_real_logits(kind):
    """FFN output + residual -> norms -> head on cached vectors gives the model's own logits."""
    for editor in (C.editor_for(kind, memory=False), C.stream(kind).editor):  # unpatched, patched
        items = C.probe_items(editor.model, editor.tokenizer)
        cap = editor.capture(items)
        with torch.no_grad():
            tail = editor._logits_from(cap.y, cap.resid)
        assert tail.shape == cap.logits.shape
        torch.testing.assert_close(tail, cap.logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- nothing to do / cannot do
@pytest.mark.parametrize("kind", C.KINDS)
def test_already_correct_adds_nothing(kind):
    s = C.stream(kind)
    model = s.copy_model()
    editor = Editor(model, s.tokenizer, C.config())
    assert editor.edit_ids == ["e1", "e2", "e3"]
    request = s.requests[-1]  # right in the final model (earlier edits need not be, see above)
    result = editor.edit(EditRequest("again", request.input, request.target))
    assert result.already_correct and result.fixed and result.neurons == 0 and result.steps == 0
    assert "already correct" in result.message
    assert editor.edit_ids == ["e1", "e2", "e3"]
    assert torch.equal(C.logits(model, s.tokenizer), s.logits[-1])


def test_already_correct_on_the_base_model():
    editor = C.editor_for("bert")
    text = C.CLS_TEXTS[0]
    result = editor.edit(EditRequest("same", text, editor.predict([text])[0]))
    assert result.already_correct and result.neurons == 0
    assert editor.edit_ids == [] and editor.ffn.neurons == 0


@pytest.mark.parametrize("kind", C.KINDS)
def test_failing_edit_leaves_no_neuron(kind):
    # one step from a zero amplifier cannot move the output: the edit must fail, and so must
    # the second try (retry_neurons, 2 by default), one step again
    editor = C.editor_for(kind, max_steps=1, amplifier=0.0)
    before = C.logits(editor.model, editor.tokenizer)
    memory = editor.memory.clone()
    result = editor.edit(C.wrong_request(editor))
    assert not result.fixed and not result.already_correct
    assert result.neurons == 0 and result.steps == 2
    assert "no neuron kept" in result.message
    assert editor.edit_ids == [] and editor.ffn.neurons == 0
    assert all(m.extra_weight.shape[0] == 0 for m in editor.ffn.ins + [editor.ffn.out])
    assert torch.equal(editor.memory, memory)
    assert torch.equal(C.logits(editor.model, editor.tokenizer), before)


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_unfixed_edit_is_trained_again_with_more_neurons(kind, monkeypatch):
    """``retry_neurons``: an edit the first training leaves unfixed is trained again from fresh
    neurons, that many per wrong position; the steps of both tries count; a second failure still
    leaves nothing behind, and ``keep_unfixed`` keeps the second try's neurons."""
    failing = dict(max_steps=1, amplifier=0.0, retry_neurons=2)
    editor = C.editor_for(kind, **failing)
    before, memory = C.logits(editor.model, editor.tokenizer), editor.memory.clone()
    result = editor.edit(C.wrong_request(editor))
    assert not result.fixed and result.steps == 2 and result.neurons == 0 and "after 2 steps" in result.message
    assert editor.ffn.neurons == 0 and torch.equal(editor.memory, memory)
    assert torch.equal(C.logits(editor.model, editor.tokenizer), before)

    first = C.stream(kind).results[0].neurons  # neurons of one try: one per wrong position
    kept = C.editor_for(kind, **failing, keep_unfixed=True)
    assert kept.edit(C.wrong_request(kept)).neurons == 2 * first

    # the first try's check fails (an injected fault): the second try's neurons are kept and serve the edit
    editor = C.editor_for(kind, retry_neurons=3)
    request, real, calls = C.wrong_request(editor), Editor.is_correct, []

    def first_check_fails(self, *args):
        calls.append(args)
        return len(calls) > 1 and real(self, *args)

    monkeypatch.setattr(Editor, "is_correct", first_check_fails)
    result = editor.edit(request)
    monkeypatch.undo()
    assert len(calls) == 2 and result.fixed and result.neurons == 3 * first and editor.edit_ids == [request.id]
    assert result.steps > C.stream(kind).results[0].steps
    assert editor.is_correct(request.input, request.target)


def test_failed_edit_can_be_retried_with_the_same_id():
    editor = C.editor_for("distilbert", max_steps=1, amplifier=0.0)
    request = C.wrong_request(editor)
    assert not editor.edit(request).fixed
    editor.config = C.config()
    result = editor.edit(request)
    assert result.fixed and editor.edit_ids == [request.id]


# ---------------------------------------------------------------------------- modes and determinism
@pytest.mark.parametrize("kind", ["distilbert", "gpt2"])
def test_cached_and_reference_faithful_both_fix(kind):
    for cached in (True, False):
        editor = C.editor_for(kind, cached=cached, max_steps=150)
        request = C.wrong_request(editor)
        result = editor.edit(request)
        assert result.fixed, f"cached={cached}: {result.message}"
        assert result.neurons >= 1 and editor.is_correct(request.input, request.target)
        assert editor.ffn.out.live_weight is None  # reference mode takes its live neurons out again


@pytest.mark.parametrize("kind", ["distilbert", "llama", "t5-gated"])
def test_same_seed_same_edits_identical_patches(kind, tmp_path):
    s = C.stream(kind)
    editor = C.editor_for(kind)
    for request in s.requests:
        assert editor.edit(request).fixed
    assert editor.edit_ids == s.editor.edit_ids
    for a, b in zip(editor.ffn.blocks, s.editor.ffn.blocks):
        assert all(torch.equal(x, y) for x, y in zip(a.in_weight, b.in_weight))
        assert all(torch.equal(x, y) for x, y in zip(a.in_bias, b.in_bias))
        assert torch.equal(a.out_weight, b.out_weight)
    editor.patch_set().save(tmp_path / "a")
    s.editor.patch_set().save(tmp_path / "b")
    assert (tmp_path / "a/patches.safetensors").read_bytes() == (tmp_path / "b/patches.safetensors").read_bytes()


def test_different_seed_different_patch():
    a, b = C.editor_for("distilbert"), C.editor_for("distilbert", seed=0, **{})
    b.config = C.config(seed=1)
    request = C.wrong_request(a)
    assert a.edit(request).fixed and b.edit(request).fixed
    assert not torch.equal(a.ffn.blocks[0].out_weight, b.ffn.blocks[0].out_weight)


# ---------------------------------------------------------------------------- serving the patched model
@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_patched_model_generates_the_target(kind):
    """generate() runs on the patched and on the folded model, and greedy decoding gives the target
    exactly when the teacher-forced check (Editor.is_correct) says the edit is right."""
    s = C.stream(kind)
    # tiny T5 has 1 encoder and 2 decoder layers; transformers' KV cache is sized from num_layers
    # and fails with IndexError for such a model even unpatched, so decode T5 without a cache.
    extra = {"use_cache": False} if kind == "t5" else {}
    correct = [s.editor.is_correct(r.input, r.target) for r in s.requests]
    assert correct[-1]
    for model in (s.model, s.editor.folded()):
        for request, ok in zip(s.requests, correct):
            prompt = s.tokenizer(request.input, return_tensors="pt")
            if kind == "t5":
                target = s.tokenizer(text_target=request.target)["input_ids"]
            else:
                target = s.tokenizer(request.target, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                out = model.generate(**prompt, max_new_tokens=len(target), do_sample=False, pad_token_id=0, **extra)
            new = out[0, 1:] if kind == "t5" else out[0, prompt["input_ids"].shape[1]:]
            assert (new.tolist()[: len(target)] == target) == ok, (request, new.tolist(), target)


def _runs_on_case(model, tok) -> tuple[str, str]:
    """(prompt, target): the first word greedy decoding gives is the target, and it goes on
    with another ordinary token (teacher forcing says right, served generation says wrong)."""
    from patcher import resolve_family
    from patcher.encoding import stop_ids

    for prompt in C.PROMPTS:
        new = C.greedy_ids(model, tok, prompt, 2)
        if len(new) == 2 and min(new) >= 4 and new[1] not in stop_ids(model, tok, resolve_family(model)):
            return prompt, " " + tok.decode([new[0]])
    raise AssertionError("no prompt where the tiny model runs on past its first word")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_answer_is_trained_to_stop(kind):
    """The base model gives the answer but runs on. With ``train_stop`` (the default) the edit is
    not "already correct": one neuron, at the position after the answer, teaches it to stop, and
    the served answer is then the target. Without it the teacher-forced judge calls it right."""
    from patcher import served_correct, target_correct

    editor = C.editor_for(kind)
    model, tok = editor.model, editor.tokenizer
    prompt, target = _runs_on_case(model, tok)
    assert target_correct(model, tok, [prompt], [target]) == [True]
    assert served_correct(model, tok, [prompt], [target]) == [False]
    plain = Editor(C.editor_for(kind, memory=False).model, tok, C.config(train_stop=False))
    assert plain.edit(EditRequest("s0", prompt, target)).already_correct

    result = editor.edit(EditRequest("s1", prompt, target))
    assert result.fixed and not result.already_correct and result.neurons == 1, result
    assert served_correct(model, tok, [prompt], [target]) == [True]
    assert served_correct(editor.folded(), tok, [prompt], [target]) == [True]


def test_editor_predict_decodes_the_edit():
    s = C.stream("gpt2")
    assert s.editor.predict([s.requests[-1].input])[0].startswith("rome")


def test_patched_bert_in_a_text_classification_pipeline():
    from transformers import pipeline

    s = C.stream("bert")
    for model in (s.copy_model(), s.editor.folded()):
        clf = pipeline("text-classification", model=model, tokenizer=s.tokenizer, device=-1)
        got = [r["label"] for r in clf([r.input for r in s.requests])]
        assert got == [r.target for r in s.requests]


# ---------------------------------------------------------------------------- config
def test_config_defaults_are_the_reference():
    c = PatcherConfig()
    assert (c.memory_size, c.max_steps, c.lr, c.weight_decay, c.grad_clip, c.batch_size) == (40_000, 2000, 1e-2, 0.01, 5.0, 8)
    assert (c.amplifier, c.act_margin, c.act_topk, c.memory_margin, c.memory_topk) == (10.0, 0.0, 5, None, 1000)
    assert c.memory_weight("classification") == 5.0 and c.memory_weight("generation") == 10.0
    assert PatcherConfig(memory_loss_weight=2.0).memory_weight("generation") == 2.0
    assert c.max_neurons_per_edit == 5 and c.cached is True
    with pytest.raises(ValidationError):
        PatcherConfig(memory_sise=10)
    with pytest.raises(ValidationError):
        PatcherConfig(max_steps=0)
    with pytest.raises(ValidationError, match="applies to clipped neurons"):
        PatcherConfig(clip_threshold=1.0, act_margin=3.0)
    with pytest.raises(ValidationError, match="above act_margin=0"):  # the mistake itself could pass nothing
        PatcherConfig(clip_negative=True, clip_threshold=1.0)
    assert PatcherConfig(clip_negative=True, clip_threshold=2.0, act_margin=3.0).clip_threshold == 2.0


def test_editor_reuses_the_models_patched_ffn():
    s = C.stream("gpt2")
    model = s.copy_model()
    ffn = PatchedFFN.find(model)
    assert ffn is not None and ffn is not s.editor.ffn
    assert Editor(model, s.tokenizer, C.config()).ffn is ffn
    fresh, tok = tiny.build("gpt2")
    assert PatchedFFN.find(fresh) is None
