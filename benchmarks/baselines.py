"""The fine-tuning baselines for Sequential Model Editing: FT and FT+KL (the paper's), and
LocFT-BF-style breadth-first fine-tuning over every edit so far.

All three fine-tune a few of the model's own weights, starting every edit from the weights the
previous edits left (no reset between edits), with a fresh Adam per edit:

* ``ft`` (depth-first, the paper's FT): train on the new mistake alone (plus the equivalents the
  harness chooses to train on), one optimiser step per forward pass, until the mistake is fixed
  or ``max_steps`` steps have run. The task loss is cross-entropy on the label, or on every
  target token under teacher forcing.
* ``ftkl``: the same plus ``kl_weight * KL(p_base || p_current)`` on a random batch of
  ``kl_batch`` memory inputs (in-distribution, unrelated to the edits) at every step. For
  classifiers the KL is over the label distribution; for generators over the next-token
  distribution at the last position of each memory prompt (the answer position), so the base
  distributions (of a pool of ``kl_pool`` inputs) can be kept in memory.
* ``locft-bf`` (``breadth_first=True``; after arXiv 2509.22072, "Fine-tuning Done Right in
  Model Editing"): the training set is *every* edit requested so far, the new one appended. Each
  edit runs epochs over that set: the accumulated edits are shuffled (seeded) and walked in
  mini-batches of ``batch_size`` edits (each with its trained equivalents), one optimiser step per
  mini-batch on the mean cross-entropy of the batch plus the same KL-to-base term on memory
  inputs as ``ftkl``. Before each epoch every accumulated edit is checked; training stops when
  all are right, and no new epoch starts once ``max_steps`` steps have run (the first epoch
  always runs in full, so every accumulated edit is trained on at every edit). ``layers`` last
  layers are trained (the FFN of each, by default). An edit already right when requested still
  joins the set, so later training keeps it right. When a whole epoch is one mini-batch the
  training forward pass also gives the check, exactly as ``ft`` does: ``ft`` *is* this loop with
  a training set of one edit.

What is trained (``scope``, ``layers``): ``"ffn"`` (default) = the weights and biases of the
feed-forward blocks of the last ``layers`` layers (``layers=1``: the module Transformer-Patcher
widens, ``patcher.families``); ``"layer"`` = every parameter of those layers. Everything else is
frozen. The model runs in eval mode (no dropout) so that one forward pass gives both the loss
and the "fixed yet?" check; "fixed" is the argmax definition of ``patcher.target_correct``, on the
answer followed by a stop token for decoder-only models (``train_stop``, as the patcher trains them:
greedy generation then gives the answer and stops, which is how the harness judges it).

The same interface as ``patcher.Editor`` where the harness needs it: ``edit(EditRequest)``
returning a ``patcher.EditResult`` (``neurons`` is always 0). ``trained_ids`` records, per
``edit`` call, the edit ids trained on. Every tensor is built on the model's device.
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
from patcher.encoding import Encoded, choose_stop, collate, encode, gather_positions, labels_of, pad_id, stop_ids
from patcher.families import get_path, resolve_family
from patcher.predict import model_device


@dataclass
class FTConfig:
    lr: float = 1e-4
    max_steps: int = 50  # depth-first: per edit; breadth-first: no new epoch starts after this many
    scope: str = "ffn"  # "ffn": the FFN of the last `layers` layers; "layer": those whole layers
    layers: int = 1  # how many of the last layers are trained
    weight_decay: float = 0.0
    kl_weight: float = 0.0  # > 0: the KL-to-base locality term (FT+KL, LocFT-BF)
    kl_batch: int = 8  # memory inputs per step for the KL term
    kl_pool: int = 512  # memory inputs whose base distributions are kept
    breadth_first: bool = False  # True: LocFT-BF, train on every edit so far
    batch_size: int = 16  # breadth-first: edits per mini-batch
    train_stop: bool = True  # decoder-only: the answer is followed by a stop token, as the patcher trains it
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Edit:
    """One requested edit, encoded: the mistake first, then the equivalents trained on."""

    id: str
    items: list[Encoded]


def _layer_paths(path: str, layers: int) -> list[str]:
    """The dotted paths of the last ``layers`` layers (the family's path names the last with -1)."""
    return [path.replace("-1", f"-{k}", 1) for k in range(layers, 0, -1)]


def trainable_parameters(model: nn.Module, scope: str = "ffn", layers: int = 1) -> list[nn.Parameter]:
    """The parameters FT trains: the FFN projections, or every parameter, of the last ``layers`` layers."""
    if scope not in ("ffn", "layer"):
        raise ValueError(f"scope must be 'ffn' or 'layer', got {scope!r}")
    family = resolve_family(model)
    count = len(get_path(model, family.layer.partition(".-1")[0])) if ".-1" in family.layer else 1
    if not 1 <= layers <= count:
        raise ValueError(f"layers must be between 1 and {count} (the model's layers), got {layers}")
    params: list[nn.Parameter] = []
    for path in _layer_paths(family.layer, layers):
        layer = get_path(model, path)
        if scope == "layer":
            params.extend(layer.parameters())
            continue
        for name in (*family.ffn_in, family.ffn_out):
            params.extend(get_path(layer, name).parameters())
    return params


class FineTuner:
    """Fine-tuning on the mistakes (FT, or LocFT-BF with ``breadth_first``), optionally with a
    KL-to-base term on memory inputs (FT+KL, LocFT-BF)."""

    def __init__(self, model: nn.Module, tokenizer, config: FTConfig | None = None, kl_texts: Sequence[str] = ()):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or FTConfig()
        if self.config.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.config.batch_size}")
        self.family = resolve_family(model)
        self.task = self.family.task
        self.device = model_device(model)
        model.requires_grad_(False)
        model.eval()
        self.params = trainable_parameters(model, self.config.scope, self.config.layers)
        for p in self.params:
            p.requires_grad_(True)
        self._rng = random.Random(self.config.seed)
        self._stops = stop_ids(model, tokenizer, self.family) if self.config.train_stop else []
        self.edits: list[_Edit] = []  # breadth-first: every edit requested so far
        self.trained_ids: list[list[str]] = []  # per edit call: the edit ids trained on
        self.kl_items: list[Encoded] = []
        self.kl_base: torch.Tensor | None = None
        if self.config.kl_weight > 0:
            texts = [t for t in kl_texts if isinstance(t, str) and t.strip()]
            if not texts:
                raise ValueError("the KL term needs memory texts (kl_texts)")
            rng = random.Random(f"ftkl-pool:{self.config.seed}")
            texts = rng.sample(texts, min(self.config.kl_pool, len(texts)))
            self.kl_items = [self._encode_memory(t) for t in texts]
            with torch.no_grad():
                chunks = [self._logits(self.kl_items[i : i + 32]).log_softmax(-1)
                          for i in range(0, len(self.kl_items), 32)]
            self.kl_base = torch.cat(chunks)

    @property
    def trained_parameter_count(self) -> int:
        return sum(p.numel() for p in self.params)

    # ------------------------------------------------------------------ helpers
    def _encode_edit(self, request: EditRequest) -> _Edit:
        """The mistake and its equivalents; a decoder-only answer ends with the stop the model
        ranks highest after it now (``patcher.encoding.choose_stop``, as the patcher does)."""
        stop = self._stops[0] if self._stops else None
        items = [encode(self.model, self.tokenizer, self.family, text, request.target, stop)
                 for text in [request.input, *(request.equivalents or [])]]
        if self._stops:
            with torch.no_grad():
                choose_stop(items, self._logits(items[:1])[len(items[0].labels) - 1], self._stops)
        return _Edit(request.id, items)

    def _encode_memory(self, text: str) -> Encoded:
        enc = encode(self.model, self.tokenizer, self.family, text)
        if self.task == "generation":  # KL at the last position only (the answer position of a prompt)
            enc = Encoded(enc.inputs, [enc.positions[-1]], [-100])
        return enc

    def _logits(self, items: list[Encoded]) -> torch.Tensor:
        out = self.model(**collate(items, pad_id(self.tokenizer), device=self.device)).logits
        return out if self.task == "classification" else gather_positions(out, items)

    @staticmethod
    def _flatten(edits: list[_Edit]) -> tuple[list[Encoded], list[int]]:
        """Every edit's items in order, and the index of each edit's mistake among them."""
        items, mains = [], []
        for e in edits:
            mains.append(len(items))
            items.extend(e.items)
        return items, mains

    def _right(self, items: list[Encoded], mains: list[int], logits: torch.Tensor, labels: torch.Tensor) -> list[bool]:
        """Per edit: every target position of its mistake is the argmax."""
        hits = (logits.detach().argmax(-1) == labels).split([len(it.labels) for it in items])
        return torch.stack([hits[i].all() for i in mains]).tolist()

    @torch.no_grad()
    def _check(self, edits: list[_Edit], chunk: int = 32) -> list[bool]:
        out: list[bool] = []
        for start in range(0, len(edits), chunk):
            items = [e.items[0] for e in edits[start : start + chunk]]
            out += self._right(items, list(range(len(items))), self._logits(items), labels_of(items, self.device))
        return out

    def _kl(self) -> torch.Tensor:
        idx = self._rng.sample(range(len(self.kl_items)), min(self.config.kl_batch, len(self.kl_items)))
        cur = self._logits([self.kl_items[i] for i in idx]).log_softmax(-1)
        return F.kl_div(cur, self.kl_base[idx], log_target=True, reduction="batchmean")

    def _epoch(self, n: int) -> list[list[int]]:
        """Mini-batches of edit indices for one epoch: all of them in order when they fit in one
        (always, depth-first), else shuffled."""
        if not self.config.breadth_first or n <= self.config.batch_size:
            return [list(range(n))]
        order = list(range(n))
        self._rng.shuffle(order)
        size = self.config.batch_size
        return [order[i : i + size] for i in range(0, n, size)]

    # ------------------------------------------------------------------ editing
    def _step(self, opt: torch.optim.Optimizer, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step on the edit loss (plus the KL term); the losses, for the record."""
        loss = l_edit = F.cross_entropy(logits, labels)
        losses = {"edit": float(l_edit.detach())}
        if self.config.kl_weight > 0:
            l_kl = self._kl()
            loss = loss + self.config.kl_weight * l_kl
            losses["kl"] = float(l_kl.detach())
        losses["total"] = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return losses

    def edit(self, request: EditRequest) -> EditResult:
        t0 = time.perf_counter()
        c = self.config
        new = self._encode_edit(request)
        if c.breadth_first:
            self.edits.append(new)
        edits = self.edits if c.breadth_first else [new]
        trained: dict[str, None] = {}  # edit ids in the order first trained on
        opt = torch.optim.Adam(self.params, lr=c.lr, weight_decay=c.weight_decay)
        steps, losses, right, done = 0, {}, [False] * len(edits), False
        while not done:
            batches = self._epoch(len(edits))
            fused = len(batches) == 1  # the training forward pass is also the check
            if not fused:
                right = self._check(edits)
                if all(right) or steps >= c.max_steps:
                    break
            for idx in batches:
                items, mains = self._flatten([edits[i] for i in idx])
                labels = labels_of(items, self.device)
                logits = self._logits(items)
                if fused:  # idx is every edit, in order
                    right = self._right(items, mains, logits, labels)
                    if all(right) or steps >= c.max_steps:
                        done = True
                        break
                losses = self._step(opt, logits, labels)
                steps += 1
                trained.update(dict.fromkeys(edits[i].id for i in idx))
        self.trained_ids.append(list(trained))
        fixed, seconds = right[-1], time.perf_counter() - t0
        if steps == 0 and all(right):
            return EditResult(request.id, fixed=True, already_correct=True, seconds=seconds,
                              message="already correct: nothing trained")
        if c.breadth_first:
            losses["edits_right"] = sum(right) / len(right)
        return EditResult(request.id, fixed=fixed, steps=steps, seconds=seconds, losses=losses,
                          message="" if fixed else f"not fixed after {steps} steps (weights changed anyway)")


def ft(model, tokenizer, config: FTConfig | None = None) -> FineTuner:
    return FineTuner(model, tokenizer, config or FTConfig())


def ftkl(model, tokenizer, kl_texts: Sequence[str], config: FTConfig | None = None) -> FineTuner:
    config = config or FTConfig(kl_weight=1.0)
    if config.kl_weight <= 0:
        raise ValueError("FT+KL needs kl_weight > 0")
    return FineTuner(model, tokenizer, config, kl_texts=kl_texts)
