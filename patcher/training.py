"""The losses, the leak bound and the training loop shared by both step functions.

Losses: the edit loss (the right output), the activation loss (fire on the mistake and its
paraphrases: ``mean(topk(exp(act_margin - z)))``) and the memory loss (stay the memory margin
below the edit, and below minus it, on the memory's highest rows; ``matched_margin`` when
``memory_margin`` is None). ``loss_topk``
"pooled" takes each top-k over every (memory row, batch row, neuron) at once, as the reference does.

Stopping (``stop_rule``): ours stops on the leak bound or our patience rules; the reference's
rule validates every ``val_every`` steps and stops once the edit is fixed and the
validation-memory loss has stopped improving. An optional ReduceLROnPlateau is stepped at each
validation on the validation edit loss.

The loop never waits for the device between checks: every stopping rule is computed on the
device at every step, and the host looks at them once every ``check_every`` steps. Parameters
are snapshotted at the steps in between, so training stops at exactly the step it would stop at
when checking every step: the patch does not depend on ``check_every``, only the time does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SetupError
from .steps import CachedStep, FullStep, Params, StepOut, preactivation


# The matched memory margin holds the most a neuron can pass to an input at or below -margin to
# this share of its activation at 1: what the reference's margin of 3 gives GELU (0.48 %).
MARGIN_LEAK = 0.005
MARGIN_FLOOR = 3.0  # never below the reference classifier's margin: the gap to the edit is selectivity too


def leak_envelope(act: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid, env): max |act(z')| over z' <= z, tabulated on z in [-30, 30] in steps of 0.01."""
    grid = torch.linspace(-30.0, 30.0, 6001, dtype=torch.float32, device=device)
    return grid, act(grid).abs().cummax(0).values


@functools.lru_cache(maxsize=64)  # per activation module: once per editor, not once per edit
def matched_margin(act: nn.Module) -> float:
    """The smallest whole margin m >= 3 at which max |act(z)| over z <= -m is at most
    ``MARGIN_LEAK`` of |act(1)|: 3 for GELU (|gelu(-3)| = 0.004) and ReLU, 8 for SiLU (|silu(-7)|
    = 0.006: hundreds of nearly silent neurons add up)."""
    with torch.no_grad():
        grid, env = leak_envelope(act, torch.device("cpu"))
        unit = act(grid.new_ones(1)).abs().item()
    ok = (env <= MARGIN_LEAK * unit).nonzero()
    if not len(ok) or grid[ok[-1, 0]] < -29:
        raise SetupError(f"the activation {type(act).__name__} leaks more than {MARGIN_LEAK:.1%} of |act(1)| at "
                         "every margin up to 29: set memory_margin explicitly")
    return max(MARGIN_FLOOR, float(math.ceil(-grid[ok[-1, 0]].item() - 1e-4)))


