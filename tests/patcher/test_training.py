"""The training loop: stopping rules looked at every k steps without changing the patch, host
syncs per window rather than per step, and a resumed night that replays an uninterrupted one."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from patcher import EditRequest, Editor, PatchSet
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _same_blocks(a: Editor, b: Editor) -> None:
    assert a.edit_ids == b.edit_ids
    for x, y in zip(a.ffn.blocks, b.ffn.blocks):
        assert all(torch.equal(u, v) for u, v in zip(x.in_weight, y.in_weight))
        assert all(torch.equal(u, v) for u, v in zip(x.in_bias, y.in_bias))
        assert torch.equal(x.out_weight, y.out_weight)


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_patch_does_not_depend_on_check_every(kind):
    """The host looks at the stopping rules every k steps; the parameters of the steps in between
    are kept, so training stops at the same step with the same patch for every k."""
    s = C.stream(kind)
    for k in (3, 7) if kind == "distilbert" else (7,):  # two windows on the cheap model, one on the generator
        editor = C.editor_for(kind, check_every=k)
        results = [editor.edit(r) for r in s.requests]
        assert [r.steps for r in results] == [r.steps for r in s.results]
        assert [r.losses for r in results] == [r.losses for r in s.results]
        _same_blocks(editor, s.editor)


class _HostSyncs(TorchFunctionMode):
    """Counts the tensor-to-Python conversions (each one waits for the device) made by patcher code."""

    NAMES = {"item", "tolist", "__bool__", "__float__", "__int__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES and "/patcher/" in sys._getframe(1).f_code.co_filename:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["bert", "t5-gated"])
def test_step_loop_syncs_once_per_window(kind):
    """40 steps, looked at every 10: a handful of host syncs for the whole edit, not several per step."""
    editor = C.editor_for(kind, max_steps=40, check_every=10, leak_tol=0.0, patience=10**6, fixed_patience=10**6,
                          retry_neurons=1)
    request = C.wrong_request(editor)
    with _HostSyncs() as syncs:
        result = editor.edit(request)
    assert result.steps == 40
    # 4 windows, the final losses, and outside the loop: the wrong positions and the real-model check
    assert syncs.count <= 40 // 10 + 4, syncs.count


@pytest.mark.parametrize("kind", ["distilbert", "gpt2"])
def test_resumed_night_is_a_replay(kind, tmp_path):
    """Edits A, B, C in one editor == A, then a fresh editor on the same base that applies A's saved
    patches and remembers A, then edits B and C: bit-identical patches (A has paraphrases, whose
    queries ``edit`` adds to the memory; ``remember`` must add them too)."""
    probe = C.editor_for(kind, memory=False)
    first = C.wrong_request(probe, 0, "A")
    paraphrases = ["the capital of france is paris today", "the capital of france is paris city"] \
        if probe.task == "classification" else ["the capital of france is a", "the city of france is"]
    requests = [EditRequest("A", first.input, first.target, paraphrases),
                C.wrong_request(probe, 1, "B"), C.wrong_request(probe, 2, "C")]

    whole = C.editor_for(kind)
    assert all(whole.edit(r).fixed for r in requests)

    night1 = C.editor_for(kind)
    assert night1.edit(requests[0]).fixed
    assert night1.memory.shape[0] > C.editor_for(kind).memory.shape[0] + 1, "test premise: A's paraphrases joined the memory"
    night1.patch_set().save(tmp_path / "v1")

    model, tok = tiny.build(kind)
    PatchSet.load(tmp_path / "v1").apply(model)
    night2 = Editor(model, tok, C.config())
    night2.build_memory(tiny.SENTENCES)
    assert night2.remember([requests[0]]) == 1
    assert torch.equal(night2.memory, night1.memory)
    assert all(night2.edit(r).fixed for r in requests[1:])
    _same_blocks(night2, whole)


def test_full_forward_dropout_masks_come_from_the_edit_seed():
    """Full-forward mode draws its dropout masks from the edit's own seed, whatever the caller's RNG
    did before (so a replay trains the same), and leaves the caller's RNG where it was."""

    def run(global_seed: int, seed: int = 0):
        model, tok = tiny.build("bert")
        model.bert.encoder.layer[1].output.dropout.p = 0.3
        editor = Editor(model, tok, C.config(cached=False, max_steps=5, batch_size=3, seed=seed))
        editor.build_memory(tiny.SENTENCES)
        request = C.wrong_request(editor)
        torch.manual_seed(global_seed)
        state = torch.random.get_rng_state()
        result = editor.edit(request)
        assert torch.equal(torch.random.get_rng_state(), state)
        return result.steps, result.losses

    assert run(1) == run(2)
    assert run(1)[1] != run(1, seed=5)[1], "test premise: dropout changes the losses"


