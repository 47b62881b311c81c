"""The speed benchmarks' tables in benchmarks/README.md: ``patch-cost`` (``python -m
benchmarks.patch_cost``: latency and memory with N patches) and ``scale`` (``python -m
benchmarks.scale``: ms per training step on LLM shapes). ``benchmarks.tables`` renders them."""

from __future__ import annotations

from benchmarks.table_format import markdown_table as _table
from benchmarks.table_format import num as _num


def patch_cost_results(results: dict[str, dict]) -> dict[str, dict]:
    return {stem: r for stem, r in results.items() if r.get("benchmark") == "patch-cost"}


def scale_results(results: dict[str, dict]) -> dict[str, dict]:
    return {stem: r for stem, r in results.items() if r.get("benchmark") == "scale"}


def _where(run: dict) -> str:
    """A scale run's device (by name where known) and dtype, as its tables show them."""
    return f"{run.get('device_name') or run['device']}, {run['dtype']}"


def _mb(v) -> str:
    return "—" if v is None else f"{v / 2**20:,.1f}"


def patch_cost_table(results: dict[str, dict]) -> str:
    """``python -m benchmarks.patch_cost`` results: latency and memory of each variant of each model."""
    header = ["result", "model", "patches (neurons)", "device, dtype, threads", "variant", "batch 1: ms (× base)",
              "batch 32: ms (× base)", "weights MB (of which patches)", "RSS growth MB", "CUDA peak MB",
              "folded = unfolded predictions"]
    rows = []
    for stem, r in patch_cost_results(results).items():
        for name, m in r["models"].items():
            for variant, v in m["variants"].items():
                lat = []
                for b in r["batch_sizes"]:
                    ratio = "" if variant == "base" else f" ({m['overhead'][f'{variant}_batch{b}']:.3f}×)"
                    lat.append(f"{v[f'batch{b}']['median_ms']:.2f}{ratio}")
                check = m["folded_vs_unfolded"]
                agree = (f"{_num(check['predictions_equal'])} ({check['inputs']:,} inputs)"
                         if variant == "folded" else "")
                rows.append([f"`{stem}`", name, f"{m['patches']:,} ({m['neurons']:,})",
                             f"{r['device']}, {r['dtype']}, {r['threads']}", variant, *lat,
                             f"{_mb(v['parameter_bytes'] + v['buffer_bytes'])} ({_mb(v['patch_bytes'])})",
                             _mb(v["rss_delta_bytes"]), _mb(v.get("cuda_peak_bytes")), agree])
    if not rows:
        rows.append(["not run yet"] + ["—"] * (len(header) - 1))
    return _table(header, rows)


def _scale_modes_asked(result: dict) -> list[str]:
    """The modes the run's command asked for (the default: cached, full), in its order."""
    words = result["command"].split()
    asked = words[words.index("--modes") + 1].split(",") if "--modes" in words else ["cached", "full"]
    return [m for m in asked if m]


