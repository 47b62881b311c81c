"""The training loop shared by both step functions, and its stopping rules.

Stopping (``stop_rule``): ours stops on the leak bound or our patience rules; the reference's
rule validates every ``val_every`` steps and stops once the edit is fixed and the
validation-memory loss has stopped improving. An optional ReduceLROnPlateau is stepped at each
validation on the validation edit loss.

The loop never waits for the device between checks: every stopping rule is computed on the
device at every step, and the host looks at them once every ``check_every`` steps. Each step's
parameters are kept until then, so training stops at exactly the step it would stop at when
checking every step: the patch does not depend on ``check_every``, only the time does. With
``cuda_graph`` the step is recorded once per edit and replayed (``cuda_graph.StepGraph``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .cuda_graph import StepGraph, capture_stream
from .errors import SetupError
from .objective import Objective
from .steps import CachedStep, FullStep, Params, StepOut, preactivation


@dataclass
class _Pending:
    """One step's stopping flags (on the device) until the host looks at them."""

    step: int
    leak_ok: torch.Tensor  # fixed and the leak screened on candidates is below tolerance
    patience: torch.Tensor  # fixed and a patience rule says stop
    screened_in_full: bool  # the screen already covered both memories in full
    losses: torch.Tensor  # (4,) edit, activation, memory, total
    snapshot: Params | None  # the parameters this step was computed at (None: still the live ones)


@dataclass
class TrainLog:
    """What ``train`` did: steps taken, the last step's losses, the steps at which the edit was
    validated in eval mode (reference rule or scheduler) and those at which the lr was lowered."""

    steps: int
    losses: dict[str, float]
    validations: list[int] = field(default_factory=list)
    lr_drops: list[int] = field(default_factory=list)


@dataclass
class Patience:
    """Our patience rules (``stop_rule`` "leak"), for one edit (0-dim tensors) or several (one
    entry each), on the device: steps without a lower validation-memory loss while the neuron
    fires on its mistake (``patience``), and steps since first fixed (``fixed_patience``)."""

    best: torch.Tensor  # float64: the lowest validation-memory loss while firing
    since_best: torch.Tensor  # steps since then
    fixed_for: torch.Tensor  # steps fixed

    @classmethod
    def start(cls, shape: tuple, device: torch.device) -> Patience:
        zeros = functools.partial(torch.zeros, shape, dtype=torch.long, device=device)
        return cls(torch.full(shape, math.inf, dtype=torch.float64, device=device), zeros(), zeros())

    def update(self, c, every: int, fixed: torch.Tensor, z_min: torch.Tensor, val_loss: torch.Tensor) -> torch.Tensor:
        """One validation, ``every`` steps after the last: where a rule says stop. ``z_min``: the
        neurons' lowest pre-activation on their mistake (firing: above ``act_margin``)."""
        self.fixed_for = self.fixed_for + every * fixed.long()
        firing = fixed & (z_min.double() > c.act_margin)
        improved = val_loss < self.best - 1e-6
        self.best = torch.where(firing & improved, val_loss, self.best)
        self.since_best = torch.where(firing, torch.where(improved, 0, self.since_best + every), self.since_best)
        return fixed & ((self.since_best >= c.patience) | (self.fixed_for >= c.fixed_patience))

    def take(self, index: torch.Tensor) -> Patience:
        """The entries at ``index`` (the edits that stay in a pack)."""
        return Patience(self.best[index], self.since_best[index], self.fixed_for[index])


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
        self.state = Patience.start((), device)
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
        ze = out.z_rows[0].detach()
        val_loss = self.objective.memory_loss(preactivation(params, val), ze).double()
        return self.state.update(self.config, self.every, out.fixed, ze.min(), val_loss)

    def _val_loss_rule(self, evaluated: StepOut, params: Params, val: torch.Tensor) -> torch.Tensor:
        """The reference's early_stop_editing: among the validations at which the edit is fixed,
        stop once the best is ``early_patience`` or more validations old."""
        c = self.config
        z_val = evaluated.z_rows.expand(self.copies, -1)
        val_loss = self.objective.memory_term(preactivation(params, val), z_val).double()
        st = self.state
        improved = val_loss < st.best - c.early_threshold
        st.best = torch.where(evaluated.fixed & improved, val_loss, st.best)
        st.since_best = torch.where(evaluated.fixed, torch.where(improved, 0, st.since_best + 1), st.since_best)
        return evaluated.fixed & (st.since_best >= c.early_patience)


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
    graphed = c.cuda_graph and step_fn.cached
    capture = graphed and device.type == "cuda"
    # fused: one kernel for the update, its step counters on the device (no sync); capturable: graph-recordable
    opt = torch.optim.Adam(list(params.values()), lr=c.lr, weight_decay=c.weight_decay, fused=True, capturable=capture)
    stream = capture_stream(device) if capture else None
    with torch.cuda.stream(stream):  # None: a no-op
        log = _train_steps(step_fn, params, objective, opt, memory, val, q_edit, check_every, graphed, capture)
    if stream is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
    return log


