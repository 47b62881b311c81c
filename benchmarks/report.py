"""A benchmark result as strict JSON, a plot of its series, and a plain-text summary."""

from __future__ import annotations

import json
import math
from pathlib import Path


def jsonable(obj):
    """NaN/inf -> None (strict JSON), tuples -> lists, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sr", "SR so far"), ("gr", "GR so far"), ("er", "ER on edits so far"),
              ("test_r", "TestR (test subsample)"), ("edit_seconds", "cumulative edit seconds")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for name, res in result["methods"].items():
        xs = [p["t"] for p in res["series"]]
        for ax, (key, title) in zip(axes, panels):
            ys = [p[key] if p[key] is not None else float("nan") for p in jsonable(res["series"])]
            ax.plot(xs, ys, marker="o", ms=3, label=name)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("stream position")
    for ax, (key, _) in zip(axes, panels):
        if key != "edit_seconds":
            ax.set_ylim(-0.02, 1.05 if key != "test_r" else None)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SME {result['task']} — seed {result['seed']}, {result['stream_length']} stream items", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict) -> str:
    lines = [f"{result['task']} seed={result['seed']} stream={result['stream_length']} "
             f"(base mistakes {result['base_mistakes']}) wall={result['wall_seconds']:.0f}s"]
    keys = ["edited", "fixed_before_edit", "sr", "gr", "er", "train_r", "test_r", "neighbour_r", "neurons",
            "unfixed", "seconds_per_edit_median", "seconds_edits_total"]
    lines.append("method    " + " ".join(f"{k[:10]:>10}" for k in keys))
    for name, res in result["methods"].items():
        vals = []
        for k in keys:
            v = res.get(k)
            vals.append(f"{v:>10.3f}" if isinstance(v, float) else f"{str(v):>10}")
        lines.append(f"{name:9s} " + " ".join(vals))
    for name, res in result["methods"].items():
        cmp = res.get("comparison")
        if cmp:
            lines.append("{n} vs patcher on the first {k} items: s/edit median {p:.3f} vs {f:.3f} (ratio {r:.1f}x "
                         "total), test agreement {a}, same fixed {s}".format(
                             n=name, k=cmp["stream_prefix"], p=cmp["patcher_seconds_per_edit_median"],
                             f=cmp[f"{name}_seconds_per_edit_median"], r=cmp["speed_ratio_total"],
                             a=cmp.get("test_prediction_agreement"), s=cmp.get("same_edits_fixed")))
    return "\n".join(lines)
