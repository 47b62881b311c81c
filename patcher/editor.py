"""Transformer-Patcher: fix one mistake by adding and training one neuron (per wrong token).

The base model is frozen. For each mistake we add neurons to the last FFN and train only them,
with the edit loss (the right output), the activation loss (fire on the mistake and its
paraphrases) and the memory loss (stay below the edit, and below -margin, on the cached queries
of unrelated inputs and of every earlier edit) — DESIGN §3.

Why it is fast (DESIGN §4): nothing before the last FFN depends on the patch, so one forward
pass captures, at each query position, the FFN input ``q``, the residual and the FFN output.
A training step then only evaluates the new neurons, the rest of the last layer and the head on
those cached vectors. The memory term scores a candidate subset of the memory (the rows nearest
to firing, refreshed every few steps, and checked in full before the edit is accepted).
``PatcherConfig(cached=False)`` keeps the reference procedure: a full forward every step.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .encoding import Encoded, collate, encode, gather_positions, pad_id
from .errors import PatchError
from .families import Family, get_path, resolve_family
from .layer import PatchBlock, PatchedFFN
from .predict import predict, target_correct


class PatcherConfig(BaseModel):
    """Hyperparameters; the defaults are the reference's (DESIGN §3) unless noted."""

    model_config = ConfigDict(extra="forbid")

    memory_size: int = Field(40_000, gt=0, description="cached queries of unrelated inputs")
    val_memory_fraction: float = Field(0.1, ge=0, lt=1, description="held out for early stopping")
    max_steps: int = Field(2000, gt=0)
    lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    batch_size: int = Field(8, ge=1, description="the edit repeated with dropout on")
    dropout_rounds: int = Field(0, ge=0, description="cached mode: dropout samples of the batch (paraphrases included) "
                                "captured per edit; 0: one sample of the edit alone (ours)")
    amplifier: float = 10.0
    act_margin: float = 0.0
    act_topk: int = 5
    memory_margin: float = 3.0
    memory_topk: int = 1000
    act_loss_weight: float = 1.0
    memory_loss_weight: float | None = Field(None, description="None: 5 for classification, 10 for generation")
    entropy_weight: float = Field(0.1, description="binary classification: edit loss adds -w * entropy")
    label_smoothing: float = Field(0.1, description="generation edit loss")
    max_neurons_per_edit: int = Field(5, ge=1, description="generation: neurons for the first wrong tokens")
    leak_tol: float = Field(0.05, ge=0, description="stop once fixed and no memory query can get more than this share "
                            "of the patch's output on its mistake (ours)")
    patience: int = Field(50, ge=1, description="steps without validation-memory improvement once fixed")
    fixed_patience: int = Field(500, ge=1, description="at most this many steps after the edit is first fixed (ours)")
    train_on_equivalents: bool = True
    cached: bool = Field(True, description="False: reference-faithful full forward at every step")
    memory_candidates: int = Field(4096, gt=0, description="cached mode: memory rows scored between refreshes")
    memory_refresh: int = Field(10, gt=0, description="cached mode: steps between full memory scans")
    max_new_tokens: int = 16
    seed: int = 0

    def memory_weight(self, task: str) -> float:
        if self.memory_loss_weight is not None:
            return self.memory_loss_weight
        return 5.0 if task == "classification" else 10.0


@dataclass
class EditRequest:
    """One logged mistake: the input, what it should give, and paraphrases that must give it too."""

    id: str
    input: str
    target: int | str
    equivalents: list[str] = field(default_factory=list)


@dataclass
class EditResult:
    id: str
    fixed: bool
    already_correct: bool = False
    steps: int = 0
    seconds: float = 0.0
    neurons: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""


@dataclass
class Captured:
    """Cached vectors at the query positions: FFN input, residual, FFN output, and the logits."""

    q: torch.Tensor
    resid: torch.Tensor
    y: torch.Tensor
    logits: torch.Tensor


