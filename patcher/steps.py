"""The new neurons of one edit, and the two ways of taking one training step with them.

Both step functions take the trainable parameters and the step's inputs (``batch(step)``) and
return a ``StepOut``:
the logits the edit loss is computed on, their labels, each neuron's pre-activation on its own
query position in every training row, and whether the edit is fixed (a device tensor, so that
the training loop can decide when to look at it).

- ``CachedStep``: nothing before the last FFN depends on the patch, so one forward pass per edit
  captures, at each query position, the FFN input ``q``, the residual and the FFN output. A step
  then evaluates only the new neurons, the rest of the last layer and the head on those vectors.
- ``FullStep``: the reference procedure; the neurons are put into the model, which runs in full
  at every step (fresh dropout masks each time).

Precision: the neurons are fp32 master copies and train in fp32 on fp32 copies of the queries,
whatever the model's dtype; their output is cast to the model's dtype where it joins the model's
own tensors. Whether the edit is fixed is judged as the model will compute it once the neurons
are added: for a bf16/fp16 model the check rounds the neurons to that dtype and runs in it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .encoding import Encoded, gather_positions, labels_of
from .layer import PatchBlock, PatchedFFN
from .records import EditRequest

Params = dict[str, torch.Tensor]

GEMV_ROWS = 4096  # CPU: from this many memory rows on, one neuron's scores are padded to a matrix product


@dataclass
class Captured:
    """Cached vectors at the query positions: FFN input, residual, FFN output, and the logits."""

    q: torch.Tensor
    resid: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor


@dataclass
class Prepared:
    """A mistake ready to train: encodings (the mistake first), capture, labels, positions, seed, and its
    negatives (queries the new neurons stay silent on, this edit only: ``edit_negatives``)."""

    request: EditRequest
    variants: list[Encoded]
    cap: Captured
    labels: torch.Tensor
    positions: list[int]
    seed: int
    negatives: torch.Tensor | None = None


@dataclass
class StepOut:
    logits: torch.Tensor  # (rows, classes), fp32, with gradient
    labels: torch.Tensor  # (rows,)
    z_rows: torch.Tensor  # (R, n): neuron i's pre-activation at its own position in training row r
    fixed: torch.Tensor  # 0-dim bool: every target position of the mistake is right


def edit_seed(seed: int, edit_id: str) -> int:
    """The seed of one edit's random draws (its values, its dropout masks), from the run's seed and its id."""
    return int(hashlib.sha256(f"{seed}:{edit_id}".encode()).hexdigest()[:8], 16)


def init_neurons(q_edit: torch.Tensor, d_out: int, amplifier: float, gated: bool, seed: int,
                 value_init: str = "ours") -> Params:
    """fp32 masters. Keys start at q/|q|^2 (pre-activation 1 on the mistake); values are random
    (from the edit's own seed, drawn on the model's device) times a trainable amplifier.

    ``value_init`` "ours": N(0, 1)/sqrt(d_out) times one amplifier per neuron (|v| ~ amplifier);
    "reference": N(0, 1) times an amplifier per element, both trained, as the reference's
    ModifyLinearInput(amplify=True) does (|v| ~ amplifier * sqrt(d_out))."""
    key = q_edit.float() / q_edit.float().pow(2).sum(-1, keepdim=True)
    n, device = key.shape[0], key.device
    gen = torch.Generator(device=device).manual_seed(seed)
    params = {
        "key": key.clone(),
        "bias": key.new_zeros(n),
        "value": torch.randn(n, d_out, generator=gen, device=device),
        "amp": key.new_full((n, d_out) if value_init == "reference" else (n, 1), amplifier),
    }
    if value_init != "reference":
        params["value"] = params["value"] / math.sqrt(d_out)
    if gated:
        params["up"] = key.clone()
        params["up_bias"] = key.new_zeros(n)
    return {k: v.requires_grad_(True) for k, v in params.items()}


def rounded(params: Params, dtype: torch.dtype) -> Params:
    """The neurons as the model holds them: inputs rows and values (amplifier applied) in ``dtype``."""
    out = {k: params[k].detach().to(dtype) for k in ("key", "bias", "up", "up_bias") if k in params}
    out["value"] = (params["value"] * params["amp"]).detach().to(dtype)
    out["amp"] = out["value"].new_ones(out["value"].shape[0], 1)
    return out


def preactivation(params: Params, q: torch.Tensor, own: bool = False, weight: str = "key", bias: str = "bias") -> torch.Tensor:
    """(..., n): each new neuron's pre-activation z = key . q + bias for queries q (..., d) that all
    neurons read; ``own``: q (n, C, d) holds each neuron's own C rows, and the result is (C, n).
    ``weight``/``bias`` "up"/"up_bias": a gated FFN's up projection instead."""
    if own:
        return torch.einsum("ncd,nd->cn", q, params[weight]) + params[bias]
    w = params[weight]
    if w.shape[0] == 1 and q.dim() == 2 and q.shape[0] >= GEMV_ROWS and q.device.type == "cpu":
        # one neuron scoring a large memory: MKL's matrix-vector product runs on one core once the
        # memory outgrows the cache (3.4 ms for 20,870 x 384 on 2 cores); with a zero second
        # column it is a matrix product on every core (0.8 ms)
        return (q @ torch.cat([w, torch.zeros_like(w)]).T)[:, :1] + params[bias]
    return q @ w.T + params[bias]