def test_memory_z_scores_the_top_rows_with_or_without_a_preselection():
    """Each neuron's top-k memory rows enter the loss: picked at every step from the whole memory
    or from its own candidates, or, when its candidates are no more than k (the default: its top
    rows at the last full scan), all of them in one product. Same rows, same loss, same gradient
    every way, for each of two neurons."""
    from patcher import PatcherConfig
    from patcher.objective import Objective

    g = torch.Generator().manual_seed(0)
    memory, key = torch.randn(40, 16, generator=g), torch.randn(2, 16, generator=g)
    bias = torch.tensor([0.5, -0.5])
    objective = Objective(PatcherConfig(memory_topk=10), "classification", torch.nn.GELU(), False, torch.device("cpu"))

    def loss_and_grad(rows: torch.Tensor):
        params = {"key": key.clone().requires_grad_(True), "bias": bias.clone().requires_grad_(True)}
        zm, z = objective.memory_z(params, rows)
        assert zm.shape == (10, 2) and not z.requires_grad
        loss = objective.memory_loss(zm, torch.ones(2))
        loss.backward()
        return zm.detach().sort(0).values, loss.detach(), params["key"].grad, params["bias"].grad

    params = {"key": key, "bias": bias}
    whole = loss_and_grad(memory)
    for rows in (Objective.candidates(params, memory, 25), Objective.candidates(params, memory, 10)):
        for a, b in zip(whole, loss_and_grad(rows)):
            assert torch.allclose(a, b, atol=1e-6)
    assert whole[2].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("batch_size", [3, 40])
def test_dropout_rounds_are_fresh_samples_from_the_edit_seed(batch_size):
    """Cached mode with dropout: ``dropout_rounds`` batches, each the clean mistake and paraphrase
    then a fresh dropout sample of the reference's batch; captured in one forward pass (3) or one
    per round when a round alone fills one (40); the same again from the same seed."""
    model, tok = tiny.build("bert")
    model.bert.encoder.layer[0].output.dropout.p = 0.3  # before the last FFN's input
    editor = Editor(model, tok, C.config(batch_size=batch_size, dropout_rounds=3))
    text = C.CLS_TEXTS[0]
    variants = editor._variants(EditRequest("e", text, "L1", [text + " today"]))
    cap = editor.capture(variants)

    rounds = editor._training_batches(cap, variants, 1, seed=7)
    assert len(rounds) == 3
    rows = 2 + (batch_size - 1) + 1  # clean mistake and paraphrase, then the noisy batch
    for q, resid, y in rounds:
        assert q.shape == resid.shape == y.shape == (rows, 1, editor.ffn.d_model)
        assert torch.equal(q[:2], rounds[0][0][:2])  # the clean rows are the same in every round
        assert torch.equal(q[:2, 0], cap.q)
    noisy = [q[2:, 0] for q, _, _ in rounds]
    assert not torch.allclose(noisy[0], noisy[1]) and not torch.allclose(noisy[1], noisy[2])
    assert not torch.allclose(noisy[0][0], noisy[0][1])  # copies of the mistake differ by their masks
    again = editor._training_batches(cap, variants, 1, seed=7)
    assert all(torch.equal(a, b) for r, s in zip(rounds, again) for a, b in zip(r, s))