def topk_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest entries along dim 0, per column: (N, n) -> (n,)."""
    if k >= values.shape[0]:
        return values.mean(0)
    return values.topk(max(1, k), dim=0).values.mean(0)


class Objective:
    """What one edit is trained against, and the leak bound that decides when it is done."""

    def __init__(self, config, task: str, act: nn.Module, gated: bool, device: torch.device):
        self.config, self.task, self.act, self.gated = config, task, act, gated
        # Envelope of the activation, max |act(z')| over z' <= z, tabulated once on the device.
        self._grid, self._env = leak_envelope(act, device)
        self.margin = config.memory_margin if config.memory_margin is not None else matched_margin(act)

    def edit_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.config
        if self.task == "generation" and c.label_smoothing_form == "reference":
            # src/utils.py label_smoothed_nll_loss: eps/(V-1) on every other class, 1-eps on the target
            lp = logits.float().log_softmax(-1)
            eps, eps_i = c.label_smoothing, c.label_smoothing / (logits.shape[-1] - 1)
            nll = -lp.gather(-1, labels[:, None]).squeeze(-1)
            return ((1.0 - eps - eps_i) * nll - eps_i * lp.sum(-1)).mean()
        if self.task == "generation":
            return F.cross_entropy(logits, labels, label_smoothing=c.label_smoothing)
        loss = F.cross_entropy(logits, labels)
        if logits.shape[-1] == 2 and c.entropy_weight:
            p = logits.softmax(-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            loss = loss - c.entropy_weight * entropy
        return loss

    def act_loss(self, z_rows: torch.Tensor) -> torch.Tensor:
        """z_rows: (R, n) pre-activation of neuron i on the rows' query at its own position."""
        values = torch.exp(self.config.act_margin - z_rows)
        if self.config.loss_topk == "pooled":
            return topk_mean(values.flatten(), self.config.act_topk)
        return topk_mean(values, self.config.act_topk).mean()

    def memory_term(self, zm: torch.Tensor, z_rows: torch.Tensor) -> torch.Tensor:
        """The memory loss as ``loss_topk`` says: zm (k, n) memory pre-activations, z_rows (R, n)
        the batch's on the mistake (row 0: the clean or first row, which ours compares against)."""
        if self.config.loss_topk != "pooled":
            return self.memory_loss(zm, z_rows[0])
        if zm.shape[0] == 0:
            return zm.new_zeros(())
        m, k = self.margin, self.config.memory_topk
        rows = z_rows.shape[0]
        l1 = torch.exp(zm[:, None, :] - z_rows[None] + m).flatten()  # (k * R * n)
        l2 = torch.exp(zm + m)[:, None, :].expand(-1, rows, -1).flatten()  # each memory row once per batch row
        return topk_mean(l1, k) + topk_mean(l2, k)

    def memory_loss(self, zm: torch.Tensor, z_edit: torch.Tensor) -> torch.Tensor:
        if zm.shape[0] == 0:
            return zm.new_zeros(())
        m, k = self.margin, self.config.memory_topk
        return topk_mean(torch.exp(zm - z_edit + m), k).mean() + topk_mean(torch.exp(zm + m), k).mean()

    @staticmethod
    def candidates(params: Params, memory: torch.Tensor, n: int) -> torch.Tensor:
        """(neurons, n, d): each neuron's own n memory rows highest in its z, even where another
        neuron's z is higher everywhere. One shape for every refresh (no data-dependent size, no
        wait for the device)."""
        top = preactivation(params, memory).topk(min(n, memory.shape[0]), dim=0).indices  # (n, neurons)
        return memory[top.T]

    def memory_z(self, params: Params, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(zm, z): zm (k, n), with gradient, the pre-activations of each neuron's top-k memory
        rows (both memory terms increase with z, so only they enter the loss); z (C, n), without
        gradient, every row's (the leak screen reads it). ``rows``: the memory itself (N, d) or
        each neuron's candidates (n, C, d).

        With no more rows than k, every row is a top-k row: one product scores them all, with
        gradient. Otherwise the rows are picked from scores computed without gradient, and only
        they are recomputed with it."""
        k, own = self.config.memory_topk, rows.dim() == 3
        if rows.shape[-2] <= k:
            zm = preactivation(params, rows, own)
            return zm, zm.detach()
        with torch.no_grad():
            z = preactivation(params, rows, own)
        idx = z.topk(k, dim=0).indices.T  # (n, k)
        top = rows.gather(1, idx[..., None].expand(-1, -1, rows.shape[-1])) if own else rows[idx]
        return preactivation(params, top, own=True), z

    def envelope(self, z: torch.Tensor) -> torch.Tensor:
        """max |act(z')| over z' <= z: the most a neuron can pass to any input at or below z."""
        idx = torch.searchsorted(self._grid, z.contiguous()).clamp(max=len(self._grid) - 1)
        return torch.where(z > self._grid[-1], self.act(z).abs(), self._env[idx])

    def gain(self, params: Params, queries: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """(N, n): the most each neuron can pass to each query (up to the value vector): the
        activation's envelope at its pre-activation, times |up . q| for gated FFNs. ``queries``:
        (N, d) read by every neuron, or (n, N, d) each neuron's own."""
        own = queries.dim() == 3
        gain = self.envelope(preactivation(params, queries, own) if z is None else z)
        if self.gated:
            gain = gain * preactivation(params, queries, own, "up", "up_bias").abs()
        return gain

    def leak(self, params: Params, q_edit: torch.Tensor, *memories: torch.Tensor, z_first: torch.Tensor | None = None) -> torch.Tensor:
        """0-dim: the largest share of a neuron's output on its mistake (``q_edit``: (n, d), one
        query per neuron) that it can pass to any query of ``memories`` ((N, d), or (n, N, d) each
        neuron's own); 0 when they are empty. ``z_first``: the first memory's pre-activations,
        when the caller has them already."""
        worst = q_edit.new_zeros(q_edit.shape[0])
        for i, m in enumerate(memories):
            if not m.shape[-2]:
                continue
            z = z_first if i == 0 and z_first is not None else preactivation(params, m, m.dim() == 3)
            if self.gated:
                worst = torch.maximum(worst, self.gain(params, m, z).max(0).values)
            else:  # the envelope rises with z, so the row highest in z is the one that can receive most
                worst = torch.maximum(worst, self.envelope(z.max(0).values))
        z_e = (q_edit * params["key"]).sum(-1) + params["bias"]
        own = self.act(z_e).abs()
        if self.gated:
            own = own * ((q_edit * params["up"]).sum(-1) + params["up_bias"]).abs()
        return (worst / own.clamp_min(1e-12)).max()


@dataclass
class _Pending:
    """One step's stopping flags (on the device) until the host looks at them."""

    step: int
    leak_ok: torch.Tensor  # fixed and the leak screened on candidates is below tolerance
    patience: torch.Tensor  # fixed and a patience rule says stop
    screened_in_full: bool  # the screen already covered both memories in full
    losses: torch.Tensor  # (4,) edit, activation, memory, total
    snapshot: Params | None  # parameters at this step (None: still the live ones)


@dataclass
class TrainLog:
    """What ``train`` did: steps taken, the last step's losses, the steps at which the edit was
    validated in eval mode (reference rule or scheduler) and those at which the lr was lowered."""

    steps: int
    losses: dict[str, float]
    validations: list[int] = field(default_factory=list)
    lr_drops: list[int] = field(default_factory=list)


class _Validation:
    """The validation-memory stopping rules and the learning-rate scheduler, every ``val_every``
    steps (default: the memory refresh).

    ``stop_rule`` "leak" (ours): see ``_leak_rule``. "val_loss" (the reference's
    BertBinaryEditor/BartSeq2SeqEditor.joint_validation): the mistake is run in eval mode; from
    ``val_start`` on, among the validations at which it is fixed, stop once the last
    ``early_patience`` did not lower the validation-memory loss below the best by more than
    ``early_threshold``. The scheduler, if any, is stepped at every validation after the first
    update, on the eval-mode edit loss (the reference's Lightning config monitors "val_loss")."""

    def __init__(self, config, objective: Objective, opt: torch.optim.Optimizer, refresh: int, device: torch.device):
        c = self.config = config
        self.objective, self.opt = objective, opt
        self.every = c.val_every or refresh
        # the reference validates on its training batch in eval mode: batch_size identical copies,
        # which its pooled top-k counts
        self.copies = c.batch_size if c.loss_topk == "pooled" else 1
        self.scheduler = None if c.lr_scheduler is None else torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=c.lr_factor, patience=c.lr_patience, threshold=c.lr_threshold)
        self.best = torch.full((), math.inf, dtype=torch.float64, device=device)
        self.since_best = torch.zeros((), dtype=torch.long, device=device)
        self.fixed_for = torch.zeros((), dtype=torch.long, device=device)
        self.never = torch.zeros((), dtype=torch.bool, device=device)
        self.log = TrainLog(0, {})

    def __call__(self, step: int, step_fn, out: StepOut, params: Params, val: torch.Tensor) -> torch.Tensor:
        """0-dim bool: a validation rule says stop at this step."""
        c = self.config
        if step % self.every:
            return self.never
        stop = self._leak_rule(out, params, val) if c.stop_rule == "leak" else self.never
        if step == 0 or (c.stop_rule == "leak" and self.scheduler is None):
            return stop  # as the reference: no eval-mode validation before the first update
        evaluated = step_fn.evaluate(params)
        self.log.validations.append(step)
        if c.stop_rule == "val_loss" and step >= c.val_start:
            stop = self._val_loss_rule(evaluated, params, val)
        if self.scheduler is not None:
            lr = self.opt.param_groups[0]["lr"]
            self.scheduler.step(float(self.objective.edit_loss(evaluated.logits, evaluated.labels)))
            if self.opt.param_groups[0]["lr"] < lr:
                self.log.lr_drops.append(step)
        return stop

    def _leak_rule(self, out: StepOut, params: Params, val: torch.Tensor) -> torch.Tensor:
        """Ours: patience on the validation-memory loss against the training step's mistake,
        counted while the neuron fires on it, and ``fixed_patience``."""
        c = self.config
        ze = out.z_rows[0].detach()
        val_loss = self.objective.memory_loss(preactivation(params, val), ze).double()
        self.fixed_for = self.fixed_for + self.every * out.fixed.long()
        firing = out.fixed & (ze.min().double() > c.act_margin)
        improved = val_loss < self.best - 1e-6
        self.best = torch.where(firing & improved, val_loss, self.best)
        self.since_best = torch.where(firing, torch.where(improved, 0, self.since_best + self.every), self.since_best)
        return out.fixed & ((self.since_best >= c.patience) | (self.fixed_for >= c.fixed_patience))

    def _val_loss_rule(self, evaluated: StepOut, params: Params, val: torch.Tensor) -> torch.Tensor:
        """The reference's early_stop_editing: among the validations at which the edit is fixed,
        stop once the best is ``early_patience`` or more validations old."""
        c = self.config
        z_val = evaluated.z_rows.expand(self.copies, -1)
        val_loss = self.objective.memory_term(preactivation(params, val), z_val).double()
        improved = val_loss < self.best - c.early_threshold
        self.best = torch.where(evaluated.fixed & improved, val_loss, self.best)
        self.since_best = torch.where(evaluated.fixed, torch.where(improved, 0, self.since_best + 1), self.since_best)
        return evaluated.fixed & (self.since_best >= c.early_patience)


def train(step_fn: CachedStep | FullStep, params: Params, objective: Objective, memory: torch.Tensor,
          val: torch.Tensor, q_edit: torch.Tensor, check_every: int) -> TrainLog:
    """Train ``params`` in place.

    ``stop_rule`` "leak" (ours) stops at the first of: fixed and the leak below ``leak_tol``
    (screened on the memory candidates, confirmed on both memories in full); fixed and no
    validation-memory improvement for ``patience`` steps while the neuron fires on its mistake;
    ``fixed_patience`` steps after first fixed (the exp losses can creep down for ever);
    ``max_steps``. "val_loss" (the reference): see ``_Validation``, or ``max_steps``."""
    c = objective.config
    device = q_edit.device
    # fused: one kernel for the update (CPU and CUDA), its step counters on the parameters' device (no sync)
    opt = torch.optim.Adam(list(params.values()), lr=c.lr, weight_decay=c.weight_decay,
                           fused=True)
    refresh = step_fn.refresh
    n_candidates = c.memory_candidates or c.memory_topk
    validation = _Validation(c, objective, opt, refresh, device)
    forward = _compiled(c.compile) if c.compile else step_losses
    candidates, val_top = memory, val
    window: list[_Pending] = []
    for step in range(c.max_steps):
        if step_fn.cached and step % refresh == 0 and memory.shape[0] > n_candidates:
            with torch.no_grad():  # each neuron's rows nearest to firing, and the validation rows that could leak most
                candidates = objective.candidates(params, memory, n_candidates)
                if val.shape[0]:
                    gain = objective.gain(params, val).max(-1).values
                    val_top = val.index_select(0, gain.topk(min(64, val.shape[0])).indices)
        try:
            out, loss, losses, leak_ok = forward(step_fn, objective, params, step_fn.batch(step), candidates, val_top, q_edit)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise SetupError(f"compile={c.compile!r}: torch.compile could not build the training step "
                             f"({str(exc).strip().splitlines()[0]}); install a C++ compiler (CPU) or triton "
                             "(CUDA), or leave compile unset") from exc
        with torch.no_grad():
            patience = validation(step, step_fn, out, params, val)
            last = step == c.max_steps - 1 or len(window) + 1 >= check_every
            window.append(_Pending(step, leak_ok, patience, candidates is memory and val_top is val, losses,
                                   None if last else {k: v.detach().clone() for k, v in params.items()}))
        if last:
            stop = _first_stop(window, params, objective, memory, val, q_edit)
            if stop is not None:
                if stop.snapshot is not None:
                    with torch.no_grad():
                        for k, v in params.items():
                            v.copy_(stop.snapshot[k])
                return _log(validation.log, stop.step + 1, stop.losses)
            final_losses = window[-1].losses
            window = []
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), c.grad_clip)
        opt.step()
    return _log(validation.log, c.max_steps, final_losses)


