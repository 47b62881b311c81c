"""The paper's fine-tuning baselines for Sequential Model Editing: FT and FT+KL.

Both fine-tune the model on each mistake in turn, starting every edit from the weights the
previous edits left (no reset between edits), with a fresh Adam per edit, until the mistake is
fixed or ``max_steps`` optimiser steps have run:

* ``ft``: the task loss (cross-entropy on the label, or on every target token under teacher
  forcing) on the mistake (plus the equivalents the harness chooses to train on);
* ``ftkl``: the same plus ``kl_weight * KL(p_base || p_current)`` on a random batch of memory
  inputs (in-distribution, unrelated to the edit) at every step. For classifiers the KL is over
  the label distribution; for generators over the next-token distribution at the last position
  of each memory prompt (the answer position), so the base distributions can be kept in memory.

What is trained (``scope``): ``"ffn"`` (default) = the weights and biases of the last layer's
feed-forward block — the same module Transformer-Patcher widens (``patcher.families``);
``"layer"`` = every parameter of the last layer (attention, norms, FFN). Everything else is
frozen. The model runs in eval mode (no dropout) so that one forward pass gives both the loss
and the "fixed yet?" check; "fixed" is the argmax definition of ``patcher.target_correct``.

The same interface as ``patcher.Editor`` where the harness needs it: ``edit(EditRequest)``
returning a ``patcher.EditResult`` (``neurons`` is always 0). Every tensor is built on the model's
device.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patcher import EditRequest, EditResult
from patcher.encoding import Encoded, collate, encode, gather_positions, labels_of, pad_id
from patcher.families import get_path, resolve_family
from patcher.predict import model_device


@dataclass
class FTConfig:
    lr: float = 1e-4
    max_steps: int = 50
    scope: str = "ffn"  # "ffn": last FFN only; "layer": the whole last layer
    weight_decay: float = 0.0
    kl_weight: float = 0.0  # > 0: FT+KL
    kl_batch: int = 8  # memory inputs per step for the KL term
    kl_pool: int = 512  # memory inputs whose base distributions are kept
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(model: nn.Module, scope: str = "ffn") -> list[nn.Parameter]:
    """The parameters FT trains: the last FFN's projections, or the whole last layer."""
    family = resolve_family(model)
    layer = get_path(model, family.layer)
    if scope == "layer":
        return list(layer.parameters())
    if scope != "ffn":
        raise ValueError(f"scope must be 'ffn' or 'layer', got {scope!r}")
    params: list[nn.Parameter] = []
    for name in (*family.ffn_in, family.ffn_out):
        params.extend(get_path(layer, name).parameters())
    return params


class FineTuner:
    """Sequential fine-tuning on each mistake (FT), optionally regularised by KL to the base (FT+KL)."""

    def __init__(self, model: nn.Module, tokenizer, config: FTConfig | None = None, kl_texts: Sequence[str] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or FTConfig()
        self.family = resolve_family(model)
        self.task = self.family.task
        self.device = model_device(model)
        model.requires_grad_(False)
        model.eval()
        self.params = trainable_parameters(model, self.config.scope)
        for p in self.params:
            p.requires_grad_(True)
        self._rng = random.Random(self.config.seed)
        self.kl_items: list[Encoded] = []
        self.kl_base: torch.Tensor | None = None
        if self.config.kl_weight > 0:
            texts = [t for t in kl_texts if isinstance(t, str) and t.strip()]
            if not texts:
                raise ValueError("FT+KL needs memory texts (kl_texts) for its KL term")
            rng = random.Random(f"ftkl-pool:{self.config.seed}")
            texts = rng.sample(texts, min(self.config.kl_pool, len(texts)))
            self.kl_items = [self._encode_memory(t) for t in texts]
            with torch.no_grad():
                chunks = [self._kl_logits(self.kl_items[i : i + 32]).log_softmax(-1)
                          for i in range(0, len(self.kl_items), 32)]
            self.kl_base = torch.cat(chunks)

    @property
    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str, target) -> Encoded:
        return encode(self.model, self.tokenizer, self.family, text, target)

    def _encode_memory(self, text: str) -> Encoded:
        enc = encode(self.model, self.tokenizer, self.family, text)
        if self.task == "generation":  # KL at the last position only (the answer position of a prompt)
            enc = Encoded(enc.inputs, [enc.positions[-1]], [-100])
        return enc

    def _logits(self, items: list[Encoded]) -> torch.Tensor:
        out = self.model(**collate(items, pad_id(self.tokenizer), device=self.device)).logits
        return out if self.task == "classification" else gather_positions(out, items)

    _kl_logits = _logits

    # ------------------------------------------------------------------ editing
    def edit(self, request: EditRequest) -> EditResult:
        t0 = time.perf_counter()
        c = self.config
        main = self._encode(request.input, request.target)
        items = [main]
        for eq in request.equivalents or []:
            items.append(self._encode(eq, request.target))
        labels = labels_of(items, self.device)
        n_main = len(main.labels)
        opt = torch.optim.Adam(self.params, lr=c.lr, weight_decay=c.weight_decay)
        steps, losses, fixed = 0, {}, False
        for step in range(c.max_steps + 1):
            logits = self._logits(items)
            fixed = bool((logits[:n_main].argmax(-1) == labels[:n_main]).all())
            if fixed:
                if step == 0:
                    return EditResult(request.id, fixed=True, already_correct=True,
                                      seconds=time.perf_counter() - t0, message="already correct: nothing trained")
                break
            if step == c.max_steps:
                break
            loss = l_edit = F.cross_entropy(logits, labels)
            losses = {"edit": float(l_edit.detach())}
            if c.kl_weight > 0:
                idx = self._rng.sample(range(len(self.kl_items)), min(c.kl_batch, len(self.kl_items)))
                cur = self._kl_logits([self.kl_items[i] for i in idx]).log_softmax(-1)
                base = self.kl_base[idx]
                l_kl = F.kl_div(cur, base, log_target=True, reduction="batchmean")
                loss = loss + c.kl_weight * l_kl
                losses["kl"] = float(l_kl.detach())
            losses["total"] = float(loss.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        return EditResult(request.id, fixed=fixed, steps=steps, seconds=time.perf_counter() - t0, losses=losses,
                          message="" if fixed else f"not fixed after {steps} steps (weights changed anyway)")


def ft(model, tokenizer, config: FTConfig | None = None) -> FineTuner:
    return FineTuner(model, tokenizer, config or FTConfig())


def ftkl(model, tokenizer, kl_texts: Sequence[str], config: FTConfig | None = None) -> FineTuner:
    config = config or FTConfig(kl_weight=1.0)
    if config.kl_weight <= 0:
        raise ValueError("FT+KL needs kl_weight > 0")
    return FineTuner(model, tokenizer, config, kl_texts=kl_texts)
