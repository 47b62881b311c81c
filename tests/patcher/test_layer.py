"""PatchedLinear / PatchedFFN on plain modules: exact base behaviour, the widening maths, folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from patcher import PatchBlock, PatchedFFN, PatchedLinear, PatchError
from tests import tiny

torch.set_num_threads(1)


def _base(kind: str, d_in: int, d_out: int, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":
        module = Conv1D(d_out, d_in)
        nn.init.normal_(module.weight)
        return module
    return nn.Linear(d_in, d_out, bias=bias)


def _w(module) -> torch.Tensor:
    """(d_out, d_in) weight, whatever the module's layout."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_no_extras_is_bit_identical_to_the_base(kind, bias):
    x = torch.randn(3, 5, 8)
    for role, (d_in, d_out) in (("in", (8, 16)), ("out", (8, 6))):
        base = _base(kind, d_in, d_out, bias)
        patched = PatchedLinear(base, role)
        assert torch.equal(patched(x), base(x))
        assert set(patched.state_dict()) == set(base.state_dict())  # extras are not persistent
        assert patched.weight is base.weight


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_extras_widen_and_fold(kind, bias):
    d, h, n = 8, 16, 3
    x = torch.randn(2, 4, d)
    fc_in, fc_out = PatchedLinear(_base(kind, d, h, bias), "in"), PatchedLinear(_base(kind, h, d, bias), "out")
    key, b, value = torch.randn(n, d), torch.randn(n), torch.randn(n, d)
    fc_in.extra_weight, fc_in.extra_bias, fc_out.extra_weight = key, b, value
    hidden = fc_in(x)
    assert hidden.shape == (2, 4, h + n)
    torch.testing.assert_close(hidden[..., h:], x @ key.T + b)
    act = F.gelu(hidden)
    out = fc_out(act)
    expected = fc_out.base_forward(act[..., :h].contiguous()) + F.gelu(x @ key.T + b) @ value
    torch.testing.assert_close(out, expected)
    folded_in, folded_out = fc_in.folded(), fc_out.folded()
    assert type(folded_in) is type(fc_in.folded()) and type(folded_in) in (nn.Linear, Conv1D)
    assert _w(folded_in).shape == (h + n, d) and _w(folded_out).shape == (d, h + n)
    torch.testing.assert_close(folded_out(F.gelu(folded_in(x))), out, atol=1e-5, rtol=1e-5)


def test_only_linear_layers_can_be_patched():
    with pytest.raises(PatchError, match="expected nn.Linear or Conv1D"):
        PatchedLinear(nn.Embedding(3, 4), "in")


def test_patched_ffn_blocks_add_and_remove():
    model, _ = tiny.build("llama")
    ffn = PatchedFFN.of(model, __import__("patcher").resolve_family(model))
    assert PatchedFFN.of(model, ffn.family) is ffn and PatchedFFN.find(model) is ffn
    assert len(ffn.ins) == 2 and ffn.d_model == 32 and ffn.d_out == 32
    block = PatchBlock("a", [torch.randn(2, 32), torch.randn(2, 32)], [torch.zeros(2), torch.zeros(2)], torch.randn(2, 32))
    ffn.add(block)
    assert ffn.neurons == 2 and ffn.ins[1].extra_weight.shape == (2, 32)
    with pytest.raises(PatchError, match="already patched"):
        ffn.add(block)
    with pytest.raises(PatchError, match="input projections"):
        ffn.add(PatchBlock("b", [torch.randn(1, 32)], [torch.zeros(1)], torch.randn(1, 32)))
    assert ffn.remove("a") is block and ffn.neurons == 0 and ffn.out.extra_weight.shape == (0, 32)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_clipped_neurons_pass_nothing_below_zero(kind):
    """clip_negative: the activation reads max(z, 0), so a neuron below 0 adds exactly nothing
    (unclipped GELU/SiLU would add a negative share of its value), and the FFN cannot be folded."""
    from patcher.families import resolve_family
    from patcher.layer import ClippedAct

    model, _ = tiny.build(kind)
    ffn = PatchedFFN.of(model, resolve_family(model))
    assert ffn.neuron_act is ffn.act and not ffn.clip
    ffn.set_clip(True)
    assert isinstance(ffn.neuron_act, ClippedAct) and ffn.neuron_act.act is ffn.act
    z = torch.linspace(-4, 4, 81)
    torch.testing.assert_close(ffn.neuron_act(z), torch.where(z > 0, ffn.act(z), torch.zeros(())))
    assert ffn.act(torch.tensor([-0.75])).item() < -0.1  # the lobe the clip removes
    n = 3
    x = torch.randn(2, 5, ffn.d_model)
    key, bias = torch.randn(n, ffn.d_model), torch.randn(n)
    ffn.add(PatchBlock("a", [key] * len(ffn.ins), [bias] * len(ffn.ins), torch.randn(n, ffn.d_out)))
    extra = ffn.ins[0](x)[..., -n:]
    z = x @ key.T + bias
    assert (z < 0).any() and (z > 0).any()
    torch.testing.assert_close(extra, z.clamp_min(0))
    if len(ffn.ins) > 1:  # gated: only the gate is clipped; the up projection stays linear
        torch.testing.assert_close(ffn.ins[1](x)[..., -n:], z)
    with pytest.raises(PatchError, match="clip_threshold=0; new ones cannot use clip_negative=False"):
        ffn.set_clip(False)
    with pytest.raises(PatchError, match="cannot be folded"):
        ffn.fold(model)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_clip_threshold_silences_weak_firing_too(kind):
    """clip_threshold: a clipped neuron passes act(z) only above the threshold, so inputs it fires
    on weakly (0 < z <= threshold) get nothing; the setting is one for all of a model's patches."""
    from patcher.families import resolve_family

    model, _ = tiny.build(kind)
    ffn = PatchedFFN.of(model, resolve_family(model))
    ffn.set_clip(True, 1.5)
    assert ffn.clip_threshold == 1.5 and ffn.neuron_act.threshold == 1.5
    z = torch.linspace(-4, 4, 81)
    torch.testing.assert_close(ffn.neuron_act(z), torch.where(z > 1.5, ffn.act(z), torch.zeros(())))
    n = 4
    x = torch.randn(2, 5, ffn.d_model)
    key, bias = torch.randn(n, ffn.d_model), torch.randn(n)
    ffn.add(PatchBlock("a", [key] * len(ffn.ins), [bias] * len(ffn.ins), torch.randn(n, ffn.d_out)))
    z = x @ key.T + bias
    assert ((z > 0) & (z <= 1.5)).any() and (z > 1.5).any()
    torch.testing.assert_close(ffn.ins[0](x)[..., -n:], torch.where(z > 1.5, z, torch.zeros(())))
    with pytest.raises(PatchError, match="clip_threshold=1.5; new ones cannot use clip_negative=True, clip_threshold=0 "):
        ffn.set_clip(True)
    ffn.set_clip(True, 1.5)  # the same setting again is fine
