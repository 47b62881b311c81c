"""The Prefect tasks of one night. Each is a thin, typed step over the plain functions in
tasks/ (ingest, validate, quarantine, patch, gate, registry), so the flow reads like the
paragraph in DEVELOPERS.md and every step shows up in the Prefect UI with its own state.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from patcher import EditRequest
from patcher.encoding import max_length
from tasks.config import ModelConfig
from tasks.evaluate import ModelRef, evaluate
from tasks.gate import GateReport, decide
from tasks.ingest import IngestBatch, StateStore, ingest
from tasks.patch import PatchRun, clear_checkpoint, patch_night
from tasks.quarantine import QuarantineStore, file_problem_rows
from tasks.records import ErrorRecord
from tasks.registry import LoadedVersion, Registry, RegistryError, RegistryUnavailable
from tasks.validate import ValidationContext, ValidationResult, validate
from tasks.examples import read_examples


class NightLocked(RuntimeError):
    """Another night for the same model is running."""


@contextmanager
def night_lock(cfg: ModelConfig):
    """One night per model at a time. An OS file lock: released by the kernel if the holder dies,
    so a crashed run never blocks the next one. (With several machines, use a Prefect global
    concurrency limit named ``patchflow-<model>`` as well; see README.)"""
    path = cfg.model_workdir / "night.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise NightLocked(f"another nightly run for model {cfg.name!r} is in progress ({holder}); "
                          f"not starting a second one") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _ledger_requests(entries: list[dict]) -> list[EditRequest]:
    return [EditRequest(id=str(e["id"]), input=e["input"], target=e["correction"], equivalents=e.get("equivalents") or [])
            for e in entries if "input" in e and "correction" in e]


@task(name="load-parent", cache_policy=NO_CACHE)
def load_parent(registry: Registry, cfg: ModelConfig) -> LoadedVersion:
    """The version tonight builds on: the champion, or a challenger that already extends it
    (so edits awaiting promotion are not dropped by the next night)."""
    logger = get_run_logger()
    champion = registry.info(cfg.name, "champion")
    parent = champion
    try:
        challenger = registry.info(cfg.name, "challenger")
        if int(challenger.version) > int(champion.version) and _descends(registry, cfg.name, challenger.version, champion.version):
            parent = challenger
    except RegistryUnavailable:
        raise
    except RegistryError:  # no challenger
        pass
    loaded = registry.load_version(cfg.name, parent.version)
    logger.info("building on %s version %s (%d edits so far)", cfg.name, loaded.version, len(loaded.ledger))
    return loaded


def _descends(registry: Registry, name: str, version: str, ancestor: str) -> bool:
    seen = set()
    while version and version not in seen:
        if version == ancestor:
            return True
        seen.add(version)
        version = registry.info(name, version).parent_version
    return False


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_errors(cfg: ModelConfig, state: StateStore) -> IngestBatch:
    batch = ingest(cfg.source, state, cfg.name)
    get_run_logger().info("ingested %d new rows (%d unreadable files)", batch.rows_read, len(batch.file_problems))
    return batch


@task(name="validate", cache_policy=NO_CACHE)
def validate_errors(cfg: ModelConfig, batch: IngestBatch, parent: LoadedVersion, run_id: str,
                    quarantine: QuarantineStore) -> ValidationResult:
    """Great Expectations suite over the rows; rejects go to the quarantine with their reasons."""
    model, tokenizer = parent.model, parent.tokenizer
    labels = [str(v) for _, v in sorted((model.config.id2label or {}).items())] if cfg.task == "classification" else None
    ctx = ValidationContext(
        model=cfg.name, run_id=run_id, labels=labels, max_input_tokens=max_length(model, tokenizer),
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"]),
        known_ids={str(e["id"]) for e in parent.ledger_entries} | set(parent.ledger),
        data_docs_dir=cfg.model_workdir / "gx_data_docs", naive_timestamps=cfg.naive_timestamps,
    )
    result = validate(batch.rows, ctx)
    problems = file_problem_rows(batch.file_problems, cfg.name, run_id)
    quarantine.add(result.quarantined + problems)
    counts = dict(result.counts, files_unreadable=len(problems))
    create_table_artifact(
        key=f"{_key(cfg.name)}-validation",
        table=[{"check": k, "rows": v} for k, v in counts["by_reason"].items()]
        or [{"check": "(none failed)", "rows": 0}],
        description=(f"**{cfg.name}**: {counts['rows_read']} rows read = {counts['accepted']} accepted + "
                     f"{counts['quarantined']} quarantined; {len(problems)} unreadable files. "
                     f"GX data docs: {result.data_docs_index or 'not written'}"),
    )
    get_run_logger().info("validation: %d accepted, %d quarantined, %d unreadable files",
                          counts["accepted"], counts["quarantined"], len(problems))
    return result


@task(name="patch", cache_policy=NO_CACHE)
def patch_errors(cfg: ModelConfig, parent: LoadedVersion, records: list[ErrorRecord], progress: bool = True) -> PatchRun:
    """Sequential Transformer-Patcher edits, checkpointed after each one (resumable)."""
    from tqdm.auto import tqdm

    logger = get_run_logger()
    bar = tqdm(total=len(records), desc=f"patching {cfg.name}", unit="edit", disable=not progress)

    def on_edit(i: int, n: int, outcome) -> None:
        bar.update(1)
        if i % 10 == 0 or i == n:
            logger.info("edit %d/%d %s: %s", i, n, outcome.id,
                        "already correct" if outcome.already_correct else ("fixed" if outcome.fixed else "NOT fixed"))

    try:
        run = patch_night(cfg, parent, records, _ledger_requests(parent.ledger_entries), on_edit)
    finally:
        bar.close()
    if run.resumed_after:
        logger.info("resumed after %d edits from checkpoint %s", run.resumed_after, run.night_key)
    logger.info("patched: %d applied, %d already correct, %d not fixable", len(run.applied),
                len(run.outcomes) - len(run.attempted), len(run.attempted) - len(run.applied))
    return run


@task(name="gate", cache_policy=NO_CACHE)
def gate_candidate(cfg: ModelConfig, parent: LoadedVersion, run: PatchRun, records: list[ErrorRecord],
                   ledger: list[dict]) -> GateReport:
    """Held-out locality (candidate vs parent), SR on tonight's edits, ER on the whole ledger, GR."""
    holdout = read_examples(cfg.holdout)
    inputs, targets = [e.input for e in holdout], [e.correction for e in holdout]
    parent_ref = ModelRef(base_folder=parent.base_folder, patch_dir=None if parent.patch_set is None else _parent_patch_dir(parent))
    candidate_ref = ModelRef(base_folder=parent.base_folder, patch_dir=run.patch_dir)
    champion_holdout = evaluate(parent_ref, inputs, targets, cfg.evaluation, loaded=(parent.model, parent.tokenizer))
    applied = {o.id for o in run.applied}
    paraphrases = [(eq, r.correction) for r in records if r.id in applied for eq in r.equivalents]
    edits = [(e["input"], e["correction"]) for e in ledger]
    cand_inputs = inputs + [x for x, _ in edits] + [x for x, _ in paraphrases]
    cand_targets = targets + [y for _, y in edits] + [y for _, y in paraphrases]
    flags = evaluate(candidate_ref, cand_inputs, cand_targets, cfg.evaluation)
    n, m = len(inputs), len(edits)
    report = decide(cfg.gate, run, champion_holdout, flags[:n], flags[n : n + m], flags[n + m :])
    create_markdown_artifact(key=f"{_key(cfg.name)}-gate", markdown=_gate_markdown(cfg.name, report),
                             description=report.summary())
    (get_run_logger().info if report.passed else get_run_logger().warning)(report.summary())
    return report


