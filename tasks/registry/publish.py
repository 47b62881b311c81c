"""Registering versions: the base once, then one patch version per approved night.

A version's model is an MLflow pyfunc logged with ``mlflow.pyfunc.log_model`` as code (the file
``pyfunc_model.py``) with ``code_paths`` carrying the ``patcher`` package, so it loads wherever
MLflow, torch and transformers are installed. A patch version stores only what rebuilds it: the
cumulative patch set, a pointer naming its base, the ledger (``tasks.records.write_ledger``), the
gate metrics / report and the stream plot. A version is read back (:mod:`.verify`) before it is
tagged ``patchflow.complete`` and before any alias points at it; a version that fails on the way is
deleted (or, when that fails too, left untagged and removed by the next attempt of the night).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import mlflow.pyfunc
import patcher
from mlflow.entities import LoggedModelOutput

from tasks.records import LedgerEntry, write_ledger
from tasks.registry import lifecycle
from tasks.registry import pyfunc_model as pm
from tasks.registry.client import RegistryClient, safe_name, short_hash
from tasks.registry.loading import LEDGER_FILE
from tasks.registry.report import log_run_data, render_stream_plot
from tasks.registry.versions import (CHALLENGER, CHAMPION, TAG_BASE_VERSION, TAG_COMPLETE, TAG_FINGERPRINT,
                                     TAG_FLOW_RUN_ID, TAG_INCOMPLETE, TAG_KIND, TAG_NIGHT_KEY, TAG_PARENT_VERSION,
                                     TAG_PATCH_COUNT, TAG_PREVIOUS_CHAMPION, TAG_REGISTERED_MODEL, TAG_TASK,
                                     ModelVersionInfo, RegistryError, RegistryUnavailable)

METRICS_FILE, REPORT_FILE, PLOT_FILE = "metrics.json", "gate_report.json", "metrics.png"
#: Files copied from a HF folder into the base version (never pickles).
_HF_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".tiktoken"}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack"}


def _requirements() -> list[str]:
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", "safetensors", "pandas"]


def copy_hf_folder(src: Path, dst: Path) -> None:
    """Copy the loadable part of a HF folder (safetensors, configs, tokenizer), never pickles."""
    if not (src / "config.json").is_file():
        raise RegistryError(f"{src} is not a Hugging Face model folder (no config.json)")
    if not any(src.glob("*.safetensors")):
        found = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        raise RegistryError(f"{src} has no *.safetensors weights"
                            + (f" (only pickled weights {found}, which patchflow does not load)" if found else ""))
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix in _HF_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def copy_patch_dir(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=lambda _d, names: [n for n in names if n.startswith(".")
                                                         or Path(n).suffix in _PICKLE_SUFFIXES])


def log_pyfunc(reg: RegistryClient, experiment_id: str, run_id: str, artifacts: dict[str, str],
               tags: dict[str, str]):
    """``mlflow.pyfunc.log_model`` into a LoggedModel of ``run_id`` made by this registry's client."""
    lm = reg.call(reg.client.create_logged_model, experiment_id, name="model", source_run_id=run_id,
                  tags=tags, model_type="patchflow")
    try:
        reg.call(reg.client.log_outputs, run_id, [LoggedModelOutput(lm.model_id, step=0)])
        with reg.fluent():
            reg.call(mlflow.pyfunc.log_model, name="model", python_model=str(Path(pm.__file__).resolve()),
                     code_paths=[str(Path(patcher.__file__).resolve().parent)], artifacts=artifacts,
                     pip_requirements=_requirements(), model_config=dict(pm.DEFAULT_OPTIONS),
                     model_id=lm.model_id)
    except BaseException:
        try:  # log_model marks it FAILED itself once it started; before that, we do
            reg.client.finalize_logged_model(lm.model_id, "FAILED")
        except Exception:
            pass
        raise
    return reg.call(reg.client.get_logged_model, lm.model_id)