def test_candidates_hold_every_neurons_own_top_rows():
    """Memory candidates are picked per neuron: a neuron whose z is below another's on every row
    still gets its own highest rows (a max over the neurons would leave them out), in one shape
    (neurons, n, d) whatever the rows, so a compiled step never meets a new size."""
    from patcher.objective import Objective

    g = torch.Generator().manual_seed(0)
    memory = torch.randn(200, 8, generator=g)
    params = {"key": torch.randn(2, 8, generator=g), "bias": torch.tensor([100.0, -100.0])}
    candidates = Objective.candidates(params, memory, 10)
    assert candidates.shape == (2, 10, 8)
    for neuron in range(2):
        z = memory @ params["key"][neuron] + params["bias"][neuron]
        assert torch.equal(candidates[neuron], memory[z.topk(10).indices])


def test_one_neuron_scores_a_large_memory_as_a_matrix_product(monkeypatch):
    """A single neuron's scores on a memory of ``GEMV_ROWS`` rows or more are computed with a zero
    second column (MKL's matrix-vector product is several times slower on a CPU): the same scores
    and gradients as the plain product, and the path is taken only from that size on."""
    from patcher import steps

    g = torch.Generator().manual_seed(0)
    memory = torch.randn(steps.GEMV_ROWS, 32, generator=g)
    weight = torch.randn(1, 32, generator=g)
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))

    def scores(rows: torch.Tensor):
        params = {"key": weight.clone().requires_grad_(True), "bias": torch.tensor([0.5], requires_grad=True)}
        z = steps.preactivation(params, rows)
        (z.square().sum()).backward()
        return z.detach(), params["key"].grad, params["bias"].grad

    padded = scores(memory)
    assert len(calls) == 1 and padded[0].shape == (steps.GEMV_ROWS, 1)
    plain = memory @ weight.T + 0.5
    assert torch.allclose(padded[0], plain, atol=1e-5)
    assert torch.allclose(padded[1], 2 * (plain.T @ memory), rtol=1e-4)
    scores(memory[:-1])
    assert len(calls) == 1  # below GEMV_ROWS: the plain product


def test_compile_needs_the_cached_step():
    from pydantic import ValidationError

    from patcher import PatcherConfig

    with pytest.raises(ValidationError, match="compile applies to the cached step"):
        PatcherConfig(cached=False, compile="default")
    assert PatcherConfig.reference("classification", cached=True, compile="default").compile == "default"


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_refuses_cuda_graph_modes(mode):
    """The modes that record CUDA graphs crashed the process on a GPU: refused, saying why and what to use."""
    from pydantic import ValidationError

    from patcher import PatcherConfig

    with pytest.raises(ValidationError, match="CUDA graphs.*use 'default'"):
        PatcherConfig(compile=mode)
    assert PatcherConfig(compile="max-autotune-no-cudagraphs").compile == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compiled_step_computes_what_the_eager_step_does(kind):
    """``compile``: the first step's losses match eager ones (bert: classification with dropout
    rounds; llama: a gated FFN, several neurons per edit), on per-neuron memory candidates with
    more rows than the loss reads; a whole edit compiled fixes the mistake on the real model."""
    small = dict(memory_candidates=12, memory_topk=8, dropout_rounds=2)

    def editor(**overrides) -> Editor:
        model, tok = tiny.build(kind)
        if kind == "bert":
            model.bert.encoder.layer[0].output.dropout.p = 0.3
        editor = Editor(model, tok, C.config(**small, **overrides))
        editor.build_memory(tiny.SENTENCES)
        assert editor.memory.shape[0] > small["memory_candidates"], "test premise: candidates are picked per neuron"
        return editor

    first = dict(max_steps=1, leak_tol=0.0, retry_neurons=1)  # one step of one try
    eager = editor(**first)
    eager = eager.edit(C.wrong_request(eager))
    compiled = editor(**first, compile="default")
    compiled = compiled.edit(C.wrong_request(compiled))
    assert eager.steps == compiled.steps == 1
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-6)

    whole = editor(compile="default")
    result = whole.edit(C.wrong_request(whole))
    assert result.fixed and not result.already_correct  # judged on the patched model itself
    assert result.neurons >= (2 if kind == "llama" else 1), "test premise: several neurons for the generator"


