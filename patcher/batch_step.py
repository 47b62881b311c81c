"""The step of ``batching``: several edits' neurons in one pack, every loss and flag per edit.

Rows are (training row, position) pairs of every edit, flattened; each row sees only its own
edit's neurons (a 0/1 owner matrix), and every reduction that ``objective`` does over one edit's
rows or neurons is done here per edit (``per_edit``), so that the sum of the per-edit losses gives
each edit exactly the gradient it would get alone. Memory rows a neuron must not see (the queries
of the batch's edits from its own on) carry ``MASKED`` in their pre-activation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .objective import Objective
from .steps import Params, preactivation, rounded

MASKED = -1e4  # added to a pre-activation a neuron must not see: every activation is ~0 there, exp() is 0


# ---------------------------------------------------------------------------------------------- layout
@dataclass
class Layout:
    """Where each edit's rows and neurons sit in the flattened batch. Rows are (training row,
    position) pairs, X in all; neurons N in all; B edits."""

    row_edit: torch.Tensor  # (X,) each row's edit
    labels: torch.Tensor  # (X,)
    owner: torch.Tensor  # (X, N) fp32: 1 where the row's edit owns the neuron
    own_x: torch.Tensor  # (K,) for each neuron and each of its edit's training rows: the row at its position
    own_n: torch.Tensor  # (K,) that neuron
    own_r: torch.Tensor  # (K,) that training row's number within its edit
    first_x: torch.Tensor  # (N,) each neuron's position in its mistake's clean row
    main_x: torch.Tensor  # (P,) the rows of every edit's mistake (what "fixed" is judged on)
    main_edit: torch.Tensor  # (P,)
    neuron_edit: torch.Tensor  # (N,)
    rows_of_neuron: torch.Tensor  # (N,) training rows of the neuron's edit
    n_rows: torch.Tensor  # (B,) flattened rows per edit
    n_neurons: torch.Tensor  # (B,)
    n_train_rows: int  # the most training rows of any edit


def layout(parts: list[tuple[int, int, list[int], torch.Tensor]], device: torch.device) -> Layout:
    """``parts``: per edit (training rows R, positions J, its neurons' positions, labels (J,))."""
    row_edit, labels, own, first, main, neuron_edit, rows_of = [], [], [], [], [], [], []
    x0 = 0
    for e, (R, J, positions, lab) in enumerate(parts):
        row_edit += [e] * (R * J)
        labels.append(lab.repeat(R))
        for p in positions:
            own += [(x0 + r * J + p, len(neuron_edit), r) for r in range(R)]
            first.append(x0 + p)
            neuron_edit.append(e)
            rows_of.append(R)
        main += [(x0 + j, e) for j in range(J)]
        x0 += R * J
    t = functools.partial(torch.tensor, dtype=torch.long, device=device)
    row_e, n_e = t(row_edit), t(neuron_edit)
    own_x, own_n, own_r = t(own).T
    main_x, main_e = t(main).T
    return Layout(row_e, torch.cat(labels), (row_e[:, None] == n_e[None]).float(), own_x, own_n, own_r, t(first),
                  main_x, main_e, n_e, t(rows_of), t([R * J for R, J, _, _ in parts]),
                  torch.bincount(n_e, minlength=len(parts)), max(R for R, _, _, _ in parts))


def per_edit(values: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) the mean of ``values`` over each edit's entries (``index``: their edit)."""
    return values.new_zeros(counts.shape[0]).index_add(0, index, values) / counts.clamp_min(1)


def valid_topk_mean(values: torch.Tensor, k: int, valid: torch.Tensor) -> torch.Tensor:
    """(n,) per column, the mean of its k largest of ``valid`` entries (>= 0; the others are 0 and
    lowest): ``objective.topk_mean`` over each column's own rows."""
    kk = min(k, values.shape[0])
    total = values.sum(0) if kk == values.shape[0] else values.topk(kk, dim=0).values.sum(0)
    return total / valid.clamp(max=k).clamp_min(1)


# ---------------------------------------------------------------------------------------------- the step
def batch_losses(objective: Objective, tail, lay: Layout, params: Params, q, resid, y, clean, cand, cand_pos,
                 cand_bias, val_top, q_edit, check_dtype: torch.dtype):
    """One step for every edit: (the summed loss, per-edit losses (B, 4), fixed (B,), leak flag (B,),
    each neuron's pre-activation on its clean mistake (N,)). ``clean``: the mistakes' rows
    (q, resid, y) in the model's dtype; ``cand``, ``cand_pos``: the neurons' memory candidates (see
    ``_memory_z``), ``cand_bias`` (C, N) their mask; ``val_top``: each neuron's validation rows (N, V, d)."""
    c, act, gated = objective.config, objective.act, objective.gated
    z = preactivation(params, q)  # (X, N)
    a = act(z) * (preactivation(params, q, weight="up", bias="up_bias") if gated else 1.0) * lay.owner
    logits = tail(y + (a @ (params["value"] * params["amp"])).to(y.dtype), resid).float()
    l_edit = per_edit(objective.edit_loss_rows(logits, lay.labels), lay.row_edit, lay.n_rows)
    # activation loss: per neuron, the top-k of exp(margin - z) over its edit's training rows
    act_vals = z.new_zeros(lay.n_train_rows, z.shape[1]).index_put(
        (lay.own_r, lay.own_n), torch.exp(c.act_margin - z[lay.own_x, lay.own_n]))
    l_act = per_edit(valid_topk_mean(act_vals, c.act_topk, lay.rows_of_neuron), lay.neuron_edit, lay.n_neurons)
    ze = z[lay.first_x, torch.arange(z.shape[1], device=z.device)]
    zm, valid, z_cand = _memory_z(params, cand, cand_pos, cand_bias, c.memory_topk)
    m, k = objective.margin, c.memory_topk
    live = zm > MASKED / 2
    mem = valid_topk_mean(torch.exp(zm - ze + m) * live, k, valid) + valid_topk_mean(torch.exp(zm + m) * live, k, valid)
    l_mem = per_edit(mem, lay.neuron_edit, lay.n_neurons)
    total = l_edit + c.act_loss_weight * l_act + c.memory_weight(objective.task) * l_mem
    per = torch.stack([l_edit, l_act, l_mem, total], 1)
    with torch.no_grad():
        fixed = _fixed(objective, tail, lay, params, clean, logits, check_dtype)
        up_cand = up_val = None
        if gated:
            up_cand = (preactivation(params, cand, True, weight="up", bias="up_bias") if cand_pos is None
                       else preactivation(params, cand, weight="up", bias="up_bias").gather(0, cand_pos))
            up_val = preactivation(params, val_top, True, weight="up", bias="up_bias")
        scores = [(z_cand, up_cand), (preactivation(params, val_top, own=True), up_val)]
        leak = per_edit_max(objective.leak_per_neuron(params, q_edit, scores), lay)
        leak_ok = fixed & (leak.double() < c.leak_tol)
    return per[:, 3].sum(), per.detach(), fixed, leak_ok, ze.detach()


def _memory_z(params: Params, rows: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor, k: int):
    """(zm with gradient (k', N), valid rows per neuron (N,), every candidate's z (C, N) without).
    ``rows`` (U, d) with ``pos`` (C, N): the union of the neurons' candidates, scored for every
    neuron in one matrix product (on a CPU a product per neuron is a matrix-vector product, on one
    core); ``pos`` None: ``rows`` (N, C, d) holds each neuron's own (no data-dependent size)."""
    valid = (bias == 0).sum(0)
    if pos is None:  # rows (N, C, d): each neuron's own
        zm = preactivation(params, rows, own=True) + bias
    else:
        zm = preactivation(params, rows).gather(0, pos) + bias  # (C, N), with gradient
    if zm.shape[0] <= k:
        return zm, valid, zm.detach()
    idx = zm.detach().topk(k, dim=0).indices  # (k, N)
    return zm.gather(0, idx), valid, zm.detach()


def _fixed(objective, tail, lay: Layout, params: Params, clean, logits, dtype: torch.dtype) -> torch.Tensor:
    """(B,) every target position of each mistake right; for a bf16/fp16 model as it will compute it."""
    if dtype != torch.float32:
        q, resid, y = clean
        low = rounded(params, dtype)
        a = objective.act(preactivation(low, q))
        if objective.gated:
            a = a * preactivation(low, q, weight="up", bias="up_bias")
        logits = tail(y + (a * lay.owner[lay.main_x].to(dtype)) @ low["value"], resid)
    else:
        logits = logits[lay.main_x]
    wrong = (logits.argmax(-1) != lay.labels[lay.main_x]).long()
    return torch.zeros_like(lay.n_neurons).index_add(0, lay.main_edit, wrong) == 0


def per_edit_max(values: torch.Tensor, lay: Layout) -> torch.Tensor:
    """(B,) the largest of ``values`` (N,) over each edit's neurons."""
    return values.new_zeros(len(lay.n_neurons)).scatter_reduce(0, lay.neuron_edit, values, "amax", include_self=False)


@functools.cache
def compiled(mode: str):
    """``batch_losses`` compiled once per process and mode (dynamic shapes: a new pack does not recompile)."""
    return torch.compile(batch_losses, mode=mode, dynamic=True)