def _edit_seed(seed: int, edit_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{edit_id}".encode()).hexdigest()[:8], 16)


def _topk_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest entries along dim 0, per column: (N, n) -> (n,)."""
    if k >= values.shape[0]:
        return values.mean(0)
    return values.topk(max(1, k), dim=0).values.mean(0)


class Editor:
    """Edits a Hugging Face model in place, one mistake at a time."""

    def __init__(self, model: nn.Module, tokenizer, config: PatcherConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or PatcherConfig()
        self.family: Family = resolve_family(model)
        self.task = self.family.task
        model.requires_grad_(False)
        model.eval()
        self.ffn = PatchedFFN.of(model, self.family)
        ref = self.ffn.out.weight
        self.memory = ref.new_zeros(0, self.ffn.d_model)
        self.val_memory = ref.new_zeros(0, self.ffn.d_model)
        self._pre_norm = get_path(self.ffn.layer, self.family.pre_norm) if self.family.pre_norm else None
        self._post_norm = get_path(self.ffn.layer, self.family.post_norm) if self.family.post_norm else None
        self._final_norm = get_path(model, self.family.final_norm) if self.family.final_norm else None
        self._fingerprint: str | None = None
        self._env: tuple[torch.Tensor, torch.Tensor] | None = None
        self._has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()) or any(
            isinstance(getattr(model.config, k, 0), float) and getattr(model.config, k) > 0
            for k in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop", "dropout_rate", "dropout"))

    # ------------------------------------------------------------------ queries and memory
    @contextmanager
    def _hooks(self, store: dict):
        handles = [
            self.ffn.ins[0].register_forward_pre_hook(lambda m, a: store.__setitem__("q", a[0])),
            self.ffn.out.register_forward_hook(lambda m, a, o: store.__setitem__("y", o)),
        ]
        if self._pre_norm is not None:
            handles.append(self._pre_norm.register_forward_pre_hook(lambda m, a: store.__setitem__("resid", a[0])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _forward(self, items: list[Encoded], train: bool = False, grad: bool = False) -> tuple[dict, torch.Tensor]:
        store: dict = {}
        self.model.train(train)
        try:
            with self._hooks(store), torch.set_grad_enabled(grad):
                logits = self.model(**collate(items, pad_id(self.tokenizer))).logits
        finally:
            self.model.eval()
        if self.task == "generation":
            logits = gather_positions(logits, items)
        return store, logits

    def capture(self, items: list[Encoded], train: bool = False) -> Captured:
        """One forward pass; the vectors the cached training loop needs, at the query positions."""
        store, logits = self._forward(items, train=train)
        q = gather_positions(store["q"], items)
        resid = gather_positions(store["resid"], items) if "resid" in store else q
        return Captured(q.detach(), resid.detach(), gather_positions(store["y"], items).detach(), logits.detach())

    def _encode(self, text: str, target=None) -> Encoded:
        return encode(self.model, self.tokenizer, self.family, text, target)

    @torch.no_grad()
    def build_memory(self, texts: Sequence[str], batch_size: int = 32) -> int:
        """Cache the queries of unrelated inputs (once); returns the number of memory queries."""
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise PatchError("build_memory needs at least one non-empty text")
        chunks = []
        for start in range(0, len(texts), batch_size):
            items = [self._encode(t) for t in texts[start : start + batch_size]]
            chunks.append(self.capture(items).q)
        queries = torch.cat(chunks)
        gen = torch.Generator().manual_seed(self.config.seed)
        if queries.shape[0] > self.config.memory_size:
            queries = queries[torch.randperm(queries.shape[0], generator=gen)[: self.config.memory_size]]
        order = torch.randperm(queries.shape[0], generator=gen)
        n_val = int(round(queries.shape[0] * self.config.val_memory_fraction))
        if queries.shape[0] > 1:
            n_val = max(1, n_val) if self.config.val_memory_fraction > 0 else 0
        self.val_memory = queries[order[:n_val]].clone()
        self.memory = torch.cat([self.memory, queries[order[n_val:]]])
        return int(self.memory.shape[0] + self.val_memory.shape[0])

    @torch.no_grad()
    def remember(self, requests: Sequence[EditRequest]) -> int:
        """Add the queries of earlier edits to the memory, so new patches stay silent on them.

        Used when patches come from a saved patch set (a new night, a resumed run) rather than
        from ``edit`` in this process. Requests that fail to encode are skipped (they were checked
        when they were first edited)."""
        items = []
        for r in requests:
            try:
                items.append(self._encode(r.input, r.target))
            except PatchError:
                continue
        for start in range(0, len(items), 32):
            self.memory = torch.cat([self.memory, self.capture(items[start : start + 32]).q])
        return len(items)

    # ------------------------------------------------------------------ predictions
    def predict(self, texts: Sequence[str]) -> list[str]:
        return predict(self.model, self.tokenizer, texts, max_new_tokens=self.config.max_new_tokens)

    def is_correct(self, text: str, target) -> bool:
        return target_correct(self.model, self.tokenizer, [text], [target])[0]

    # ------------------------------------------------------------------ the tail of the model
    def _logits_from(self, y: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the FFN output at cached positions: residual, norms, head. (N, d) -> (N, C)."""
        if self._post_norm is not None:
            h = self._post_norm(y + resid)
        else:
            h = resid + y
        if self._final_norm is not None:
            h = self._final_norm(h)
        return self.family.head(self.model, h)

    def _edit_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "generation":
            return F.cross_entropy(logits, labels, label_smoothing=self.config.label_smoothing)
        loss = F.cross_entropy(logits, labels)
        if logits.shape[-1] == 2 and self.config.entropy_weight:
            p = logits.softmax(-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            loss = loss - self.config.entropy_weight * entropy
        return loss

    # ------------------------------------------------------------------ editing
    def edit(self, request: EditRequest) -> EditResult:
        """Fix one mistake. Already right: nothing added. Not fixable: nothing left behind."""
        t0 = time.perf_counter()
        if not isinstance(request.id, str) or not request.id:
            raise PatchError("edit id must be a non-empty string")
        if request.id in self.ffn.edit_ids():
            raise PatchError(f"edit {request.id!r} is already patched into this model")
        main = self._encode(request.input, request.target)
        variants = [main]
        if self.config.train_on_equivalents:
            for eq in request.equivalents or []:
                enc = self._encode(eq, request.target)
                if len(enc.labels) == len(main.labels):
                    variants.append(enc)
        cap = self.capture(variants)
        labels = torch.tensor(main.labels)
        n_pos = len(main.labels)
        wrong = (cap.logits[:n_pos].argmax(-1) != labels).nonzero().flatten().tolist()
        if not wrong:
            return EditResult(request.id, fixed=True, already_correct=True, seconds=time.perf_counter() - t0,
                              message="already correct: nothing added")
        positions = wrong[: self.config.max_neurons_per_edit] if self.task == "generation" else [0]

        seed = _edit_seed(self.config.seed, request.id)
        batches = self._training_batches(cap, main, variants, n_pos, seed)
        all_labels = labels.repeat(batches[0][0].shape[0])
        params = self._init_neurons(cap.q[positions], seed)
        steps, losses = self._train(params, positions, batches, all_labels, variants, main)
        block = self._block(request.id, params)
        self.ffn.add(block)
        fixed = self.is_correct(request.input, request.target)
        if not fixed:
            self.ffn.remove(request.id)
            return EditResult(request.id, fixed=False, steps=steps, seconds=time.perf_counter() - t0,
                              losses=losses, message=f"not fixed after {steps} steps: no neuron kept")
        self.memory = torch.cat([self.memory, cap.q])
        return EditResult(request.id, fixed=True, steps=steps, seconds=time.perf_counter() - t0,
                          neurons=block.neurons, losses=losses)

    def edit_stream(self, requests: Iterable[EditRequest], progress: bool = True) -> list[EditResult]:
        requests = list(requests)
        results = []
        from tqdm.auto import tqdm

        for request in tqdm(requests, desc="patching", unit="edit", disable=not progress):
            results.append(self.edit(request))
        return results

    def _init_neurons(self, q_edit: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Keys start at q/|q|^2 (pre-activation 1 on the mistake), values random times an amplifier."""
        gen = torch.Generator().manual_seed(seed)
        n, d_out = q_edit.shape[0], self.ffn.d_out
        key = q_edit / q_edit.pow(2).sum(-1, keepdim=True)
        params = {
            "key": key.clone(),
            "bias": key.new_zeros(n),
            "value": (torch.randn(n, d_out, generator=gen) / math.sqrt(d_out)).to(key),
            "amp": key.new_full((n, 1), self.config.amplifier),
        }
        if self.family.gated:
            params["up"] = key.clone()
            params["up_bias"] = key.new_zeros(n)
        return {k: v.requires_grad_(True) for k, v in params.items()}

    def _contribution(self, params, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-activations z, added FFN output) of the new neurons for queries q (..., d)."""
        z = q @ params["key"].T + params["bias"]
        a = self.ffn.act(z)
        if self.family.gated:
            a = a * (q @ params["up"].T + params["up_bias"])
        return z, a @ (params["value"] * params["amp"])

    def _memory_loss(self, zm: torch.Tensor, z_edit: torch.Tensor) -> torch.Tensor:
        if zm.shape[0] == 0:
            return zm.new_zeros(())
        m, k = self.config.memory_margin, self.config.memory_topk
        return _topk_mean(torch.exp(zm - z_edit + m), k).mean() + _topk_mean(torch.exp(zm + m), k).mean()

    def _top_memory_z(self, params, candidates: torch.Tensor, z_candidates: torch.Tensor) -> torch.Tensor:
        """(k, n) pre-activations of each neuron's top-k memory rows, with gradient.

        Both memory terms increase with z, so only each neuron's k highest rows enter the loss:
        they are picked from ``z_candidates`` (computed without gradient) and only they are
        recomputed with it (DESIGN §4)."""
        k = min(self.config.memory_topk, candidates.shape[0])
        idx = z_candidates.topk(k, dim=0).indices  # (k, n)
        rows = candidates.index_select(0, idx.flatten()).view(*idx.shape, -1)  # (k, n, d)
        return torch.einsum("knd,nd->kn", rows, params["key"]) + params["bias"]

    def _act_loss(self, z_rows: torch.Tensor) -> torch.Tensor:
        """z_rows: (R, n) pre-activation of neuron i on the rows' query at its own position."""
        c = self.config
        return _topk_mean(torch.exp(c.act_margin - z_rows), c.act_topk).mean()

    def _envelope(self, z: torch.Tensor) -> torch.Tensor:
        """max |act(z')| over z' <= z: the most a neuron can pass to any input at or below z."""
        if self._env is None:
            grid = torch.linspace(-30.0, 30.0, 6001, dtype=z.dtype)
            self._env = (grid, self.ffn.act(grid).abs().cummax(0).values)
        grid, env = self._env
        idx = torch.searchsorted(grid, z.contiguous()).clamp(max=len(grid) - 1)
        return torch.where(z > grid[-1], self.ffn.act(z).abs(), env[idx])

    def _gain(self, params, queries: torch.Tensor) -> torch.Tensor:
        """(N, n): the most each neuron can pass to each query (up to the value vector): the
        activation's envelope at its pre-activation, times |up . q| for gated FFNs."""
        gain = self._envelope(queries @ params["key"].T + params["bias"])
        if self.family.gated:
            gain = gain * (queries @ params["up"].T + params["up_bias"]).abs()
        return gain

    def leak(self, params, q_edit: torch.Tensor, *memories: torch.Tensor) -> float:
        """Largest share of a neuron's output on its mistake (``q_edit``: (n, d), one query per
        neuron) that it can pass to any query of ``memories``; 0 when they are empty."""
        gains = [self._gain(params, m).max(0).values for m in memories if m.shape[0]]
        if not gains:
            return 0.0
        z_e = (q_edit * params["key"]).sum(-1) + params["bias"]
        own = self.ffn.act(z_e).abs()
        if self.family.gated:
            own = own * ((q_edit * params["up"]).sum(-1) + params["up_bias"]).abs()
        return float((torch.stack(gains).max(0).values / own.clamp_min(1e-12)).max())

    def _training_batches(self, cap: Captured, main: Encoded, variants: list[Encoded], n_pos: int, seed: int):
        """Cached mode: the (q, resid, y) rows each step trains on, shaped (R, n_pos, d).

        Every batch holds the mistake and its paraphrases without dropout. With dropout in the
        model, each of ``dropout_rounds`` batches adds a dropout sample of the reference's batch
        (the mistake ``batch_size - 1`` more times, the paraphrases once); steps cycle through
        them, as the reference draws fresh masks at every step."""
        c = self.config
        clean = (cap.q, cap.resid, cap.y)
        rounds = [clean]
        if c.cached and self._has_dropout:
            # 0 rounds: one dropout sample of the edit alone (the behaviour before dropout_rounds)
            noisy = [main] * (c.batch_size - 1) + (variants[1:] if c.dropout_rounds > 0 else [])
            if noisy:
                with torch.random.fork_rng():  # masks from the edit's own seed; caller's RNG untouched
                    torch.manual_seed(seed)
                    drops = [self.capture(noisy, train=True) for _ in range(max(1, c.dropout_rounds))]
                rounds = [tuple(torch.cat([a, b]) for a, b in zip(clean, (d.q, d.resid, d.y))) for d in drops]
        return [tuple(t.view(-1, n_pos, t.shape[-1]) for t in r) for r in rounds]

    def _train(self, params, positions, batches, all_labels, variants, main) -> tuple[int, dict[str, float]]:
        c = self.config
        opt = torch.optim.Adam(list(params.values()), lr=c.lr, weight_decay=c.weight_decay)
        lam = c.memory_weight(self.task)
        pos = torch.tensor(positions)
        neuron_idx = torch.arange(len(positions))
        memory, val = self.memory, self.val_memory
        candidates, val_top = memory, val
        q_edit = batches[0][0][0, positions]
        refresh = c.memory_refresh if c.cached else 1
        best_val, since_best, fixed_for, steps = math.inf, 0, 0, 0
        losses: dict[str, float] = {}
        batch_items = [main] * (c.batch_size if self._has_dropout else 1) + variants[1:]
        for step in range(c.max_steps):
            steps = step + 1
            if c.cached:
                q, resid, y = batches[step % len(batches)]
                z, delta = self._contribution(params, q)  # (R, J, n), (R, J, d)
                logits = self._logits_from((y + delta).flatten(0, 1), resid.flatten(0, 1))
                z_rows = z[:, pos, neuron_idx]
                fixed_now = bool((logits[: len(main.labels)].argmax(-1) == all_labels[: len(main.labels)]).all())
            else:
                logits, z_rows = self._faithful_step(params, positions, batch_items)
                all_labels = torch.tensor([lab for it in batch_items for lab in it.labels])
                with torch.no_grad():
                    eval_logits, _ = self._faithful_step(params, positions, [main], train=False)
                fixed_now = bool((eval_logits.argmax(-1) == torch.tensor(main.labels)).all())
            z_edit = z_rows[0]
            if c.cached and step % refresh == 0 and memory.shape[0] > c.memory_candidates:
                with torch.no_grad():
                    scores = (memory @ params["key"].T + params["bias"]).max(-1).values
                    candidates = memory.index_select(0, scores.topk(c.memory_candidates).indices)
                    if val.shape[0]:
                        val_top = val.index_select(0, self._gain(params, val).max(-1).values.topk(min(64, val.shape[0])).indices)
            with torch.no_grad():
                z_cand = candidates @ params["key"].T + params["bias"]  # (C, n)
            l_edit = self._edit_loss(logits, all_labels)
            l_act = self._act_loss(z_rows)
            l_mem = self._memory_loss(self._top_memory_z(params, candidates, z_cand), z_edit) if memory.shape[0] else l_edit.new_zeros(())
            loss = l_edit + c.act_loss_weight * l_act + lam * l_mem
            losses = {"edit": float(l_edit.detach()), "activation": float(l_act.detach()), "memory": float(l_mem.detach()),
                      "total": float(loss.detach())}

            if fixed_now:
                # Stop once the patch can pass at most `leak_tol` of its output on the mistake to any
                # memory or validation query: screened on the candidates (in cached mode also on the
                # validation memory's rows that were highest at the last refresh), confirmed in full.
                with torch.no_grad():
                    if self.leak(params, q_edit, candidates, val_top) < c.leak_tol and (
                            (candidates is memory and val_top is val) or self.leak(params, q_edit, memory, val) < c.leak_tol):
                        break
            if fixed_now and step % refresh == 0:
                # Otherwise early-stop on the validation memory, counted only while the neuron fires
                # on its mistake; the exp losses can creep down for ever, so once fixed an edit trains
                # at most `fixed_patience` more steps.
                ze = z_edit.detach()
                with torch.no_grad():
                    val_loss = self._memory_loss(val @ params["key"].T + params["bias"], ze).item()
                fixed_for += refresh
                if float(ze.min()) > c.act_margin:
                    if val_loss < best_val - 1e-6:
                        best_val, since_best = val_loss, 0
                    else:
                        since_best += refresh
                if since_best >= c.patience or fixed_for >= c.fixed_patience:
                    break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), c.grad_clip)
            opt.step()
        return steps, losses

    def _faithful_step(self, params, positions, items: list[Encoded], train: bool = True):
        """Reference procedure: the new neurons live in the model, which runs in full."""
        ffn = self.ffn
        in_w = [params["key"]] + ([params["up"]] if self.family.gated else [])
        in_b = [params["bias"]] + ([params["up_bias"]] if self.family.gated else [])
        ffn.set_live(in_w, in_b, params["value"] * params["amp"])
        try:
            store, logits = self._forward(items, train=train, grad=train)
        finally:
            ffn.set_live(None)
        q = gather_positions(store["q"], items).view(len(items), -1, ffn.d_model)
        z = q[:, positions] @ params["key"].T + params["bias"]  # (R, n, n)
        n = len(positions)
        return logits, z[:, torch.arange(n), torch.arange(n)]

    def _block(self, edit_id: str, params) -> PatchBlock:
        with torch.no_grad():
            in_weight = [params["key"].detach().clone()]
            in_bias = [params["bias"].detach().clone()]
            if self.family.gated:
                in_weight.append(params["up"].detach().clone())
                in_bias.append(params["up_bias"].detach().clone())
            value = (params["value"] * params["amp"]).detach().clone()
        return PatchBlock(edit_id, in_weight, in_bias, value)

    # ------------------------------------------------------------------ managing patches
    def remove(self, edit_id: str) -> None:
        """Take one edit's neurons out; the outputs are exactly those before that edit was added."""
        self.ffn.remove(edit_id)

    @property
    def edit_ids(self) -> list[str]:
        return self.ffn.edit_ids()

    def patch_set(self):
        from .patchset import PatchSet, fingerprint

        if self._fingerprint is None:  # the base never changes under an editor: hash it once
            self._fingerprint = fingerprint(self.model)
        return PatchSet.from_model(self.model, self.config, base_fingerprint=self._fingerprint)

    def folded(self) -> nn.Module:
        """A copy of the model with every patch folded into a plain, wider FFN (for serving)."""
        model = copy.deepcopy(self.model)
        return PatchedFFN.find(model).fold(model)
