"""Several mistakes trained side by side, then kept in order (``PatcherConfig.edit_batch``).

Why: a cached step on a small model costs a CPU mostly fixed overhead, so the neurons of sixteen
edits train in a step of four and a half times the cost of one (fact-check MiniLM, 2 cores: 12.5
against 2.8 ms).

Why it keeps what editing one at a time guarantees. A neuron in the last FFN does not change that
FFN's input, so a later mistake's queries are the same with or without the neurons before it; it
only adds to the FFN's output. Edit k, edited alone, trains (a) on its captured vectors, whose
FFN output includes the neurons of the edits before it, and (b) against a memory that includes
those edits' queries. (b) is known before anything trains: the queries of the batch's earlier
edits join each edit's memory (a mask keeps every neuron's memory its own). (a) is not: a batch is
captured before any of its edits is added. So the edits are kept one by one, in order, and each
is checked on the model as the ones before it left it: one now already right gets nothing (as
``edit`` would find it); one whose neurons do not fix it there is trained again alone, as ``edit``
trains it. Every kept edit is fixed on the real model and silent on the memory as ``edit`` makes
it; what differs is its neurons, trained without the batch's earlier neurons in their rows.

Training: the edits' neurons are one parameter set; each row sees only its own edit's neurons;
every loss, the gradient clip and every stopping rule are per edit (the sum of per-edit losses
gives each edit its own gradient, and Adam is per element), and an edit that stops keeps the
parameters of the step it stopped at and leaves the pack, which shrinks (its Adam state, memory
candidates and counters go with the edits that stay), so the last edits of a batch train at the
cost of a few, not of sixteen.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import torch

from .batch_step import MASKED, batch_losses, compiled, layout, per_edit, per_edit_max
from .errors import PatchError
from .objective import Objective, topk_mean
from .records import EditRequest, EditResult
from .steps import Params, Prepared, init_neurons, preactivation, to_block
from .training import Patience, TrainLog

UNION_DEVICES = ("cpu",)  # where memory candidates are scored as their union (see _Loop._union)


def edit_batch(editor, requests: Sequence[EditRequest]) -> list[EditResult | PatchError]:
    """``Editor.edit_batch``: prepare every request, train those that need it together, keep them in order."""
    t0 = time.perf_counter()
    prepared: list[Prepared | EditResult | PatchError] = []
    for request in requests:
        try:
            prepared.append(editor._prepare(request, t0))
        except PatchError as exc:
            prepared.append(exc)
    ids = [r.id for r in requests]  # a repeated id is edited at its turn, alone (the first may have taken it)
    train_idx = [i for i, p in enumerate(prepared) if isinstance(p, Prepared) and ids.index(p.request.id) == i]
    together = {}
    if len(train_idx) > 1:
        t = time.perf_counter()
        trained = train_together(editor, [prepared[i] for i in train_idx])
        seconds = (time.perf_counter() - t) / len(train_idx)
        together = {i: (block, log, seconds) for i, (block, log) in zip(train_idx, trained)}
    share = (time.perf_counter() - t0) / max(1, len(requests))  # preparing and training, shared out
    results: list[EditResult | PatchError] = []
    changed = False  # an edit of this batch has been added: the captures after it are stale
    for i, (request, p) in enumerate(zip(requests, prepared)):
        try:
            if isinstance(p, PatchError):
                raise p
            result = _keep(editor, request, p, together.get(i), changed, time.perf_counter())
        except PatchError as exc:
            results.append(exc)
            continue
        result.seconds += share
        changed |= result.neurons > 0
        results.append(result)
    return results


def _keep(editor, request: EditRequest, p, first, changed: bool, t: float) -> EditResult:
    """One edit of the batch, kept as ``edit`` would keep it on the model as it is now."""
    if first is None:  # not trained with the others: already right at capture, a repeated id, a batch of one
        if changed:
            return editor.edit(request)
        return replace(p, seconds=0.0) if isinstance(p, EditResult) else editor._train_and_keep(p, t)
    if changed:  # capture again: the FFN output now holds the batch's earlier neurons
        fresh = editor._prepare(request, t)
        if isinstance(fresh, EditResult):
            return fresh
        if fresh.positions != p.positions:
            return editor._train_and_keep(fresh, t)
        # kept if they fix it on the model as it is now; else trained again alone, from the start, as edit trains it
        return editor._train_and_keep(fresh, t, first, stale=True)
    return editor._train_and_keep(p, t, first)


# ---------------------------------------------------------------------------------------------- training
def train_together(editor, preps: list) -> list[tuple]:
    """Train the first try of every prepared edit side by side: [(its PatchBlock, its TrainLog)]."""
    c, device = editor.config, editor.device
    rounds = [editor._training_batches(p.cap, p.variants, len(p.labels), p.seed) for p in preps]
    inits = [init_neurons(p.cap.q[p.positions].float(), editor.ffn.d_out, c.amplifier, editor.family.gated, p.seed,
                          c.value_init) for p in preps]
    # each neuron's memory: the memory, the queries of the batch's edits before its own and its own edit's
    # negatives (``edit_negatives``); the other rows are masked for it
    def owners(rows: list[torch.Tensor | None]) -> torch.Tensor:  # the edit of each row
        return torch.tensor([e for e, r in enumerate(rows) if r is not None for _ in range(r.shape[0])],
                            dtype=torch.long, device=device)

    q_of, neg_of = owners([p.cap.q for p in preps]), owners([p.negatives for p in preps])
    memory = torch.cat([editor.memory, *(p.cap.q.float() for p in preps),
                        *(p.negatives for p in preps if p.negatives is not None)])
    objective = Objective(c, editor.task, editor.ffn.neuron_act, editor.family.gated, device, editor.ffn.act)
    loop = _Loop(c, objective, editor._logits_from, preps, rounds, inits, memory, (q_of, neg_of), editor.val_memory,
                 editor.dtype)
    out = []
    for p, (step, losses, at) in zip(preps, loop.run()):
        block = to_block(p.request.id, at, editor.family.gated, editor.dtype)
        edit, act, mem, total = losses.tolist()
        out.append((block, TrainLog(step, {"edit": edit, "activation": act, "memory": mem, "total": total})))
    return out


class _Loop:
    """``training.train`` for a batch of edits: the same steps, rules and checks, per edit. The edits
    still training are packed together; those that stop leave the pack (it shrinks, so the last
    few do not pay for the rest)."""

    def __init__(self, c, objective, tail, preps, rounds, inits, memory, owners, val, dtype):
        """``owners``: the edit (index in ``preps``) of each row after the memory's own, first the edits' queries,
        then their negatives."""
        self.c, self.objective, self.tail, self.preps, self.rounds = c, objective, tail, preps, rounds
        (self.q_of, self.neg_of), self.memory, self.val, self.dtype = owners, memory, val, dtype
        self.n_base = memory.shape[0] - self.q_of.shape[0] - self.neg_of.shape[0]
        n, device = len(preps), memory.device
        self.patience = Patience.start((n,), device)
        self.every = c.val_every or c.memory_refresh
        self.n_cand = c.memory_candidates or c.memory_topk
        self.full = memory.shape[0] <= self.n_cand  # every memory row is a candidate: the screen is the full check
        params = {k: torch.cat([i[k] for i in inits]).detach().requires_grad_(True) for k in inits[0]}
        self._pack(list(range(n)), params, None)

    def _pack(self, active: list[int], params: Params, state: list[dict] | None) -> None:
        """Lay out the edits in ``active`` (their parameters and Adam state given, in that order)."""
        c, device = self.c, self.memory.device
        self.active = active
        self.lay = layout([(self.rounds[e][0][0].shape[0], self.rounds[e][0][0].shape[1], self.preps[e].positions,
                            self.preps[e].labels) for e in active], device)
        flat = [[torch.cat([self.rounds[e][r][i].flatten(0, 1) for e in active]) for i in range(3)]
                for r in range(len(self.rounds[active[0]]))]
        self.clean = tuple(t[self.lay.main_x] for t in flat[0])  # the mistakes' rows, in the model's dtype
        self.flat = [(q.float(), resid, y) for q, resid, y in flat]
        self.q_edit = torch.cat([self.preps[e].cap.q[self.preps[e].positions].float() for e in active])
        edit_of = torch.tensor(active, device=device)[self.lay.neuron_edit]  # each neuron's edit in the batch
        self.mask = torch.cat([self.memory.new_zeros(self.n_base, len(edit_of)),
                               torch.where(self.q_of[:, None] < edit_of[None], 0.0, MASKED),
                               torch.where(self.neg_of[:, None] == edit_of[None], 0.0, MASKED)])
        self.params = params
        self.opt = torch.optim.Adam(list(params.values()), lr=c.lr, weight_decay=c.weight_decay, fused=True)
        if state is not None:
            for p, s in zip(params.values(), state):
                self.opt.state[p] = s
        self.never = torch.zeros(len(active), dtype=torch.bool, device=device)

    def _shrink(self, stops: dict) -> None:
        """Take the edits that stopped out of the pack; the others keep their parameters, their Adam
        state, their memory candidates and their validation counters."""
        lay, idx = self.lay, self.active
        keep = [i for i, e in enumerate(idx) if e not in stops]
        if len(keep) == len(idx) or not keep:
            return
        rows = torch.cat([(lay.neuron_edit == i).nonzero().flatten() for i in keep])
        kept = torch.tensor(keep, device=rows.device)
        with torch.no_grad():
            params = {k: v[rows].detach().clone().requires_grad_(True) for k, v in self.params.items()}
            state = [{k: (t[rows].clone() if k != "step" else t.clone()) for k, t in self.opt.state[p].items()}
                     for p in self.params.values()]
            if self.cand_pos is None:
                self.cand = self.cand[rows]
            else:
                self.cand_pos = self.cand_pos[:, rows]
            self.cand_bias, self.val_top = self.cand_bias[:, rows], self.val_top[rows]
        self.patience = self.patience.take(kept)
        self._pack([idx[i] for i in keep], params, state)
        if self.full:
            self.cand_bias = self.mask

    def run(self) -> list[tuple[int, torch.Tensor, Params]]:
        """Per edit: (steps taken, its losses at the last, the parameters it stopped at)."""
        c, n = self.c, len(self.lay.neuron_edit)
        forward = compiled(c.compile) if c.compile else batch_losses
        check_every = c.check_every or (1 if self.memory.device.type == "cpu" else 8)
        rows = torch.arange(self.memory.shape[0], device=self.memory.device)[:, None].expand(-1, n)
        self.cand, self.cand_pos, self.cand_bias = self.memory, rows, self.mask
        self.val_top = self.val.expand(n, -1, -1)
        stops: dict[int, tuple] = {}
        window = []
        for step in range(c.max_steps):
            params = self.params
            if step % c.memory_refresh == 0 and not self.full:
                with torch.no_grad():
                    idx = (preactivation(params, self.memory) + self.mask).topk(self.n_cand, dim=0).indices
                    self.cand, self.cand_pos = self._union(idx)
                    self.cand_bias = self.mask.gather(0, idx)
                    if self.val.shape[0]:
                        gain = self.objective.gain(params, self.val)
                        self.val_top = self.val[gain.topk(min(64, self.val.shape[0]), dim=0).indices.T]
            q, resid, y = self.flat[step % len(self.flat)]
            loss, losses, fixed, leak_ok, ze = forward(self.objective, self.tail, self.lay, params, q, resid, y,
                                                       self.clean, self.cand, self.cand_pos, self.cand_bias,
                                                       self.val_top, self.q_edit, self.dtype)
            with torch.no_grad():
                patience = self._patience_rule(fixed, ze) if step % self.every == 0 else self.never
                last = step == c.max_steps - 1 or len(window) + 1 >= check_every
                snapshot = params if last else {k: v.detach().clone() for k, v in params.items()}
                window.append((step, leak_ok, patience, losses, snapshot))
            if last:
                self._settle(window, stops)
                window = []
                if len(stops) == len(self.preps):
                    break
            self._update(loss)
            if last and step < c.max_steps - 1:
                self._shrink(stops)
        final = {k: v.detach() for k, v in self.params.items()}
        for i, e in enumerate(self.active):
            if e not in stops:
                stops[e] = (c.max_steps, losses[i], self._rows(final, i))
        return [stops[e] for e in range(len(self.preps))]

    def _union(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The candidates ``idx`` (C, N) as ``_memory_z`` reads them. On a CPU their union, each row
        once, and each neuron's places in it; elsewhere each neuron's own rows (N, C, d): the union's
        size depends on the data, and reading it would wait for the device."""
        if idx.device.type in UNION_DEVICES:
            uniq, pos = torch.unique(idx, return_inverse=True)
            return self.memory[uniq], pos
        return self.memory[idx.T], None

    def _rows(self, params: Params, i: int) -> Params:
        """The parameters of the pack's i-th edit."""
        rows = (self.lay.neuron_edit == i).nonzero().flatten()
        return {k: v[rows].detach().clone() for k, v in params.items()}

    def _patience_rule(self, fixed: torch.Tensor, ze: torch.Tensor) -> torch.Tensor:
        """(B,) ``training._Validation._leak_rule`` per edit: the validation-memory loss of each."""
        c, lay, obj = self.c, self.lay, self.objective
        if self.val.shape[0]:
            zv = preactivation(self.params, self.val)
            m, k = obj.margin, c.memory_topk
            val_loss = per_edit(topk_mean(torch.exp(zv - ze + m), k) + topk_mean(torch.exp(zv + m), k),
                                lay.neuron_edit, lay.n_neurons).double()
        else:
            val_loss = self.patience.best.new_zeros(self.patience.best.shape)
        z_min = ze.new_zeros(len(lay.n_rows)).scatter_reduce(0, lay.neuron_edit, ze, "amin", include_self=False)
        return self.patience.update(c, self.every, fixed, z_min, val_loss)

    def _settle(self, window, stops: dict) -> None:
        """The first step of the window at which each edit of the pack stops (one host sync)."""
        flags = torch.stack([torch.stack([w[1], w[2]]) for w in window]).tolist()
        confirmed: dict[int, list[float]] = {}
        for i, e in enumerate(self.active):
            for w, (step, _, _, losses, at) in enumerate(window):
                leak_ok, patience = flags[w][0][i], flags[w][1][i]
                if leak_ok and not self.full and w not in confirmed:
                    confirmed[w] = self._full_leak(at).tolist()
                if (leak_ok and (self.full or confirmed[w][i] < self.c.leak_tol)) or patience:
                    stops[e] = (step + 1, losses[i], self._rows(at, i))
                    break

    @torch.no_grad()
    def _full_leak(self, params: Params) -> torch.Tensor:
        """(B,) each edit's leak on both memories in full."""
        obj = self.objective

        def up(rows):
            return preactivation(params, rows, weight="up", bias="up_bias") if obj.gated else None

        scores = [(preactivation(params, self.memory) + self.mask, up(self.memory)),
                  (preactivation(params, self.val), up(self.val))]
        return per_edit_max(obj.leak_per_neuron(params, self.q_edit, scores), self.lay)

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, each edit's gradient clipped to ``grad_clip`` on its own, Adam."""
        lay, params = self.lay, list(self.params.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            sq = sum(p.grad.pow(2).flatten(1).sum(1) if p.dim() > 1 else p.grad.pow(2) for p in params)
            norm = sq.new_zeros(len(lay.n_rows)).index_add(0, lay.neuron_edit, sq).sqrt()
            coef = (self.c.grad_clip / (norm + 1e-6)).clamp(max=1.0)[lay.neuron_edit]
            for p in params:
                p.grad.mul_(coef.view(-1, *[1] * (p.dim() - 1)))
        self.opt.step()