def _parent_patch_dir(parent: LoadedVersion) -> Path:
    directory = parent.base_folder.parent / f"parent-v{parent.version}-patches"
    if not (directory / "manifest.json").is_file():
        parent.patch_set.save(directory)
    return directory


@task(name="register", cache_policy=NO_CACHE, retries=0)
def register_candidate(registry: Registry, cfg: ModelConfig, parent: LoadedVersion, run: PatchRun,
                       report: GateReport, ledger: list[dict], flow_run_id: str):
    step_metrics = []
    fixed = attempted = neurons = 0
    for i, o in enumerate(run.outcomes, 1):
        attempted += not o.already_correct
        fixed += o.fixed and not o.already_correct
        neurons += o.neurons
        step_metrics.append({"step": i, "success_rate": fixed / attempted if attempted else 1.0,
                             "neurons": neurons, "seconds": o.seconds, "steps": o.steps})
    alias = "champion" if cfg.auto_promote else "challenger"
    info = registry.register_candidate(
        cfg.name, run.patch_dir, metrics=report.metrics, step_metrics=step_metrics, ledger=ledger,
        parent_version=parent.version, flow_run_id=flow_run_id, alias=alias,
        report=report.model_dump(), night_key=run.night_key,
    )
    get_run_logger().info("registered %s version %s as @%s", cfg.name, info.version, alias)
    return info


@task(name="commit-watermark", cache_policy=NO_CACHE)
def commit_watermark(cfg: ModelConfig, state: StateStore, batch: IngestBatch, run_id: str) -> None:
    state.commit_watermark(cfg.name, batch.pending_watermark, run_id)


def ledger_after(parent: LoadedVersion, records: list[ErrorRecord], run: PatchRun) -> list[dict]:
    """The cumulative edit ledger of the candidate: the parent's entries plus tonight's applied edits."""
    applied = {o.id: o for o in run.applied}
    entries = [e for e in parent.ledger_entries if "input" in e]
    for r in records:
        if r.id in applied:
            entries.append({"id": r.id, "input": r.input, "correction": r.correction, "equivalents": r.equivalents,
                            "logged_at": r.logged_at.isoformat(), "origin": r.origin,
                            "neurons": applied[r.id].neurons, "steps": applied[r.id].steps})
    return entries


def cleanup(cfg: ModelConfig, run: PatchRun) -> None:
    clear_checkpoint(cfg, run.night_key)


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _gate_markdown(name: str, report: GateReport) -> str:
    lines = [f"# Gate for {name}: {'PASSED' if report.passed else 'FAILED'}", "", "| check | value | threshold | result |",
             "|---|---|---|---|"]
    for c in report.checks:
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        lines.append(f"| {c.name} | {value} | {c.comparison} {c.threshold:.4f} | {'pass' if c.passed else 'FAIL'} |")
    lines += ["", "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in report.metrics.items()]
    return "\n".join(lines)
