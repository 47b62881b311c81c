"""The Prefect tasks of one night. Each is a thin, typed step over the plain functions in
tasks/ (ingest, validate, quarantine, patch, gate, registry), so the flow reads like the night
itself (ingest, validate, patch, gate, register) and every step shows up in the Prefect UI with
its own state.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from datetime import datetime, timezone

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from patcher import PatchError, resolve_family
from patcher.encoding import encode, max_length
from tasks.config import ModelConfig
from tasks.evaluate import ModelRef, evaluate_sets
from tasks.gate import GateReport, decide
from tasks.ingest import IngestBatch, StateStore, ingest
from tasks.patch import PatchFailure, PatchRun, clear_checkpoint, ledger_after, patch_night
from tasks.quarantine import QuarantineStore, file_problem_rows
from tasks.records import ErrorRecord, LedgerEntry, QuarantineRow
from tasks.registry import LoadedVersion, Registry
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


@task(name="load-parent", cache_policy=NO_CACHE)
def load_parent(registry: Registry, cfg: ModelConfig) -> LoadedVersion:
    """The version tonight builds on: the champion, or a challenger that already extends it (so
    edits awaiting promotion are not dropped), never a lineage that holds a rolled-back version."""
    base = registry.night_base(cfg.name)
    loaded = registry.load_version(cfg.name, base.version, device=cfg.device, dtype=cfg.dtype)
    get_run_logger().info("building on %s version %s (%d edits so far)", cfg.name, loaded.version, len(loaded.ledger))
    return loaded


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_errors(cfg: ModelConfig, state: StateStore) -> IngestBatch:
    batch = ingest(cfg.source, state, cfg.name)
    get_run_logger().info("ingested %d new rows (%d unreadable files, %d rows already ingested skipped, "
                          "%d files with an unfinished last line waiting)", batch.rows_read,
                          len(batch.file_problems), batch.skipped_known, len(batch.waiting))
    return batch


def edit_checker(model, tokenizer):
    """Whether the patcher can take an (input, correction) pair, asked of the patcher itself: the
    prompt and target must fit the model and the label must exist. Returns the reason, or None."""
    family = resolve_family(model)

    def check(text: str, correction: str) -> str | None:
        try:
            encode(model, tokenizer, family, text, correction)
        except PatchError as exc:
            return str(exc)  # validation files it under the `unpatchable` check
        return None

    return check


@task(name="validate", cache_policy=NO_CACHE)
def validate_errors(cfg: ModelConfig, batch: IngestBatch, parent: LoadedVersion, run_id: str,
                    quarantine: QuarantineStore) -> ValidationResult:
    """Great Expectations suite over the rows; rejects go to the quarantine with their reasons."""
    model, tokenizer = parent.model, parent.tokenizer
    labels = [str(v) for _, v in sorted((model.config.id2label or {}).items())] if cfg.task == "classification" else None
    ctx = ValidationContext(
        model=cfg.name, run_id=run_id, labels=labels, max_input_tokens=max_length(model, tokenizer),
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=True)["input_ids"]),
        known_ids={e.id for e in parent.ledger}, max_chars=cfg.max_input_chars,
        check_edit=edit_checker(model, tokenizer),
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

    def on_edit(i: int, n: int, step) -> None:
        bar.update(1)
        if isinstance(step, PatchFailure):
            logger.warning("edit %d/%d %s: %s", i, n, step.id, step.reason)
        elif i % 10 == 0 or i == n:
            logger.info("edit %d/%d %s: %s", i, n, step.id,
                        "already correct" if step.already_correct else ("fixed" if step.fixed else "NOT fixed"))

    try:
        run = patch_night(cfg, parent, records, on_edit)
    finally:
        bar.close()
    if run.resumed_after:
        logger.info("resumed after %d edits from checkpoint %s", run.resumed_after, run.night_key)
    logger.info("patched: %d applied, %d already correct, %d not fixed, %d unpatchable", len(run.applied),
                len(run.results) - len(run.attempted), len(run.attempted) - len(run.applied), len(run.failed))
    return run


@task(name="quarantine-unpatchable", cache_policy=NO_CACHE)
def quarantine_unpatchable(cfg: ModelConfig, run: PatchRun, records: list[ErrorRecord], run_id: str,
                           quarantine: QuarantineStore) -> int:
    """Records the patcher refused go to the quarantine with its reason, like any rejected row."""
    by_id = {r.id: r for r in records}
    rows = [QuarantineRow(model=cfg.name, run_id=run_id, origin=by_id[f.id].origin, record_id=f.id,
                          raw=by_id[f.id].model_dump_json(), reasons=[f.reason]) for f in run.failed]
    return quarantine.add(rows) if rows else 0


@task(name="gate", cache_policy=NO_CACHE)
def gate_candidate(cfg: ModelConfig, parent: LoadedVersion, run: PatchRun, ledger: list[LedgerEntry]) -> GateReport:
    """Locality on the held-out set (candidate vs parent), SR on tonight's edits, ER on the whole
    ledger, GR on tonight's held-out paraphrases; every judgement as the model is served."""
    holdout = [(e.input, e.correction) for e in read_examples(cfg.holdout)]
    parent_ref = ModelRef(base_folder=parent.base_folder, patch_dir=parent.patch_dir, device=cfg.device, dtype=cfg.dtype)
    candidate_ref = parent_ref.model_copy(update={"patch_dir": run.patch_dir})
    applied = {r.id for r in run.applied}
    paraphrases = [(p, e.correction) for e in ledger if e.id in applied for p in e.heldout_equivalents]
    before = evaluate_sets(parent_ref, {"holdout": holdout}, cfg.evaluation, loaded=(parent.model, parent.tokenizer))
    after = evaluate_sets(candidate_ref, {"holdout": holdout, "ledger": [(e.input, e.correction) for e in ledger],
                                          "paraphrases": paraphrases}, cfg.evaluation)
    report = decide(cfg.gate, run, before["holdout"], after["holdout"], after["ledger"], after["paraphrases"])
    create_markdown_artifact(key=f"{_key(cfg.name)}-gate", markdown=_gate_markdown(cfg.name, report),
                             description=report.summary())
    (get_run_logger().info if report.passed else get_run_logger().warning)(report.summary())
    return report


@task(name="register", cache_policy=NO_CACHE, retries=0)
def register_candidate(registry: Registry, cfg: ModelConfig, parent: LoadedVersion, run: PatchRun,
                       report: GateReport, ledger: list[LedgerEntry], flow_run_id: str):
    step_metrics = []
    fixed = attempted = neurons = 0
    for i, r in enumerate(run.results, 1):
        attempted += not r.already_correct
        fixed += r.fixed and not r.already_correct
        neurons += r.neurons
        step_metrics.append({"step": i, "success_rate": fixed / attempted if attempted else 1.0,
                             "neurons": neurons, "seconds": r.seconds, "steps": r.steps})
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


def candidate_ledger(cfg: ModelConfig, parent: LoadedVersion, records: list[ErrorRecord], run: PatchRun) -> list[LedgerEntry]:
    return ledger_after(parent.ledger, records, run, cfg.paraphrase_holdout)


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
