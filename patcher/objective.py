"""What one edit is trained against: the losses and the leak bound.

Losses: the edit loss (the right output), the activation loss (fire on the mistake and its
paraphrases: ``mean(topk(exp(act_margin - z)))``) and the memory loss (stay the memory margin
below the edit, and below minus it, on the memory's highest rows; ``matched_margin`` when
``memory_margin`` is None). ``loss_topk`` "pooled" takes each top-k over every (memory row,
batch row, neuron) at once, as the reference does.

The leak bound: the largest share of a neuron's output on its mistake that it can pass to any
memory query, read off the activation's envelope (``leak_envelope``); ``leak_tol`` stops
training once it is small enough.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SetupError
from .steps import Params, preactivation


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

    def __init__(self, config, task: str, act: nn.Module, gated: bool, device: torch.device,
                 screen_act: nn.Module | None = None):
        """``act``: the new neurons' activation. ``screen_act`` (default ``act``): the one whose envelope
        bounds the leak and sets the matched margin. For clipped neurons it is the model's own, so a
        clipped neuron trains as long as an unclipped one would (until it would be silent unclipped),
        and the clip only takes away what it adds to inputs below 0 that the memory does not hold."""
        self.config, self.task, self.act, self.gated = config, task, act, gated
        self._screen = screen_act if screen_act is not None else act
        # Envelope of the activation, max |act(z')| over z' <= z, tabulated once on the device.
        self._grid, self._env = leak_envelope(self._screen, device)
        self.margin = config.memory_margin if config.memory_margin is not None else matched_margin(self._screen)

    def edit_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.edit_loss_rows(logits, labels).mean()

    def edit_loss_rows(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(rows,): each row's edit loss; ``edit_loss`` is their mean."""
        c = self.config
        if self.task == "generation" and c.label_smoothing_form == "reference":
            # src/utils.py label_smoothed_nll_loss: eps/(V-1) on every other class, 1-eps on the target
            lp = logits.float().log_softmax(-1)
            eps, eps_i = c.label_smoothing, c.label_smoothing / (logits.shape[-1] - 1)
            nll = -lp.gather(-1, labels[:, None]).squeeze(-1)
            return (1.0 - eps - eps_i) * nll - eps_i * lp.sum(-1)
        if self.task == "generation":
            return F.cross_entropy(logits, labels, label_smoothing=c.label_smoothing, reduction="none")
        loss = F.cross_entropy(logits, labels, reduction="none")
        if logits.shape[-1] == 2 and c.entropy_weight:
            p = logits.softmax(-1)
            loss = loss + c.entropy_weight * (p * p.clamp_min(1e-12).log()).sum(-1)  # minus w * entropy
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
        return torch.where(z > self._grid[-1], self._screen(z).abs(), self._env[idx])

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
        scores = []
        for i, m in enumerate(memories):
            own = m.dim() == 3
            z = z_first if i == 0 and z_first is not None else preactivation(params, m, own)
            scores.append((z, preactivation(params, m, own, "up", "up_bias") if self.gated else None))
        return self.leak_per_neuron(params, q_edit, scores).max()

    def leak_per_neuron(self, params: Params, q_edit: torch.Tensor, scores) -> torch.Tensor:
        """(n,) ``leak`` per neuron, from each memory's pre-activations (rows, n) and, for gated
        FFNs, their up projections (else None)."""
        worst = q_edit.new_zeros(q_edit.shape[0])
        for z, up in scores:
            if not z.shape[0]:
                continue
            if self.gated:
                worst = torch.maximum(worst, (self.envelope(z) * up.abs()).max(0).values)
            else:  # the envelope rises with z, so the row highest in z is the one that can receive most
                worst = torch.maximum(worst, self.envelope(z.max(0).values))
        return worst / self.own_output(params, q_edit).clamp_min(1e-12)

    def own_output(self, params: Params, q_edit: torch.Tensor) -> torch.Tensor:
        """(n,) what each neuron gives its own mistake, up to the value vector: |act(key . q + bias)|,
        times |up . q + up_bias| for gated FFNs (the leak's denominator)."""
        own = self.act((q_edit * params["key"]).sum(-1) + params["bias"]).abs()
        if self.gated:
            own = own * ((q_edit * params["up"]).sum(-1) + params["up_bias"]).abs()
        return own