def _train_steps(step_fn, params: Params, objective: Objective, opt: torch.optim.Optimizer, memory: torch.Tensor,
                 val: torch.Tensor, q_edit: torch.Tensor, check_every: int, graphed: bool, capture: bool) -> TrainLog:
    c = objective.config
    refresh = step_fn.refresh
    n_candidates = c.memory_candidates or c.memory_topk
    validation = _Validation(c, objective, opt, refresh, q_edit.device)
    forward = _compiled(c.compile) if c.compile else step_losses

    def step_forward(batch: tuple, candidates: torch.Tensor, val_top: torch.Tensor):
        try:
            return forward(step_fn, objective, params, batch, candidates, val_top, q_edit)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise SetupError(f"compile={c.compile!r}: torch.compile could not build the training step "
                             f"({str(exc).strip().splitlines()[0]}); install a C++ compiler (CPU) or triton "
                             "(CUDA), or leave compile unset") from exc

    def update(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), c.grad_clip)
        opt.step()

    def one_step(*inputs):
        """Forward, backward, clip and update (what ``cuda_graph`` records): (output, losses, leak flag)."""
        out, loss, losses, leak_ok = step_forward(*inputs)
        update(loss)
        return out, losses, leak_ok

    candidates, val_top = memory, val
    window: list[_Pending] = []
    graph: StepGraph | None = None
    try:
        for step in range(c.max_steps):
            if step_fn.cached and step % refresh == 0 and memory.shape[0] > n_candidates:
                with torch.no_grad():  # each neuron's rows nearest to firing, and the validation rows that could leak most
                    candidates = objective.candidates(params, memory, n_candidates)
                    if val.shape[0]:
                        gain = objective.gain(params, val).max(-1).values
                        val_top = val.index_select(0, gain.topk(min(64, val.shape[0])).indices)
            inputs = (step_fn.batch(step), candidates, val_top)
            if graphed and graph is None:
                graph = StepGraph(one_step, params, inputs, capture)
            if graph is not None:  # already updated: ``at`` holds the parameters this step was computed at
                out, losses, leak_ok, at = graph.step(*inputs)
            else:  # updated after the look, so the live parameters are this step's until then
                (out, loss, losses, leak_ok), at = step_forward(*inputs), params
            with torch.no_grad():
                patience = validation(step, step_fn, out, at, val)
                last = step == c.max_steps - 1 or len(window) + 1 >= check_every
                snapshot = at if graph is not None else None if last else {k: v.detach().clone() for k, v in params.items()}
                window.append(_Pending(step, leak_ok, patience, candidates is memory and val_top is val, losses, snapshot))
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
            if graph is None:
                update(loss)
        return _log(validation.log, c.max_steps, final_losses)
    finally:  # the recording and its memory pool go now, not when the cycle collector gets to them
        if graph is not None:
            graph.close()


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
                if p.screened_in_full or float(objective.leak(params if p.snapshot is None else p.snapshot, q_edit, memory, val)) < tol:
                    return p
        if patience:
            return p
    return None


def _losses(values: torch.Tensor) -> dict[str, float]:
    edit, act, mem, total = values.tolist()
    return {"edit": edit, "activation": act, "memory": mem, "total": total}
