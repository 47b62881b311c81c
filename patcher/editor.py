"""Transformer-Patcher: fix one mistake by adding and training one neuron (per wrong token).

The base model is frozen. For each mistake we add neurons to the last FFN and train only them against
``objective.Objective`` (fire on the mistake and its paraphrases, stay silent on unrelated inputs and earlier
edits). ``edit`` reads top to bottom: encode, capture, pick the wrong positions, train (``steps.CachedStep`` or
``steps.FullStep`` driven by ``training.train``), add the block, check it on the real model, remember its queries.
``edit_batch`` trains several mistakes side by side and keeps them in order (``batching``).

Generators are edited as served: a decoder-only answer is trained followed by a stop token, and an edit is
fixed only if greedy generation gives the answer and stops (``train_stop``).

Devices and dtypes: every tensor the editor makes lives on the model's device (inputs, labels, memory, random
generators). The memory and the neurons being trained are fp32 whatever the model's dtype; the kept neurons are
stored and applied in the model's dtype, and an edit counts as fixed only if the model itself, in its own dtype,
gets it right with them.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager, nullcontext
from typing import Sequence

import torch
from torch import nn

from .config import PatcherConfig
from .encoding import Encoded, by_length, choose_stop, collate, encode, gather_positions, labels_of, pad_id, stop_ids
from .errors import PatchError
from .families import Family, get_path, has_dropout, resolve_family
from .layer import PatchBlock, PatchedFFN
from .negatives import WordStats, swapped
from .objective import Objective, matched_margin
from .predict import predict, served_correct, target_correct
from .records import EditRequest, EditResult
from .steps import CachedStep, Captured, FullStep, Prepared, edit_seed, init_neurons, to_block
from .training import TrainLog, train


class _QueriesTaken(Exception):
    """Ends a forward pass early: the queries were all that was asked for."""


class Editor:
    """Edits a Hugging Face model in place, one mistake at a time."""

    def __init__(self, model: nn.Module, tokenizer, config: PatcherConfig | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config or PatcherConfig()
        self.family: Family = resolve_family(model)
        self.task = self.family.task
        model.requires_grad_(False)
        model.eval()
        self.ffn = PatchedFFN.of(model, self.family)
        self.ffn.set_clip(self.config.clip_negative, self.config.clip_threshold)
        ref = self.ffn.out.weight
        self.device, self.dtype = ref.device, ref.dtype
        self.input_device = getattr(model, "device", ref.device)  # where the embeddings are
        self.memory = torch.zeros(0, self.ffn.d_model, device=self.device)
        self.val_memory = torch.zeros(0, self.ffn.d_model, device=self.device)
        self._pre_norm = get_path(self.ffn.layer, self.family.pre_norm) if self.family.pre_norm else None
        self._post_norm = get_path(self.ffn.layer, self.family.post_norm) if self.family.post_norm else None
        self._final_norm = get_path(model, self.family.final_norm) if self.family.final_norm else None
        self._fingerprint: str | None = None
        self._stops = stop_ids(model, tokenizer, self.family) if self.config.train_stop else []
        self._has_dropout = has_dropout(model)
        self._words: WordStats | None = None  # the memory texts' word statistics (edit_negatives)
        if self.config.memory_margin is None:
            matched_margin(self.ffn.act)  # an activation no margin can silence is refused here, not at the first edit

    # ------------------------------------------------------------------ queries and memory
    @property
    def memory(self) -> torch.Tensor:
        """(N, d) FFN inputs of unrelated inputs and earlier edits the new neurons must stay silent on;
        fp32 on the model's device whatever is assigned (it is scored against the fp32 neurons)."""
        return self._memory

    @memory.setter
    def memory(self, value: torch.Tensor) -> None:
        self._memory = value.to(device=self.device, dtype=torch.float32)

    @property
    def val_memory(self) -> torch.Tensor:
        """(N, d) held-out memory queries: early stopping and the leak check, never trained against."""
        return self._val_memory

    @val_memory.setter
    def val_memory(self, value: torch.Tensor) -> None:
        self._val_memory = value.to(device=self.device, dtype=torch.float32)

    @contextmanager
    def _hooks(self, store: dict, queries_only: bool = False):
        def take_q(module, args):
            store["q"] = args[0]
            if queries_only:
                raise _QueriesTaken

        handles = [self.ffn.ins[0].register_forward_pre_hook(take_q),
                   self.ffn.out.register_forward_hook(lambda m, a, o: store.__setitem__("y", o))]
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
                logits = self.model(**collate(items, pad_id(self.tokenizer), self.input_device)).logits
        finally:
            self.model.eval()
        if self.task == "generation":
            logits = gather_positions(logits, items)
        return store, logits

    def capture(self, items: list[Encoded], train: bool = False) -> Captured:
        """One forward pass; the vectors the cached training loop needs, at the query positions
        (in the model's dtype)."""
        store, logits = self._forward(items, train=train)
        q = gather_positions(store["q"], items)
        resid = gather_positions(store["resid"], items) if "resid" in store else q
        return Captured(q.detach(), resid.detach(), gather_positions(store["y"], items).detach(), logits.detach())

    @torch.no_grad()
    def _queries(self, items: list[Encoded]) -> torch.Tensor:
        """The FFN inputs at the query positions, in fp32: the forward pass stops as soon as they
        exist (the last FFN and the head, over the whole vocabulary, are not needed for memory)."""
        store: dict = {}
        self.model.eval()
        try:
            with self._hooks(store, queries_only=True):
                self.model(**collate(items, pad_id(self.tokenizer), self.input_device))
        except _QueriesTaken:
            pass
        return gather_positions(store["q"], items).float()

    def _encode(self, text: str, target=None, stop: int | None = None) -> Encoded:
        return encode(self.model, self.tokenizer, self.family, text, target, stop)

    def _variants(self, request: EditRequest) -> list[Encoded]:
        """The mistake, then the paraphrases it trains on (those with as many target positions);
        a decoder-only answer is followed by a stop position (its label is chosen by ``edit``)."""
        stop = self._stops[0] if self._stops else None
        main = self._encode(request.input, request.target, stop)
        variants = [main]
        if self.config.train_on_equivalents:
            for eq in request.equivalents or []:
                enc = self._encode(eq, request.target, stop)
                if len(enc.labels) == len(main.labels):
                    variants.append(enc)
        return variants

    @torch.no_grad()
    def build_memory(self, texts: Sequence[str], batch_size: int = 32, val_texts: Sequence[str] | None = None) -> int:
        """Cache the queries of unrelated inputs (once); returns the number of memory queries. ``val_texts``: a
        separate validation split whose queries, all of them, are the validation memory (as the reference's);
        otherwise ``val_memory_fraction`` of the memory is held out. ``memory_unit`` says whether ``memory_size``
        and the fraction count queries or texts."""
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise PatchError("build_memory needs at least one non-empty text")
        c, gen = self.config, torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.index_words(texts)
        if c.memory_unit == "examples":  # sample and split texts, then read their queries
            order = torch.randperm(len(texts), generator=gen, device=self.device)[: c.memory_size].tolist()
            n_val = 0 if val_texts is not None else self._n_val(len(order))
            self.val_memory = self._text_queries([texts[i] for i in order[:n_val]], batch_size)
            self.memory = torch.cat([self.memory, self._text_queries([texts[i] for i in order[n_val:]], batch_size)])
        else:
            queries = self._text_queries(texts, batch_size)
            if queries.shape[0] > c.memory_size:
                queries = queries[torch.randperm(queries.shape[0], generator=gen, device=self.device)[: c.memory_size]]
            order = torch.randperm(queries.shape[0], generator=gen, device=self.device)
            n_val = 0 if val_texts is not None else self._n_val(queries.shape[0])
            self.val_memory = queries[order[:n_val]].clone()
            self.memory = torch.cat([self.memory, queries[order[n_val:]]])
        if val_texts is not None:
            self.val_memory = self._text_queries([t for t in val_texts if isinstance(t, str) and t.strip()], batch_size)
        return int(self.memory.shape[0] + self.val_memory.shape[0])

    def index_words(self, texts: Sequence[str]) -> None:
        """Index the memory texts' words for ``edit_negatives`` (``build_memory`` does; a cached memory needs it)."""
        self._words = WordStats.of(texts) if self.config.edit_negatives else None

    def _n_val(self, n: int) -> int:
        """How many of n memory queries (or texts) are held out as validation memory."""
        n_val = int(round(n * self.config.val_memory_fraction))
        return max(1, n_val) if n > 1 and self.config.val_memory_fraction > 0 else n_val

    def _text_queries(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """The queries of memory texts, in order; with ``memory_unit="examples"`` a seq2seq
        decoder's first position (the start token) is not read, as in the reference. Texts are
        batched by length (little padding), and their queries put back in order."""
        items = [self._encode(t) for t in texts]
        if self.config.memory_unit == "examples" and self.family.seq2seq:
            items = [Encoded(it.inputs, it.positions[1:], it.labels[1:]) for it in items if len(it.positions) > 1]
        rows: list[torch.Tensor | None] = [None] * len(items)
        for batch in by_length(items, batch_size):
            queries = self._queries([items[i] for i in batch]).split([len(items[i].positions) for i in batch])
            for i, q in zip(batch, queries):
                rows[i] = q
        return torch.cat([self.memory.new_zeros(0, self.ffn.d_model), *rows])

    @torch.no_grad()
    def remember(self, requests: Sequence[EditRequest]) -> int:
        """Add to the memories exactly the queries that ``edit`` added for these edits (as ``edit_memory`` says,
        captured as ``edit`` captured them), in order, so that a night resumed from a saved patch set trains the
        same patches as one that never stopped. ``requests``: the edits whose patches the model carries (those
        ``edit`` kept); those that fail to encode are skipped (they were checked when they were first edited)."""
        added = 0
        for request in requests:
            try:
                variants = self._variants(request)
            except PatchError:
                continue
            self._remember_edit(variants, self._queries(variants))
            added += 1
        return added

    def _remember_edit(self, variants: list[Encoded], q: torch.Tensor) -> None:
        """Add an edit's queries ``q`` (of ``variants``, eval mode) to the memory, as ``edit_memory`` says.
        Reference: the queries of its batch, ``batch_size`` copies of the mistake, join the training and the
        validation memory; for generators the first and last row of the flattened batch are dropped
        (src/models/seq2seq_modules.py Editor.construct_memory, update=True)."""
        if self.config.edit_memory == "ours":
            self.memory = torch.cat([self.memory, q])
            return
        rows = q[: len(variants[0].positions)].repeat(self.config.batch_size, 1)
        if self.task == "generation":
            rows = rows[1:-1]
        self.memory = torch.cat([self.memory, rows])
        self.val_memory = torch.cat([self.val_memory, rows])

    # ------------------------------------------------------------------ predictions
    def predict(self, texts: Sequence[str]) -> list[str]:
        return predict(self.model, self.tokenizer, texts, max_new_tokens=self.config.max_new_tokens)

    def is_correct(self, text: str, target) -> bool:
        """The model, in its own dtype, gives ``target``: as served (greedy generation gives the answer and
        stops; a classifier's argmax), or teacher-forced when ``train_stop`` is off for a decoder-only model."""
        judge = target_correct if self.task == "generation" and not self.family.seq2seq and not self._stops else served_correct
        return judge(self.model, self.tokenizer, [text], [target])[0]

    # ------------------------------------------------------------------ the tail of the model
    def _logits_from(self, y: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """Logits from the FFN output at cached positions: residual, norms, head. (N, d) -> (N, C)."""
        h = self._post_norm(y + resid) if self._post_norm is not None else resid + y
        if self._final_norm is not None:
            h = self._final_norm(h)
        return self.family.head(self.model, h)

    # ------------------------------------------------------------------ editing
    def edit(self, request: EditRequest) -> EditResult:
        """Fix one mistake. Already right: nothing added. Not fixable: nothing left behind."""
        t0 = time.perf_counter()
        prepared = self._prepare(request, t0)
        return prepared if isinstance(prepared, EditResult) else self._train_and_keep(prepared, t0)

    def edit_batch(self, requests: Sequence[EditRequest]) -> list[EditResult | PatchError]:
        """Fix several mistakes, trained side by side and kept in order (see ``batching``): each result is one
        that ``edit`` could have given; a request that cannot be patched gets its ``PatchError`` in its place."""
        from .batching import edit_batch
        return edit_batch(self, requests)

    def _prepare(self, request: EditRequest, t0: float) -> Prepared | EditResult:
        """Encode and capture the mistake and pick the neurons' positions; already right: the result."""
        if not isinstance(request.id, str) or not request.id:
            raise PatchError("edit id must be a non-empty string")
        if request.id in self.ffn.edit_ids():
            raise PatchError(f"edit {request.id!r} is already patched into this model")
        variants = self._variants(request)
        n_pos, cap = len(variants[0].labels), self.capture(variants)
        if self._stops:
            choose_stop(variants, cap.logits[n_pos - 1], self._stops)
        labels = labels_of([variants[0]], self.device)
        wrong = (cap.logits[:n_pos].argmax(-1).to(self.device) != labels).nonzero().flatten().tolist()
        if not wrong:
            return EditResult(request.id, fixed=True, already_correct=True, seconds=time.perf_counter() - t0,
                              message="already correct: nothing added")
        positions = wrong[: self.config.max_neurons_per_edit] if self.task == "generation" else [0]
        seed = edit_seed(self.config.seed, request.id)  # the edit's own: its init, dropout masks and negatives
        return Prepared(request, variants, cap, labels, positions, seed, self._negatives(request, seed))

    def _negatives(self, request: EditRequest, seed: int) -> torch.Tensor | None:
        """``edit_negatives``: the mistake with a rare span swapped (``patcher.negatives``), queried where read."""
        c, stop = self.config, (self._stops[0] if self._stops else None)
        if not c.edit_negatives:
            return None
        if self._words is None:
            raise PatchError("edit_negatives needs the memory texts' words: call build_memory(texts) or index_words(texts)")
        texts = swapped(request.input, c.edit_negatives, self._words, c.negative_max_df, seed, request.equivalents or [])
        return self._queries([self._encode(t, request.target, stop) for t in texts]) if texts else None

    def _train_and_keep(self, p: Prepared, t0: float, first: tuple[PatchBlock, TrainLog, float] | None = None,
                        stale: bool = False) -> EditResult:
        """Train, add, check on the model; unfixed: again from ``retry_neurons`` neurons per position. ``first``:
        a try trained by ``edit_batch`` (neurons, log, seconds); ``stale``: on an old capture (missed: one again)."""
        c, request, main = self.config, p.request, p.variants[0]
        batches, t_train, steps = None, 0.0, 0
        sizes = list(dict.fromkeys((1, c.retry_neurons)))
        tries = sizes if first is None else [0] + sizes[0 if stale else 1:]  # 0: ``first``
        for per_position in tries:
            if per_position == 0:
                block, log, seconds = first
            else:
                if batches is None and c.cached:
                    batches = self._training_batches(p.cap, p.variants, len(main.labels), p.seed)
                t = time.perf_counter()
                block, log = self._train(request.id, p.positions * per_position, p.cap, main, p.variants, p.labels,
                                         batches, p.seed, p.negatives)
                seconds = time.perf_counter() - t
            t_train, steps = t_train + seconds, steps + log.steps
            self.ffn.add(block)
            fixed = self.is_correct(request.input, request.target)
            kept = fixed or (c.keep_unfixed and per_position == tries[-1])
            if kept:
                break
            self.ffn.remove(request.id)
        if kept:
            self._remember_edit(p.variants, p.cap.q.float())
        message = "" if fixed else f"not fixed after {steps} steps: " + ("neurons kept" if kept else "no neuron kept")
        return EditResult(request.id, fixed=fixed, steps=steps, seconds=time.perf_counter() - t0,
                          train_seconds=t_train, neurons=block.neurons if kept else 0, losses=log.losses,
                          message=message, validations=log.validations, lr_drops=log.lr_drops)

    def _train(self, edit_id: str, positions: list[int], cap: Captured, main: Encoded, variants: list[Encoded],
               labels: torch.Tensor, batches, seed: int, negatives: torch.Tensor | None = None) -> tuple[PatchBlock, TrainLog]:
        """New neurons, one per entry of ``positions`` (reading the query there), trained on the edit;
        ``negatives`` join the memory for this edit only."""
        c = self.config
        memory = self.memory if negatives is None else torch.cat([self.memory, negatives])
        q_edit = cap.q[positions].float()
        params = init_neurons(q_edit, self.ffn.d_out, c.amplifier, self.family.gated, seed, c.value_init)
        objective = Objective(c, self.task, self.ffn.neuron_act, self.family.gated, self.device, self.ffn.act)
        check_every = c.check_every or (1 if self.device.type == "cpu" or not c.cached else 8)
        if c.cached:
            step = CachedStep(self._logits_from, self.ffn.neuron_act, self.family.gated, batches, labels, positions, c.memory_refresh)
            rng = nullcontext()
        else:
            # copies of the mistake differ only by dropout, but the pooled top-k counts every one
            copies = c.batch_size if self._has_dropout or c.loss_topk == "pooled" else 1
            step = FullStep(self.ffn, self._forward, self.family.gated, [main] * copies + variants[1:], main,
                            positions, self.device, fixed_every_step=c.stop_rule == "leak")
            rng = self._seeded_rng(seed)  # dropout masks from the edit's own seed: a replay draws the same
        with rng:
            log = train(step, params, objective, memory, self.val_memory, q_edit, check_every)
        return to_block(edit_id, params, self.family.gated, self.dtype), log

    def _training_batches(self, cap: Captured, variants: list[Encoded], n_pos: int, seed: int):
        """Cached mode: the (q, resid, y) rows each step trains on, shaped (R, n_pos, d). Every batch holds the
        mistake and its paraphrases without dropout. With dropout in the model, each of
        ``dropout_rounds`` batches adds a dropout sample of the reference's batch (the mistake ``batch_size - 1``
        more times, the paraphrases once); steps cycle through them, as the reference draws fresh masks each step."""
        c = self.config
        clean = (cap.q, cap.resid, cap.y)
        rounds = [clean]
        if self._has_dropout:
            # 0 rounds: one dropout sample of the edit alone (the behaviour before dropout_rounds)
            noisy = [variants[0]] * (c.batch_size - 1) + (variants[1:] if c.dropout_rounds > 0 else [])
            if noisy:
                n_rounds, per_pass = max(1, c.dropout_rounds), max(1, 64 // len(noisy))  # a few forward passes
                with self._seeded_rng(seed):
                    drops = [self.capture(noisy * min(per_pass, n_rounds - i), train=True) for i in range(0, n_rounds, per_pass)]
                noise = [torch.cat(t).split(len(noisy) * n_pos) for t in zip(*((d.q, d.resid, d.y) for d in drops))]
                rounds = [tuple(torch.cat([a, b[r]]) for a, b in zip(clean, noise)) for r in range(n_rounds)]
        return [tuple(t.view(-1, n_pos, t.shape[-1]) for t in r) for r in rounds]

    @contextmanager
    def _seeded_rng(self, seed: int):
        """Random draws (dropout masks) from the edit's own seed; the caller's RNG state is untouched."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

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
