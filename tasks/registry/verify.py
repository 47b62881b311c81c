"""Read a new version back from the store before it may be tagged complete or aliased."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.artifacts
import patcher

from tasks.records import read_ledger
from tasks.registry import pyfunc_model as pm
from tasks.registry.client import RegistryClient
from tasks.registry.versions import TAG_KIND, TAG_PATCH_COUNT, RegistryError, RegistryUnavailable
from tasks.registry.loading import LEDGER_FILE


def verify_version(reg: RegistryClient, name: str, version: str) -> dict[str, Any]:
    """Download what serving needs and check it; returns the version's pointer.

    Both kinds: ``MLmodel``, the pointer (its kind must match the tag) and the ``patcher`` package
    in the model's ``code/`` folder. Base: ``hf_model/config.json`` and a ``*.safetensors`` file.
    Patch: the patch set loads, its edit count matches ``patchflow.patch_count``, its base
    fingerprint the pointer's, and the ledger parses and lists exactly the patch set's edits.
    Raises :class:`RegistryError` naming what is wrong.
    """
    mv = reg.get_version(name, version)
    tags = dict(mv.tags or {})
    source = mv.source.rstrip("/")
    arts = f"{source}/{pm.PYFUNC_ARTIFACTS_DIR}"
    where = f"model {name!r} version {version}"
    with tempfile.TemporaryDirectory(prefix="patchflow-verify-") as tmp:
        tmp = Path(tmp)
        try:
            mlmodel = reg.download(f"{source}/MLmodel", tmp / "m")
            pointer_path = reg.download(f"{arts}/{pm.POINTER_FILE}", tmp / "p")
            code = reg.download(f"{source}/code/patcher/__init__.py", tmp / "c")
        except RegistryUnavailable:
            raise
        except Exception as exc:
            raise RegistryError(f"{where}: MLmodel, pointer or code/patcher missing at {source}: {exc}") from exc
        if not mlmodel.is_file() or not code.is_file():
            raise RegistryError(f"{where}: no MLmodel or code/patcher at {source}")
        pointer = json.loads(pointer_path.read_text())
        kind = tags.get(TAG_KIND)
        if pointer.get("kind") != kind:
            raise RegistryError(f"{where}: pointer kind {pointer.get('kind')!r} != tag {kind!r}")
        if kind == "base":
            listed = reg.call(mlflow.artifacts.list_artifacts, artifact_uri=f"{arts}/{pm.HF_MODEL_ARTIFACT}",
                              tracking_uri=reg.tracking_uri)
            names = {Path(f.path).name for f in listed if not f.is_dir}
            if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
                raise RegistryError(f"{where}: base artifacts incomplete (found {sorted(names)})")
            return pointer
        try:
            pdir = reg.download(f"{arts}/{pm.PATCHES_ARTIFACT}", tmp / "patches")
            ledger_path = reg.download(f"{arts}/{LEDGER_FILE}", tmp / "l")
        except RegistryUnavailable:
            raise
        except Exception as exc:
            raise RegistryError(f"{where}: patch set or ledger missing at {arts}: {exc}") from exc
        try:
            patch_set = patcher.PatchSet.load(pdir)
        except patcher.PatchError as exc:
            raise RegistryError(f"{where}: the stored patch set does not load: {exc}") from exc
        if str(len(patch_set)) != tags.get(TAG_PATCH_COUNT):
            raise RegistryError(f"{where}: stored patch set has {len(patch_set)} edits, tag {TAG_PATCH_COUNT} "
                                f"says {tags.get(TAG_PATCH_COUNT)}")
        if patch_set.manifest.base_fingerprint != pointer.get("base_fingerprint"):
            raise RegistryError(f"{where}: manifest and pointer disagree on the base fingerprint")
        try:
            ledger = read_ledger(ledger_path)
        except Exception as exc:
            raise RegistryError(f"{where}: the stored ledger does not parse: {exc}") from exc
        if sorted(e.id for e in ledger) != sorted(patch_set.edit_ids):
            raise RegistryError(f"{where}: the stored ledger does not list the patch set's edits")
    return pointer