def discard_version(reg: RegistryClient, name: str, version: str, why: str) -> bool:
    """Remove a version that must never be served; True when removed. One that cannot be removed
    is tagged incomplete: never loaded nor aliased, and removed by the next attempt of its night."""
    try:
        mv = reg.call(reg.client.get_model_version, name, version)
        previous = (mv.tags or {}).get(TAG_PREVIOUS_CHAMPION, "")
        for alias in getattr(mv, "aliases", None) or []:
            if alias == CHAMPION and previous:  # the move half happened: put it back
                reg.call(reg.client.set_registered_model_alias, name, CHAMPION, previous)
            else:
                reg.call(reg.client.delete_registered_model_alias, name, alias)
        reg.call(reg.client.delete_model_version, name, version)
        return True
    except Exception:
        try:
            reg.client.set_model_version_tag(name, version, TAG_INCOMPLETE, "true")
            reg.client.set_model_version_tag(name, version, TAG_COMPLETE, "false")
        except Exception:
            pass
        return False


def _failed(name: str, what: str, version: str | None, removed: bool, exc: BaseException) -> RegistryError:
    if version is None:
        after = ""
    elif removed:
        after = f" after version {version} was created; that version was removed and no alias points at it"
    else:
        after = (f" after version {version} was created; it could not be removed now, is not marked complete "
                 "(so it is never loaded or aliased) and the next attempt of this night removes it")
    kind = RegistryUnavailable if isinstance(exc, RegistryUnavailable) else RegistryError
    return kind(f"registering {what} of model {name!r} failed{after}: {exc}")


def _publish(reg: RegistryClient, name: str, what: str, run_id: str, logged, lineage_tags: dict[str, str],
             finish) -> str:
    """Create the version, verify it, mark it complete, then ``finish(version)`` (aliases)."""
    version = None
    try:
        version = str(reg._create_version(name, logged, run_id, lineage_tags).version)
        if lineage_tags[TAG_KIND] == "base":
            reg.set_version_tag(name, version, TAG_BASE_VERSION, version)
        reg.verify_version(name, version)
        reg.set_version_tag(name, version, TAG_COMPLETE, "true")
        finish(version)
    except BaseException as exc:
        removed = version is not None and discard_version(reg, name, version, f"{what} failed: {exc}")
        reg.end_run(run_id, "FAILED")
        raise _failed(name, what, version, removed, exc) from exc
    reg.end_run(run_id, "FINISHED")
    return version


def register_base(reg: RegistryClient, name: str, model_dir: str | Path, task: str) -> ModelVersionInfo:
    """Register the HF folder ``model_dir`` as the base version and make it champion. Idempotent:
    an existing complete base is returned (RegistryError when its fingerprint differs)."""
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="patchflow-base-") as tmp:
        staged = Path(tmp) / pm.HF_MODEL_ARTIFACT
        copy_hf_folder(model_dir, staged)
        model, _tok = patcher.load_model(staged, device="cpu")  # saved dtype: the fingerprint of record
        fp, model_type = patcher.fingerprint(model), getattr(model.config, "model_type", "")
        del model, _tok
        reg.ensure_registered_model(name, task)
        aliased = reg.aliases_by_version(name)
        for mv in reg.versions(name):
            tags = dict(mv.tags or {})
            if tags.get(TAG_KIND) != "base":
                continue
            if tags.get(TAG_COMPLETE) != "true":
                if str(mv.version) not in aliased:
                    discard_version(reg, name, str(mv.version), "leftover incomplete base")
                continue
            if tags.get(TAG_FINGERPRINT) != fp:
                raise RegistryError(f"model {name!r} already has base version {mv.version} with fingerprint "
                                    f"{tags.get(TAG_FINGERPRINT, '?')[:12]}…, but {model_dir} has {fp[:12]}…; "
                                    "register it under another name")
            return reg.info(name, str(mv.version))
        exp_id = reg.experiment_id(name)
        lineage_tags = {TAG_KIND: "base", TAG_TASK: task, TAG_FINGERPRINT: fp, TAG_PATCH_COUNT: "0",
                        TAG_PARENT_VERSION: "", TAG_FLOW_RUN_ID: ""}
        run_id = reg.call(reg.client.create_run, exp_id, run_name=f"{safe_name(name)}-base",
                          tags={**lineage_tags, TAG_REGISTERED_MODEL: name}).info.run_id
        pointer = Path(tmp) / pm.POINTER_FILE
        pointer.write_text(json.dumps({"format": pm.POINTER_FORMAT, "kind": "base", "registered_model": name,
                                       "task": task, "model_type": model_type, "base_fingerprint": fp}, indent=2))
        try:
            logged = log_pyfunc(reg, exp_id, run_id, {"pointer": str(pointer), pm.HF_MODEL_ARTIFACT: str(staged)},
                                tags={TAG_KIND: "base", TAG_REGISTERED_MODEL: name})
        except BaseException as exc:
            reg.end_run(run_id, "FAILED")
            raise _failed(name, "the base", None, False, exc) from exc

        def finish(version: str) -> None:
            if reg.alias_version(name, CHAMPION) is None:
                lifecycle.move_champion(reg, name, version, action="register_base", reason="base model registered")

        version = _publish(reg, name, "the base", run_id, logged, lineage_tags, finish)
    return reg.info(name, version)