@pytest.mark.parametrize("kind", ["bert", "llama", "t5-gated"])
def test_cuda_graph_step_trains_what_the_ordinary_loop_does(kind, monkeypatch):
    """``cuda_graph``: on a CPU the recorded step runs without capture, from the same recorded
    inputs (batches cycled through, candidates refreshed) and with the same packed outputs as on a
    GPU. Its patches, steps and losses are those of the ordinary loop, bit for bit, at any
    ``check_every``, and the replayed steps really ran through ``StepGraph``."""
    import patcher.training as training

    built = []

    class Spy(training.StepGraph):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(training, "StepGraph", Spy)
    small = dict(memory_candidates=12, memory_topk=8, memory_refresh=3, dropout_rounds=2)

    def run(**overrides) -> tuple[Editor, list]:
        model, tok = tiny.build(kind)
        if kind == "bert":
            model.bert.encoder.layer[0].output.dropout.p = 0.3
        editor = Editor(model, tok, C.config(**small, **overrides))
        editor.build_memory(tiny.SENTENCES)
        return editor, [editor.edit(C.wrong_request(editor, i)) for i in range(2)]

    plain, expected = run()
    looks = (1, 5) if kind == "bert" else (5,)  # per-step looks on the cheap model, a window of 5 on each
    for k in looks:
        graphed, results = run(cuda_graph=True, check_every=k)
        assert [r.steps for r in results] == [r.steps for r in expected]
        assert [r.losses for r in results] == [r.losses for r in expected]
        assert all(r.fixed for r in results)
        _same_blocks(graphed, plain)
    assert len(built) == 2 * len(looks) and min(r.steps for r in expected) > 4, "test premise: every edit replayed steps"
    assert all(g._run is None and g.graph is None for g in built), "each edit's step graph is released when it ends"


def test_a_step_that_cannot_be_recorded_trains_as_the_ordinary_loop(monkeypatch):
    """A recording the GPU refuses (a fault injected where torch starts recording, as cuBLAS failed
    inside a capture on an H200) warns and leaves the edit as the ordinary loop trains it."""
    import contextlib

    import patcher.training as training
    from patcher.cuda_graph import RecordingFailed

    def run(**overrides) -> tuple[Editor, list]:
        model, tok = tiny.build("bert")
        editor = Editor(model, tok, C.config(memory_candidates=12, memory_topk=8, memory_refresh=3, **overrides))
        editor.build_memory(tiny.SENTENCES)
        return editor, [editor.edit(C.wrong_request(editor, i)) for i in range(2)]

    plain, expected = run()
    built = []

    class Recording(training.StepGraph):  # recorded as on a GPU: the capture branch runs
        def __init__(self, one_step, params, inputs, capture):
            super().__init__(one_step, params, inputs, capture=True)
            built.append(self)

    @contextlib.contextmanager
    def refused(graph, stream=None):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_INTERNAL_ERROR when calling `cublasGemmEx(...)`\nmore")
        yield

    monkeypatch.setattr(training, "StepGraph", Recording)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", refused)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    with pytest.warns(RecordingFailed, match=r"could not be recorded .*CUBLAS_STATUS_INTERNAL_ERROR when calling.*; "
                      r"inputs \d+x\d+x\d+, "):
        graphed, results = run(cuda_graph=True)
    assert [r.steps for r in results] == [r.steps for r in expected]
    assert [r.losses for r in results] == [r.losses for r in expected]
    _same_blocks(graphed, plain)
    assert len(built) == 2 and all(g.graph is None and not g.capture and g.calls > 3 for g in built)


def test_cuda_graph_needs_a_fixed_learning_rate():
    from pydantic import ValidationError

    from patcher import PatcherConfig

    with pytest.raises(ValidationError, match="cuda_graph.*lr_scheduler=None"):
        PatcherConfig.reference("classification", cached=True, cuda_graph=True)
    with pytest.raises(ValidationError, match="cuda_graph.*cached=True"):
        PatcherConfig(cached=False, cuda_graph=True)
    assert PatcherConfig(cuda_graph=True, compile="default").cuda_graph


def test_compile_without_a_compiler_is_a_setup_error():
    """No working C++ compiler (a fault injected through inductor's own setting): a SetupError
    naming ``compile`` and what to do, not a deep traceback, and not blamed on the record."""
    import torch._inductor.config as inductor

    from patcher import SetupError

    torch._dynamo.reset()  # compiled code of earlier tests would be reused without a compiler
    editor = C.editor_for("distilbert", compile="default")
    try:  # inductor's own patch() restores its settings (monkeypatch's undo breaks its config module)
        with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}), \
                pytest.raises(SetupError, match="compile='default'.*C\\+\\+ compiler.*leave compile unset") as info:
            editor.edit(C.wrong_request(editor))
    finally:
        torch._dynamo.reset()
    assert "InvalidCxxCompiler" in str(info.value) and not editor.edit_ids