def scale_table(results: dict[str, dict]) -> str:
    """``python -m benchmarks.scale`` results: one row per mode. A mode the command asked for but the
    file lacks is shown as such (the process ended during it). "full ÷ this" compares with the full
    mode of the same file, else with the fastest full mode among the files of the same shape, device
    kind and dtype (named in the cell; the fastest gives the smallest ratio)."""
    header = ["result", "shape (parameters)", "device, dtype", "mode", "ms / step", "full ÷ this", "s / edit",
              "fixed", "memory build s (queries)", "peak GPU MB", "profiled edit: launches, syncs, .item() per step",
              "profiled edit: device busy / wall ms"]
    runs = scale_results(results)
    setup = lambda r: (r["shape"], r.get("device_name"), r["dtype"], r["model"]["parameters"])  # noqa: E731
    own_full = {stem: r["modes"].get("full", {}).get("ms_per_step") for stem, r in runs.items()}
    fulls = {}
    for stem, r in runs.items():
        if own_full[stem] and own_full[stem] < fulls.get(setup(r), (None, float("inf")))[1]:
            fulls[setup(r)] = (stem, own_full[stem])
    rows = []
    for stem, r in runs.items():
        full_stem, full = (stem, own_full[stem]) if "full" in r["modes"] else fulls.get(setup(r), (None, None))
        where = _where(r)
        shape = f"{r['shape']} ({r['model']['parameters'] / 1e9:.2f}B)"
        build = f"{r['memory']['build_s']:.1f} ({r['memory']['queries']:,})"
        for mode in _scale_modes_asked(r):
            m = r["modes"].get(mode)
            label = mode + (f" ({r['compile']})" if mode.startswith("compiled") and r.get("compile") else "") + \
                (f", {m['edit_batch']} edits a batch" if m and m.get("edit_batch") else "") + \
                (f", {m['recordings_failed']} of {m['edits']} edits not recorded" if m and m.get("recordings_failed") else "")
            if m is None or "error" in m:
                why = "no result: the run ended during this mode" if m is None else f"failed: {m['error'][:80]}"
                rows.append([f"`{stem}`", shape, where, label, why] + ["—"] * (len(header) - 5))
                continue
            ratio = "—" if mode == "full" or not full else \
                f"{full / m['ms_per_step']:.1f}×" + ("" if full_stem == stem else f" (full from `{full_stem}`)")
            prof = m.get("profile")
            counts = "—" if not prof else \
                f"{prof['launches_per_step']:.0f}, {prof['syncs_per_step']:.2f}, {prof['items_per_step']:.2f}"
            busy = "—" if not prof or prof["device_busy_ms"] is None else f"{prof['device_busy_ms']:.0f} / {prof['wall_ms']:.0f}"
            rows.append([f"`{stem}`", shape, where, label, f"{m['ms_per_step']:.2f}", ratio, f"{m['s_per_edit']:.3f}",
                         f"{m['fixed']}/{m['edits'] - m['already_correct']}", build, _num(m["peak_gpu_mb"], 0),
                         counts, busy])
    if not rows:
        rows.append(["not run yet"] + ["—"] * (len(header) - 1))
    return _table(header, rows)


def lifecycle_table(results: dict[str, dict]) -> str:
    """``python -m benchmarks.scale --lifecycle`` results: the patches' life on the run's device."""
    header = ["result", "shape", "device, dtype", "edits fixed (neurons)", "fixed as served: patched / folded",
              "applied = patched", "folded: max abs logit diff, argmax agreement", "removed = base", "ok"]
    rows = []
    for stem, r in scale_results(results).items():
        if (life := r.get("lifecycle")) is None:
            continue
        where = _where(r)
        if "error" in life:
            rows.append([f"`{stem}`", r["shape"], where, f"failed: {life['error'][:80]}"] + ["—"] * 4 + ["no"])
            continue
        rows.append([f"`{stem}`", r["shape"], where, f"{life['fixed']}/{life['edits']} ({life['neurons']})",
                     f"{life['fixed_as_served']} / {life['folded_fixed_as_served']}", _num(life["applied_equals_patched"]),
                     f"{life['folded_max_abs_diff']:g}, {life['folded_argmax_agreement']:.4f}",
                     _num(life["removed_equals_base"]), _num(life["ok"])])
    if not rows:
        rows.append(["not run yet"] + ["—"] * (len(header) - 1))
    return _table(header, rows)


def leak_trace_table(results: dict[str, dict]) -> str:
    """``python -m benchmarks.leak_trace`` results: each stopping rule replayed on the traced edits."""
    header = ["result", "edits traced", "rule", "steps (share of the default's)", "stopped by", "leak at the stop: median",
              "90th percentile"]
    rows = []
    for stem, r in results.items():
        if r.get("benchmark") != "leak-trace":
            continue
        for name, rule in r["rules"].items():
            reasons = ", ".join(f"{why} {n}" for why, n in sorted(rule["reasons"].items(), key=lambda kv: -kv[1]))
            rows.append([f"`{stem}`", str(r["edited"]), name, f"{rule['steps']:,} ({rule['share_of_default_steps']:.2f})",
                         reasons, f"{rule['leak_at_stop_median']:.4f}", f"{rule['leak_at_stop_p90']:.4f}"])
    return _table(header, rows)