def step_losses(step_fn: CachedStep | FullStep, objective: Objective, params: Params, batch: tuple,
                candidates: torch.Tensor, val_top: torch.Tensor, q_edit: torch.Tensor):
    """One step's forward: (the step's output, the loss, the four losses detached, and the leak
    flag: fixed and the leak screened on the candidates below ``leak_tol``). This is what
    ``compile`` compiles: a few fused kernels instead of a hundred small ones."""
    c = objective.config
    out = step_fn(params, *batch)
    zm, z_cand = objective.memory_z(params, candidates)  # (k, n) with gradient, (C, n) without
    l_edit = objective.edit_loss(out.logits, out.labels)
    l_act = objective.act_loss(out.z_rows)
    l_mem = objective.memory_term(zm, out.z_rows)
    loss = l_edit + c.act_loss_weight * l_act + c.memory_weight(objective.task) * l_mem
    with torch.no_grad():
        leak_ok = torch.zeros((), dtype=torch.bool, device=loss.device)
        if c.stop_rule == "leak":
            leak = objective.leak(params, q_edit, candidates, val_top, z_first=z_cand)
            leak_ok = out.fixed & (leak.double() < c.leak_tol)
        losses = torch.stack([l_edit, l_act, l_mem, loss]).detach()
    return out, loss, losses, leak_ok


