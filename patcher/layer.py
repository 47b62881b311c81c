"""The patched feed-forward layer: the base projections plus extra neurons, one block per edit.

A patch of n neurons widens the FFN: n more rows for each input projection (a key and a bias;
for gated FFNs a gate row and an up row) and n more columns for the output projection (a value).
``PatchedLinear`` keeps the base module's own ``weight``/``bias`` parameters under their
original names, so the model's ``state_dict``, ``save_pretrained`` and fingerprint are those of
the base model, while the extra neurons live in non-persistent buffers. With no extra neurons it
computes exactly what the base module computed, which is why removing every patch gives back the
base outputs bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import PatchError
from .families import Family, get_path, set_path


class PatchedLinear(nn.Module):
    """A frozen linear (or GPT-2 Conv1D) projection with extra neurons.

    role "in": output = [base(x), z = x @ K^T + b]  (extra output features; with ``clip``, z where
               z > ``clip_threshold`` and 0 elsewhere)
    role "out": output = base(x[..., :d]) + x[..., d:] @ V  (extra input features)
    """

    def __init__(self, base: nn.Module, role: str):
        super().__init__()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise PatchError(f"cannot patch a {type(base).__name__}; expected nn.Linear or Conv1D")
        self.role = role
        self.transposed = isinstance(base, Conv1D)
        self.weight = base.weight
        self.bias = base.bias
        # in: one key row (d_in) per neuron; out: one value row (d_out) per neuron.
        width = self.in_features if role == "in" else self.out_features
        self.register_buffer("extra_weight", self.weight.new_zeros(0, width), persistent=False)
        self.register_buffer("extra_bias", self.weight.new_zeros(0), persistent=False)
        # Trainable neurons of the edit being trained in reference-faithful mode (None otherwise).
        self.live_weight: torch.Tensor | None = None
        self.live_bias: torch.Tensor | None = None
        # Clipped neurons: the activation sees z only above the threshold (0 by default) and 0 below
        # it, so a neuron that does not fire passes exactly nothing.
        self.clip = False
        self.clip_threshold = 0.0

    @property
    def in_features(self) -> int:
        return self.weight.shape[0] if self.transposed else self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
            return out.view(x.shape[:-1] + (self.out_features,))
        return F.linear(x, self.weight, self.bias)

    def _extras(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.extra_weight, self.extra_bias
        if self.live_weight is not None:
            weight = torch.cat([weight, self.live_weight.to(weight.dtype)])
            if self.role == "in":
                bias = torch.cat([bias, self.live_bias.to(bias.dtype)])
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._extras()
        if self.role == "in":
            out = self.base_forward(x)
            if weight.shape[0] == 0:
                return out
            extra = F.linear(x, weight, bias)
            return torch.cat([out, clip_below(extra, self.clip_threshold) if self.clip else extra], dim=-1)
        d = self.in_features
        if x.shape[-1] == d:
            return self.base_forward(x)
        return self.base_forward(x[..., :d].contiguous()) + x[..., d:] @ weight

    def folded(self) -> nn.Module:
        """A plain module of the base type with the extra neurons written into its weights."""
        extra_w, extra_b = self.extra_weight.detach(), self.extra_bias.detach()
        n = extra_w.shape[0]
        if self.clip and n:
            raise PatchError("clipped patch neurons (clip_negative) cannot be folded into a plain layer: the "
                             "model's activation has no clip in front of it; serve the model unfolded")
        w = self.weight.detach()
        b = self.bias.detach() if self.bias is not None else None
        if self.role == "in":
            if b is None and n and bool(extra_b.abs().gt(0).any()):
                b = w.new_zeros(self.out_features)
            new_b = torch.cat([b, extra_b]) if b is not None else None
            new_w = torch.cat([w, extra_w.T], 1) if self.transposed else torch.cat([w, extra_w], 0)
        else:
            new_b = b
            new_w = torch.cat([w, extra_w], 0) if self.transposed else torch.cat([w, extra_w.T], 1)
        # Built on the meta device (no random init, no copy through the CPU), then given the weights,
        # which are already on the model's device in its dtype.
        with torch.device("meta"):
            if self.transposed:
                module = Conv1D(new_w.shape[1], new_w.shape[0])
            else:
                module = nn.Linear(new_w.shape[1], new_w.shape[0], bias=new_b is not None)
        module.weight = nn.Parameter(new_w)  # a fresh tensor from torch.cat
        module.bias = nn.Parameter(new_b.clone()) if new_b is not None else None
        module.requires_grad_(self.weight.requires_grad)
        return module


@dataclass
class PatchBlock:
    """The neurons added for one edit. in_weight/in_bias hold one tensor per FFN input projection
    (gate then up for gated FFNs); out_weight holds the values, one row per neuron."""

    edit_id: str
    in_weight: list[torch.Tensor]
    in_bias: list[torch.Tensor]
    out_weight: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def neurons(self) -> int:
        return int(self.out_weight.shape[0])


def clip_below(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """z where z > threshold, 0 elsewhere (max(z, 0) at threshold 0). The activations patched here
    (GELU, SiLU, ReLU) are 0 at 0, so act(clip_below(z)) is 0 wherever the neuron does not fire."""
    if threshold == 0:
        return z.clamp_min(0)
    return z.masked_fill(z <= threshold, 0)


class ClippedAct(nn.Module):
    """The activation a clipped patch neuron goes through: act(z) above the threshold, 0 at and below
    it. A neuron that does not fire adds nothing (GELU's and SiLU's negative lobes are cut off); with
    a threshold above 0, neither does one that fires only weakly, on inputs between it and 0."""

    def __init__(self, act: nn.Module, threshold: float = 0.0):
        super().__init__()
        self.act = act
        self.threshold = threshold

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(clip_below(z, self.threshold))


class PatchedFFN:
    """The last FFN of a model with its patch blocks. One per model, found with ``PatchedFFN.of``."""

    ATTR = "_patchflow_ffn"

    def __init__(self, model: nn.Module, family: Family):
        self.family = family
        self.layer = get_path(model, family.layer)
        self.ins: list[PatchedLinear] = []
        for name in family.ffn_in:
            module = get_path(self.layer, name)
            if not isinstance(module, PatchedLinear):
                module = PatchedLinear(module, "in")
                set_path(self.layer, name, module)
            self.ins.append(module)
        out = get_path(self.layer, family.ffn_out)
        if not isinstance(out, PatchedLinear):
            out = PatchedLinear(out, "out")
            set_path(self.layer, family.ffn_out, out)
        self.out = out
        self.act = get_path(self.layer, family.act)
        self._clipped_act = ClippedAct(self.act)
        self.blocks: list[PatchBlock] = []

    @classmethod
    def of(cls, model: nn.Module, family: Family) -> "PatchedFFN":
        existing = model.__dict__.get(cls.ATTR)
        if existing is None:
            existing = cls(model, family)
            model.__dict__[cls.ATTR] = existing
        return existing

    @classmethod
    def find(cls, model: nn.Module) -> "PatchedFFN | None":
        return model.__dict__.get(cls.ATTR)

    @property
    def d_model(self) -> int:
        return self.ins[0].in_features

    @property
    def d_out(self) -> int:
        return self.out.out_features

    @property
    def neurons(self) -> int:
        return sum(b.neurons for b in self.blocks)

    def edit_ids(self) -> list[str]:
        return [b.edit_id for b in self.blocks]

    @property
    def clip(self) -> bool:
        """Whether the patch neurons are clipped (``PatcherConfig.clip_negative``); the same for all."""
        return self.ins[0].clip  # the first input projection is the one the activation reads (the gate)

    @property
    def clip_threshold(self) -> float:
        """Where clipped neurons start to pass anything (``PatcherConfig.clip_threshold``)."""
        return self.ins[0].clip_threshold

    def set_clip(self, clip: bool, threshold: float = 0.0) -> None:
        threshold = float(threshold) if clip else 0.0
        if (clip, threshold) != (self.clip, self.clip_threshold) and self.blocks:
            have = self._clip_setting(self.clip, self.clip_threshold)
            raise PatchError(f"this model carries {len(self.blocks)} patches made with {have}; new ones cannot use "
                             f"{self._clip_setting(clip, threshold)} (one activation for all patch neurons): keep "
                             f"{have} for this model, or patch its base (no patches) to change it")
        self.ins[0].clip, self.ins[0].clip_threshold = clip, threshold
        self._clipped_act.threshold = threshold

    @staticmethod
    def _clip_setting(clip: bool, threshold: float) -> str:
        return f"clip_negative={clip}" + (f", clip_threshold={threshold:g}" if clip else "")

    @property
    def neuron_act(self) -> nn.Module:
        """The activation of a patch neuron's pre-activation: the model's, clipped if ``clip``."""
        return self._clipped_act if self.clip else self.act

    def add(self, block: PatchBlock) -> None:
        if block.edit_id in self.edit_ids():
            raise PatchError(f"edit {block.edit_id!r} is already patched into this model")
        if len(block.in_weight) != len(self.ins):
            raise PatchError(f"patch has {len(block.in_weight)} input projections, the FFN has {len(self.ins)}")
        self.blocks.append(block)
        self._rebuild()

    def remove(self, edit_id: str) -> PatchBlock:
        for i, block in enumerate(self.blocks):
            if block.edit_id == edit_id:
                del self.blocks[i]
                self._rebuild()
                return block
        raise PatchError(f"no patch for edit {edit_id!r}; patched edits: {self.edit_ids()}")

    def _rebuild(self) -> None:
        ref = self.out.weight
        for i, module in enumerate(self.ins):
            weights = [b.in_weight[i] for b in self.blocks]
            biases = [b.in_bias[i] for b in self.blocks]
            module.extra_weight = torch.cat(weights).to(ref) if weights else ref.new_zeros(0, self.d_model)
            module.extra_bias = torch.cat(biases).to(ref) if biases else ref.new_zeros(0)
        values = [b.out_weight for b in self.blocks]
        self.out.extra_weight = torch.cat(values).to(ref) if values else ref.new_zeros(0, self.d_out)

    def set_live(self, in_weight: list[torch.Tensor] | None, in_bias=None, out_weight=None) -> None:
        """Put trainable neurons into the forward pass (reference-faithful training) or take them out."""
        for i, module in enumerate(self.ins):
            module.live_weight = None if in_weight is None else in_weight[i]
            module.live_bias = None if in_weight is None else in_bias[i]
        self.out.live_weight = out_weight

    def fold(self, model: nn.Module) -> nn.Module:
        """Replace the patched projections by plain, wider ones (in place) and forget the blocks."""
        for name, module in zip(self.family.ffn_in, self.ins):
            set_path(self.layer, name, module.folded())
        set_path(self.layer, self.family.ffn_out, self.out.folded())
        model.__dict__.pop(self.ATTR, None)
        return model