# ---------------------------------------------------------------------------- the matched memory margin
def test_matched_margin_holds_the_leak_to_its_share_of_a_unit_activation():
    """None (the default) matches the margin to the activation: the smallest whole m >= 3 at which
    nothing at or below -m gets more than MARGIN_LEAK of act(1); one less would leak more."""
    from transformers.activations import ACT2FN

    from patcher.objective import MARGIN_LEAK, matched_margin

    expected = {"gelu": 3.0, "gelu_new": 3.0, "relu": 3.0, "silu": 8.0}
    for name, margin in expected.items():
        act = ACT2FN[name]
        assert matched_margin(act) == margin, name
        z = torch.linspace(-40.0, -margin, 4001)
        assert act(z).abs().max() <= MARGIN_LEAK * act(torch.ones(1)).abs()
    silu = ACT2FN["silu"]  # SiLU's tail is why it needs more: at -7 it still passes more than the share
    assert silu(torch.tensor(-7.0)).abs() > MARGIN_LEAK * silu(torch.ones(1)).abs()


def test_the_margin_the_losses_use():
    from patcher import PatcherConfig
    from patcher.objective import Objective

    cpu = torch.device("cpu")
    assert Objective(PatcherConfig(), "generation", torch.nn.SiLU(), False, cpu).margin == 8.0
    assert Objective(PatcherConfig(), "classification", torch.nn.GELU(), False, cpu).margin == 3.0
    assert Objective(PatcherConfig(memory_margin=5.0), "generation", torch.nn.SiLU(), False, cpu).margin == 5.0
    assert Objective(PatcherConfig.reference("generation"), "generation", torch.nn.SiLU(), False, cpu).margin == 0.0
    zm, z_edit = torch.zeros(4, 1), torch.ones(1)  # the loss reads the resolved margin
    loss = Objective(PatcherConfig(), "generation", torch.nn.SiLU(), False, cpu).memory_loss(zm, z_edit)
    assert torch.allclose(loss, torch.exp(torch.tensor(-1.0 + 8.0)) + torch.exp(torch.tensor(8.0)))


def test_clipped_neurons_are_screened_with_the_models_activation():
    """A clipped neuron passes nothing below 0, but its leak bound and matched margin are read off
    the model's activation: it trains until it would be silent unclipped (else the leak stop would
    end training as soon as the memory is below 0)."""
    from patcher import PatcherConfig
    from patcher.layer import ClippedAct
    from patcher.objective import Objective

    cpu, silu = torch.device("cpu"), torch.nn.SiLU()
    clipped = Objective(PatcherConfig(), "generation", ClippedAct(silu), False, cpu, silu)
    alone = Objective(PatcherConfig(), "generation", ClippedAct(silu), False, cpu)
    assert clipped.margin == 8.0 and alone.margin == 3.0
    z = torch.tensor([-5.0, -1.0, 2.0])
    assert clipped.act(z)[:2].eq(0).all() and alone.envelope(z)[:2].eq(0).all()
    torch.testing.assert_close(clipped.envelope(z), Objective(PatcherConfig(), "generation", silu, False, cpu).envelope(z))
    assert clipped.envelope(z)[1] > 0.2


def test_an_activation_no_margin_silences_is_refused_when_the_editor_is_made():
    """tanh passes -1 to everything far below zero: no margin bounds the leak, so the editor says
    so at once (and how to proceed) instead of failing at the first edit."""
    from patcher import PatcherConfig, SetupError

    model, tok = tiny.build("llama")
    model.model.layers[-1].mlp.act_fn = torch.nn.Tanh()
    with pytest.raises(SetupError, match="Tanh leaks.*set memory_margin explicitly"):
        Editor(model, tok, PatcherConfig())
    assert Editor(model, tok, PatcherConfig(memory_margin=3.0)).config.memory_margin == 3.0