def find_night(reg: RegistryClient, name: str, night_key: str) -> ModelVersionInfo | None:
    """The complete version registered with ``night_key``, if any."""
    for mv in reg.versions(name):
        tags = dict(mv.tags or {})
        if tags.get(TAG_NIGHT_KEY) == night_key and tags.get(TAG_COMPLETE) == "true":
            return reg.info(name, str(mv.version))
    return None


def _check_ledger(name: str, ledger: list[LedgerEntry], patch_set: patcher.PatchSet) -> None:
    """The ledger must list exactly the edits of the patch set (every edit since the base)."""
    ids = [e.id for e in ledger]
    if len(set(ids)) != len(ids):
        raise RegistryError(f"model {name!r}: the ledger lists an edit twice")
    missing, extra = set(patch_set.edit_ids) - set(ids), set(ids) - set(patch_set.edit_ids)
    if missing or extra:
        raise RegistryError(f"model {name!r}: the ledger does not match the patch set (edits without a ledger entry: "
                            f"{sorted(missing)[:5]}; ledger entries without a patch: {sorted(extra)[:5]})")


def register_candidate(reg: RegistryClient, name: str, patch_dir: str | Path, metrics: dict[str, float],
                       step_metrics: list[dict], ledger: list[LedgerEntry], parent_version: str,
                       flow_run_id: str, alias: str | None = CHALLENGER, report: dict | None = None,
                       night_key: str | None = None) -> ModelVersionInfo:
    """Register the cumulative patch set in ``patch_dir`` (built on ``parent_version``) as a new
    version; see :meth:`tasks.registry.Registry.register_candidate`."""
    if alias not in (None, CHALLENGER, CHAMPION):
        raise ValueError(f"alias must be 'challenger', 'champion' or None, not {alias!r}")
    patch_dir, report, parent_version = Path(patch_dir), dict(report or {}), str(parent_version)
    reg.registered_model(name)
    versions = reg.all_infos(name)
    parent = versions.get(parent_version)
    if parent is None:
        raise RegistryError(f"model {name!r} has no version {parent_version!r}")
    if not parent.complete:
        raise RegistryError(f"model {name!r}: parent version {parent_version} is incomplete")
    base_version = parent.base_version or parent_version
    base = versions[base_version]
    task = base.tags.get(TAG_TASK, parent.tags.get(TAG_TASK, ""))
    try:
        patch_set = patcher.PatchSet.load(patch_dir)
    except patcher.PatchError as exc:
        raise RegistryError(f"model {name!r}: {exc}") from exc
    fp, edit_ids = patch_set.manifest.base_fingerprint, patch_set.edit_ids
    if base.tags.get(TAG_FINGERPRINT) and fp != base.tags[TAG_FINGERPRINT]:
        raise RegistryError(f"model {name!r}: the patch set in {patch_dir} was made for base fingerprint "
                            f"{str(fp)[:12]}…, but base version {base_version} has {base.tags[TAG_FINGERPRINT][:12]}…")
    _check_ledger(name, ledger, patch_set)
    if night_key is None:
        night_key = "auto-" + short_hash(json.dumps([parent_version, fp, edit_ids]))
    existing = find_night(reg, name, night_key)
    if existing is not None:
        return _repair_alias(reg, name, existing, alias, parent_version)
    problem = lifecycle.base_problem(versions, parent_version)
    if problem:
        raise RegistryError(f"model {name!r}: a night may not build on version {parent_version}: {problem}")
    for v in versions.values():  # leftovers of a crashed attempt with the same key
        if v.tags.get(TAG_NIGHT_KEY) == night_key and not v.aliases:
            discard_version(reg, name, v.version, "leftover of an earlier failed attempt")

    lineage_tags = {TAG_KIND: "patch", TAG_TASK: task, TAG_BASE_VERSION: base_version,
                    TAG_PARENT_VERSION: parent_version, TAG_PATCH_COUNT: str(len(patch_set)),
                    TAG_FLOW_RUN_ID: str(flow_run_id), TAG_NIGHT_KEY: night_key, TAG_FINGERPRINT: str(fp)}
    exp_id = reg.experiment_id(name)
    run_id = reg.call(reg.client.create_run, exp_id, run_name=f"night-{safe_name(night_key)}",
                      tags={**lineage_tags, TAG_REGISTERED_MODEL: name}).info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="patchflow-candidate-") as tmp:
            staged = Path(tmp)
            log_run_data(reg, run_id, metrics, step_metrics, patch_set)
            copy_patch_dir(patch_dir, staged / pm.PATCHES_ARTIFACT)
            write_ledger(staged / LEDGER_FILE, ledger)
            (staged / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "steps": step_metrics}, indent=2,
                                                          default=str))
            (staged / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
            render_stream_plot(step_metrics, metrics, staged / PLOT_FILE,
                               title=f"{name} — night {night_key} ({len(patch_set)} edits)")
            (staged / pm.POINTER_FILE).write_text(json.dumps({
                "format": pm.POINTER_FORMAT, "kind": "patch", "registered_model": name, "task": task,
                "model_type": patch_set.manifest.model_type, "base_version": base_version,
                "base_model_uri": f"models:/{name}/{base_version}", "base_artifact_uri": base.source,
                "base_fingerprint": fp, "parent_version": parent_version, "patch_count": len(patch_set),
                "edit_ids": edit_ids, "night_key": night_key, "flow_run_id": str(flow_run_id)}, indent=2))
            for f in (LEDGER_FILE, REPORT_FILE, METRICS_FILE, PLOT_FILE):
                reg.call(reg.client.log_artifact, run_id, str(staged / f))
            logged = log_pyfunc(reg, exp_id, run_id, {
                "pointer": str(staged / pm.POINTER_FILE), pm.PATCHES_ARTIFACT: str(staged / pm.PATCHES_ARTIFACT),
                "ledger": str(staged / LEDGER_FILE), "metrics": str(staged / METRICS_FILE),
                "report": str(staged / REPORT_FILE), "plot": str(staged / PLOT_FILE)},
                tags={TAG_KIND: "patch", TAG_REGISTERED_MODEL: name, TAG_NIGHT_KEY: night_key})
    except BaseException as exc:
        reg.end_run(run_id, "FAILED")
        raise _failed(name, f"a candidate (night {night_key!r})", None, False, exc) from exc

    def finish(version: str) -> None:
        if alias == CHAMPION:
            lifecycle.move_champion(reg, name, version, action="register_candidate",
                                    reason=str(report.get("reason") or "auto-promotion"))
        elif alias == CHALLENGER:
            reg.call(reg.client.set_registered_model_alias, name, CHALLENGER, version)

    version = _publish(reg, name, f"a candidate (night {night_key!r})", run_id, logged, lineage_tags, finish)
    return reg.info(name, version)


def _repair_alias(reg: RegistryClient, name: str, info: ModelVersionInfo, alias: str | None,
                  parent_version: str) -> ModelVersionInfo:
    """On a repeated night: set the requested alias if an earlier attempt died just before (never
    on a version retired or rolled back since)."""
    if alias is None or info.aliases or info.retired or info.rolled_back:
        return info
    current = reg.alias_version(name, alias)
    if current is None or str(current.version) == parent_version:
        if alias == CHAMPION:
            lifecycle.move_champion(reg, name, info.version, action="register_candidate",
                                    reason="auto-promotion (repeated night)")
        else:
            reg.call(reg.client.set_registered_model_alias, name, alias, info.version)
        return reg.info(name, info.version)
    return info
