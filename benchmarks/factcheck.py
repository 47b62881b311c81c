"""Prepare the fact-check benchmark's base model and report its accuracy.

    python -m benchmarks.factcheck [--cache-dir benchmarks/cache] [--seed 0]

The claims are ``editdata.factcheck``; the model is ``editdata.factcheck_model`` (all-MiniLM-L6-v2
fine-tuned as a 2-way claim classifier, cached after the first run).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from patcher import load_model

from editdata.factcheck import SPLITS, build_factcheck, data_hash
from editdata.factcheck_model import TrainSettings, accuracy, mistakes, prepare_base_model


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
    print("claims: " + ", ".join(f"{n}={len(data.split(n))}" for n in SPLITS)
          + f" (data {data_hash(data)}, built in {time.time() - t0:.1f}s)")
    folder = prepare_base_model(args.cache_dir, seed=args.seed, data=data, settings=settings)
    print(f"model folder: {folder}")
    model, tok = load_model(folder)
    for name in ("val", "edit", "test"):
        print(f"{name} accuracy: {accuracy(model, tok, data.split(name)):.4f}")
    print(f"mistakes on the edit split: {len(mistakes(model, tok, data.edit))} / {len(data.edit)}")
    equivalents = [replace(c, text=t, equivalents=[]) for c in data.test for t in c.equivalents]
    print(f"test equivalents accuracy: {accuracy(model, tok, equivalents):.4f}")
    print(f"total {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
