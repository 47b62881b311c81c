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
    for k in (3, 7):
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
    editor = C.editor_for(kind, max_steps=40, check_every=10, leak_tol=0.0, patience=10**6, fixed_patience=10**6)
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