@functools.cache
def _compiled(mode: str):
    """``step_losses`` compiled once per process and mode; shapes are dynamic, so a new edit's
    batch or number of neurons does not recompile it."""
    return torch.compile(step_losses, mode=mode, dynamic=True)


def _log(log: TrainLog, steps: int, losses: torch.Tensor) -> TrainLog:
    """The log up to the step training stopped at (a window may have run past it)."""
    log.steps, log.losses = steps, _losses(losses)
    log.validations = [s for s in log.validations if s < steps]
    log.lr_drops = [s for s in log.lr_drops if s < steps]
    return log


def _first_stop(window: list[_Pending], params: Params, objective: Objective, memory: torch.Tensor,
                val: torch.Tensor, q_edit: torch.Tensor) -> _Pending | None:
    """The first pending step at which a stopping rule holds (one host sync for the flags)."""
    flags = torch.stack([torch.stack([p.leak_ok, p.patience]) for p in window]).tolist()
    tol = objective.config.leak_tol
    for p, (leak_ok, patience) in zip(window, flags):
        if leak_ok:
            with torch.no_grad():
                if p.screened_in_full or float(objective.leak(p.snapshot or params, q_edit, memory, val)) < tol:
                    return p
        if patience:
            return p
    return None


def _losses(values: torch.Tensor) -> dict[str, float]:
    edit, act, mem, total = values.tolist()
    return {"edit": edit, "activation": act, "memory": mem, "total": total}
