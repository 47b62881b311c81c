"""The demo: a real fact-checking model, its real mistakes, one night of maintenance.

1. Prepare the base model: all-MiniLM-L6-v2 fine-tuned as a fact-checker on GeoNames claims
   (``editdata.factcheck_model``; cached on disk after the first time).
2. Register it as version 1 @champion in a local MLflow (SQLite) store.
3. Write a production-like error log: the champion's real mistakes on unseen facts (with
   paraphrases), plus a handful of malformed rows that validation must quarantine.
4. Run the nightly flow on embedded defaults (Prefect ephemeral API, MLflow SQLite).
5. Print what happened and how to look at it.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

from tasks.config import ModelConfig, load_config

DEMO_MODEL = "factcheck-minilm"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def malformed_rows(now: datetime, sample_input: str) -> list[str]:
    """Lines a real log ends up with: each must be quarantined with a reason, none lost."""
    ts = now.isoformat()
    rows = [
        {"id": "demo-bad-empty", "logged_at": ts, "input": "   ", "correction": "true"},
        {"id": "demo-bad-label", "logged_at": ts, "input": "Paris is a city in France.", "correction": "maybe"},
        {"id": "demo-bad-future", "logged_at": (now + timedelta(days=3)).isoformat(), "input": "Lyon is a city in France.", "correction": "true"},
        {"id": "demo-bad-long", "logged_at": ts, "input": " ".join(["Springfield"] * 700) + " is a city.", "correction": "false"},
        {"id": "demo-bad-nocorrection", "logged_at": ts, "input": "Nice is a city in France."},
        {"id": "demo-bad-conflict-a", "logged_at": ts, "input": "Lille is a city in Belgium.", "correction": "true"},
        {"id": "demo-bad-conflict-b", "logged_at": ts, "input": "Lille is a city in Belgium.", "correction": "false"},
        {"id": "demo-bad-timestamp", "logged_at": "last tuesday", "input": sample_input, "correction": "true"},
    ]
    return [json.dumps(r) for r in rows] + ['{"id": "demo-bad-json", "logged_at": "' + ts + '", "input": "unterminated']


def prepare(cfg: ModelConfig, n_errors: int, progress: bool = True) -> dict:
    """Steps 1-3; returns what was prepared (for the summary)."""
    from editdata.factcheck import ID2LABEL, build_factcheck
    from editdata.factcheck_model import mistakes, prepare_base_model
    from tasks.registry import Registry, RegistryError

    cache = cfg.workdir / "cache"
    print(f"[1/5] preparing the base model (fine-tuning all-MiniLM-L6-v2 once; cached in {cache}) ...", flush=True)
    folder = prepare_base_model(cache)
    data = build_factcheck()
    registry = Registry(cfg.resolved_tracking_uri)
    print(f"[2/5] registering it in MLflow ({cfg.resolved_tracking_uri}) ...", flush=True)
    base = registry.register_base(cfg.name, folder, "classification")

    holdout = random.Random(0).sample(data.test, min(2000, len(data.test)))  # keeps the gate quick
    _jsonl(cfg.holdout, [{"input": c.text, "correction": ID2LABEL[c.label]} for c in holdout])
    memory = [{"input": c.text} for c in data.train] + [{"input": e} for c in data.train for e in c.equivalents[:2]]
    _jsonl(cfg.memory, memory)

    try:
        champion = registry.load_version(cfg.name, "champion")
    except RegistryError:
        champion = registry.load_version(cfg.name, base.version)
    logged = set()
    errors_dir = Path(cfg.source.path)
    for f in errors_dir.glob("*.jsonl") if errors_dir.is_dir() else []:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                logged.add(json.loads(line).get("input"))
            except (json.JSONDecodeError, AttributeError):
                continue
    print("[3/5] finding the champion's real mistakes on unseen facts ...", flush=True)
    wrong = [c for c in mistakes(champion.model, champion.tokenizer, data.edit) if c.text not in logged]
    random.Random(len(logged)).shuffle(wrong)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S")
    rows = []
    for i, c in enumerate(wrong[:n_errors]):
        rows.append({
            "id": f"demo-{stamp}-{i:04d}",
            "logged_at": (now - timedelta(minutes=n_errors - i)).isoformat(),
            "input": c.text,
            "prediction": ID2LABEL[1 - c.label],
            "correction": ID2LABEL[c.label],
            "equivalents": c.equivalents[:3],
            "source": "demo reviewer",
        })
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + malformed_rows(now, rows[0]["input"] if rows else "x")
    errors_dir.mkdir(parents=True, exist_ok=True)
    (errors_dir / f"night-{stamp}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"base_folder": str(folder), "errors_logged": len(rows), "malformed": len(lines) - len(rows),
            "holdout": len(holdout), "memory": len(memory), "available_mistakes": len(wrong)}


def run_demo(config_dir: Path = Path("deployments"), n_errors: int = 60, progress: bool = True) -> int:
    from flows.nightly import nightly
    from tasks.registry import Registry

    cfg = load_config(DEMO_MODEL, config_dir)
    info = prepare(cfg, n_errors, progress)
    print(f"      logged {info['errors_logged']} real mistakes and {info['malformed']} malformed rows", flush=True)
    print("[4/5] running the nightly flow (Prefect ephemeral API, MLflow SQLite) ...", flush=True)
    report = nightly(model=DEMO_MODEL, config_dir=str(config_dir), progress=progress)
    print("[5/5] result", flush=True)
    print(f"  night status     : {report.status}  ({report.message})")
    print(f"  rows read        : {report.rows_read} = {report.accepted} accepted + {report.quarantined} quarantined")
    print(f"  edits applied    : {report.edits_applied}")
    if report.gate:
        m = report.gate["metrics"]
        print(f"  gate             : SR {m['success_rate']:.3f}  ER {m['edit_retain_rate']:.3f}  "
              f"GR {m['generalization_rate']:.3f} (held-out paraphrases)  locality {m['locality']:.4f} "
              f"({m['holdout_broken']:.0f} broken, {m['holdout_fixed_by_accident']:.0f} fixed by accident)  "
              f"({m['seconds_per_edit_median']:.2f} s/edit median)")
    status = Registry(cfg.resolved_tracking_uri).status(cfg.name)
    print(f"  registry         : versions {[v['version'] for v in status['versions']]}, aliases {status['aliases']}")
    db = cfg.resolved_tracking_uri
    print("\nLook around:")
    print(f"  .venv/bin/patchflow status {DEMO_MODEL}")
    print(f"  .venv/bin/patchflow quarantine {DEMO_MODEL}")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {db}        # models, metrics, plots, ledger")
    print("  .venv/bin/prefect server start                      # flow runs, artifacts (then re-run the demo)")
    return 0 if report.status in ("registered", "nothing-new", "nothing-to-patch") else 3
