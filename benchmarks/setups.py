"""The two real benchmark tasks: the MiniLM fact-checker and SmolLM2 question answering.

Each builds a ``harness.Task`` from the data package (``editdata``) and a cached base model.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from patcher import load_model

from benchmarks.harness import Item, Pair, Task


def _sample(seq: Sequence, n: int | None, tag: str) -> list:
    seq = list(seq)
    if n is None or n >= len(seq):
        return seq
    return random.Random(tag).sample(seq, n)


def factcheck_task(cache_dir: Path, data_seed: int = 0, train_sample: int = 1000, memory_size: int = 40_000,
                   data_kwargs: dict | None = None) -> Task:
    """MiniLM fact-check: edit split mistakes; memory = train claims + equivalents; TrainR on a
    sample of the train split; TestR on the test split; neighbours = ``editdata.factcheck.neighbours``.
    ``data_kwargs`` go to ``build_factcheck`` (default: its defaults)."""
    from editdata import factcheck as fc
    from editdata.factcheck_model import prepare_base_model

    data = fc.build_factcheck(seed=data_seed, **(data_kwargs or {}))
    folder = prepare_base_model(cache_dir, seed=data_seed, data=data)
    model, tok = load_model(folder)
    by_id = {c.claim_id: c for c in data.edit}

    def as_item(c: fc.Claim) -> Item:
        return Item(c.claim_id, c.text, c.label, list(c.equivalents), c.equivalent_kinds)

    pool = [as_item(c) for c in data.edit]
    texts = [t for c in data.train for t in (c.text, *c.equivalents)]
    n_texts = len(texts)
    texts = _sample(texts, memory_size, f"sme-memory:{data_seed}")  # classification: one query per text

    def neighbours(item: Item) -> list[Pair]:
        return [(c.text, c.label) for c in fc.neighbours(by_id[item.id], data)]

    return Task(
        name="fact-check", model=model, tokenizer=tok, edit_pool=pool, memory_texts=texts,
        train_eval=[(c.text, c.label) for c in _sample(data.train, train_sample, f"sme-train:{data_seed}")],
        test_eval=[(c.text, c.label) for c in data.test], neighbours=neighbours,
        wording_items=[as_item(c) for c in data.test],
        info={"model": str(folder), "data_seed": data_seed, "data_kwargs": data_kwargs or {},
              "memory_texts_available": n_texts,
              "splits": {n: len(data.split(n)) for n in fc.SPLITS},
              "train_sample": min(train_sample, len(data.train)),
              "neighbours": "factcheck.neighbours: the opposite claim about the same city, then test claims "
                            "naming / really in the same country (<= 20)"},
    )


def qa_task(cache_dir: Path, data_seed: int = 0, memory_size: int = 40_000) -> Task:
    """SmolLM2 QA: edit-pool mistakes. The locality pool is split by fact (seeded) into a memory
    half (its prompts + answers feed the memory; TrainR is measured on it) and a held-out half
    (TestR). Hard neighbours: locality-pool facts about the same country (the capital fact of a
    country and the cities in it). ``memory_size`` is the patcher's (set in its config)."""
    import torch

    from benchmarks.qa import prepare_smollm2
    from editdata.qa import build_qa

    folder = prepare_smollm2(cache_dir)
    model, tok = load_model(folder, dtype=torch.float32)
    data = build_qa(seed=data_seed)
    loc = sorted(data.locality_pool, key=lambda it: it.fact_id)
    random.Random(f"sme-qa-memory:{data_seed}").shuffle(loc)
    mem_facts, test_facts = loc[: len(loc) // 2], loc[len(loc) // 2 :]
    texts = [p + it.target for it in mem_facts for p in (it.prompt, *it.paraphrases)]
    by_country: dict[str, list] = {}
    for it in data.locality_pool:
        by_country.setdefault(it.country, []).append(it)
    edit_by_id = {it.fact_id: it for it in data.edit_pool}

    def neighbours(item: Item) -> list[Pair]:
        src = edit_by_id[item.id]
        return [(it.prompt, it.target) for it in by_country.get(src.country, []) if it.fact_id != src.fact_id][:20]

    def as_item(it) -> Item:
        return Item(it.fact_id, it.prompt, it.target, list(it.paraphrases), it.paraphrase_kinds)

    return Task(
        name="qa", model=model, tokenizer=tok,
        edit_pool=[as_item(it) for it in data.edit_pool],
        wording_items=[as_item(it) for it in data.locality_pool],
        memory_texts=texts,
        kl_texts=[p for it in mem_facts for p in (it.prompt, *it.paraphrases)],
        train_eval=[(it.prompt, it.target) for it in mem_facts],
        test_eval=[(it.prompt, it.target) for it in test_facts],
        neighbours=neighbours,
        info={"model": str(folder), "data_seed": data_seed, "edit_pool": len(data.edit_pool),
              "locality_pool": len(data.locality_pool), "memory_facts": len(mem_facts),
              "heldout_facts": len(test_facts),
              "train_eval": "TrainR on the memory half of the locality pool (seen in the memory)",
              "neighbours": "locality-pool facts about the same country (its capital, its cities; <= 20)"},
    )