def contribution(params: Params, q: torch.Tensor, act: nn.Module, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-activations z, added FFN output) of the new neurons for queries q (..., d)."""
    z = preactivation(params, q)
    a = act(z)
    if gated:
        a = a * preactivation(params, q, weight="up", bias="up_bias")
    return z, a @ (params["value"] * params["amp"])


def to_block(edit_id: str, params: Params, gated: bool, dtype: torch.dtype) -> PatchBlock:
    """The trained neurons as a patch block in the model's dtype (what the model will compute with)."""
    low = rounded(params, dtype)
    names = [("key", "bias")] + ([("up", "up_bias")] if gated else [])
    return PatchBlock(edit_id, [low[w].clone() for w, _ in names], [low[b].clone() for _, b in names], low["value"].clone())


class CachedStep:
    """A step on cached vectors. ``batches``: one or more (q, resid, y) triples shaped (R, J, d),
    the mistake (clean) first; steps cycle through them (dropout samples captured per edit)."""

    cached = True

    def __init__(self, tail: Callable, act: nn.Module, gated: bool, batches, labels: torch.Tensor,
                 positions: list[int], refresh: int):
        self.tail, self.act, self.gated, self.refresh = tail, act, gated, refresh
        self.dtype = batches[0][1].dtype
        self.batches = [(q.float(), resid, y) for q, resid, y in batches]
        self.clean = tuple(t[0] for t in batches[0])  # the mistake alone, in the model's dtype: (J, d)
        self.n_main = labels.shape[0]
        self.labels = labels.repeat(batches[0][0].shape[0])
        device = labels.device
        self.pos = torch.tensor(positions, dtype=torch.long, device=device)
        self.neuron = torch.arange(len(positions), device=device)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's inputs: one dropout round's (q, resid, y); steps cycle through them."""
        return self.batches[step % len(self.batches)]

    def __call__(self, params: Params, q: torch.Tensor, resid: torch.Tensor, y: torch.Tensor) -> StepOut:
        z, delta = contribution(params, q, self.act, self.gated)  # (R, J, n), (R, J, d)
        logits = self.tail((y + delta.to(y.dtype)).flatten(0, 1), resid.flatten(0, 1))
        return StepOut(logits.float(), self.labels, z[:, self.pos, self.neuron], self._fixed(params, logits))

    @torch.no_grad()
    def evaluate(self, params: Params) -> StepOut:
        """The mistake alone, without dropout (a validation)."""
        q, resid, y = self.clean
        z, delta = contribution(params, q.float(), self.act, self.gated)
        logits = self.tail(y + delta.to(y.dtype), resid)
        return StepOut(logits.float(), self.labels[: self.n_main], z[self.pos, self.neuron][None],
                       self._fixed(params, logits))

    def _fixed(self, params: Params, logits: torch.Tensor) -> torch.Tensor:
        n = self.n_main
        if self.dtype != torch.float32:  # as the model will compute it: the neurons rounded, its dtype throughout
            with torch.no_grad():
                q, resid, y = self.clean
                _, delta = contribution(rounded(params, self.dtype), q, self.act, self.gated)
                logits = self.tail(y + delta, resid)
        return (logits[:n].detach().argmax(-1) == self.labels[:n]).all()


class FullStep:
    """The reference step: the neurons live in the model, which runs in full on the batch (the
    mistake repeated with dropout on, and its paraphrases); "fixed" is checked in eval mode, at
    every step when ``fixed_every_step`` (our stopping rules), otherwise only by ``evaluate``."""

    cached, refresh = False, 1

    def __init__(self, ffn: PatchedFFN, forward: Callable, gated: bool, items: list[Encoded], main: Encoded,
                 positions: list[int], device: torch.device, fixed_every_step: bool = True):
        self.ffn, self.forward, self.gated, self.items, self.main = ffn, forward, gated, items, main
        self.fixed_every_step = fixed_every_step
        self.positions = positions
        self.labels = labels_of(items, device)
        self.main_labels = labels_of([main], device)
        self.neuron = torch.arange(len(positions), device=device)

    def batch(self, step: int) -> tuple:
        """Nothing: the model draws fresh dropout masks at every step itself."""
        return ()

    def __call__(self, params: Params) -> StepOut:
        logits, z_rows = self._run(params, self.items, train=True)
        fixed = self.evaluate(params).fixed if self.fixed_every_step else torch.zeros((), dtype=torch.bool,
                                                                                       device=logits.device)
        return StepOut(logits.float(), self.labels, z_rows, fixed)

    @torch.no_grad()
    def evaluate(self, params: Params) -> StepOut:
        """The mistake alone in eval mode (no dropout): a validation."""
        logits, z_rows = self._run(params, [self.main], train=False)
        return StepOut(logits.float(), self.main_labels, z_rows, (logits.argmax(-1) == self.main_labels).all())

    def _run(self, params: Params, items: list[Encoded], train: bool):
        names = [("key", "bias")] + ([("up", "up_bias")] if self.gated else [])
        self.ffn.set_live([params[w] for w, _ in names], [params[b] for _, b in names], params["value"] * params["amp"])
        try:
            store, logits = self.forward(items, train=train, grad=train)
        finally:
            self.ffn.set_live(None)
        q = gather_positions(store["q"], items).view(len(items), -1, self.ffn.d_model).float()
        z = preactivation(params, q[:, self.positions])  # (R, n, n)
        return logits, z[:, self.neuron, self.neuron]
