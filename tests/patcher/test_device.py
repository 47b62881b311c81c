"""Every tensor the patcher makes lives on the model's device.

Without a GPU: keep the model on ``cpu`` and set torch's default device to ``meta``. A tensor the
patcher creates without naming the model's device then lands on ``meta``, and using it with the
model's tensors fails loudly (a stray tensor that never meets them is caught by the device checks
on what the editor keeps).
"""

from __future__ import annotations

import pytest
import torch

from patcher import EditRequest, Editor
from patcher.encoding import collate, encode, gather_positions, labels_of
from tests import tiny
from tests.patcher import _common as C

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _DefaultDevice:
    """torch's default device set for the block; the previous one restored however it ends."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        self.previous = torch.get_default_device()
        torch.set_default_device(self.device)

    def __exit__(self, *exc):
        torch.set_default_device(self.previous)


def test_the_trick_catches_a_stray_tensor():
    model, tok = tiny.build("distilbert")
    with _DefaultDevice("meta"):
        logits = model(input_ids=torch.tensor([[5, 6, 7]], device="cpu")).logits
        stray = torch.tensor([0])
        assert stray.device.type == "meta"
        with pytest.raises(RuntimeError, match="device"):
            logits.argmax(-1) == stray
    assert torch.empty(1).device.type == "cpu"


@pytest.mark.parametrize("kind", C.KINDS)
def test_memory_and_edit_make_no_stray_tensor(kind):
    model, tok = tiny.build(kind)
    if kind == "bert":  # dropout on: the captured dropout samples and their seeded RNG too
        model.bert.encoder.layer[0].output.dropout.p = 0.1
    editor = Editor(model, tok, C.config(memory_refresh=3, memory_candidates=50, dropout_rounds=2))
    request = C.wrong_request(editor)
    with _DefaultDevice("meta"):
        editor.build_memory(tiny.SENTENCES)
        result = editor.edit(request)
        assert result.fixed, result.message
        editor.remember([EditRequest("again", request.input, request.target, [request.input + " the"])])
        assert editor.is_correct(request.input, request.target)
        folded = editor.folded()
        editor.remove(request.id)
    for tensor in (editor.memory, editor.val_memory):
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in folded.parameters())
    assert editor.edit_ids == []


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_cuda_graph_step_makes_no_stray_tensor(kind):
    """``cuda_graph``: the recorded inputs, the packed outputs and the snapshots (the step runs
    without capture on a CPU) are made on the model's device."""
    model, tok = tiny.build(kind)
    if kind == "bert":
        model.bert.encoder.layer[0].output.dropout.p = 0.1
    editor = Editor(model, tok, C.config(memory_refresh=3, memory_candidates=50, dropout_rounds=2, cuda_graph=True))
    editor.build_memory(tiny.SENTENCES)
    request = C.wrong_request(editor)
    with _DefaultDevice("meta"):
        result = editor.edit(request)
    assert result.fixed and result.steps > 4, "test premise: steps replayed after the warm-up"


@pytest.mark.parametrize("kind", ["distilbert", "llama"])
def test_full_forward_mode_makes_no_stray_tensor(kind):
    editor = C.editor_for(kind, cached=False, max_steps=5, check_every=2)
    request = C.wrong_request(editor)
    with _DefaultDevice("meta"):
        result = editor.edit(request)
    assert result.steps >= 1 and editor.ffn.out.live_weight is None


def test_collate_and_positions_on_the_given_device():
    model, tok = tiny.build("gpt2")
    family = Editor(model, tok, C.config()).family
    items = [encode(model, tok, family, t, " paris") for t in ("the capital of france is", "a city")]
    batch = collate(items, 0, device="meta")
    assert {t.device.type for t in batch.values()} == {"meta"}
    assert labels_of(items, "meta").device.type == "meta"
    cpu = collate(items, 0, device="cpu")
    assert cpu["input_ids"][1].tolist()[-1] == 0 and cpu["attention_mask"].sum(1).tolist() == [len(i.inputs["input_ids"]) for i in items]
    hidden = torch.arange(2 * cpu["input_ids"].shape[1], dtype=torch.float32).view(2, -1, 1)
    got = gather_positions(hidden, items).flatten().tolist()
    width = cpu["input_ids"].shape[1]
    assert got == [float(i * width + p) for i, it in enumerate(items) for p in it.positions]
