"""The MLflow pyfunc that serves a patchflow model version, logged as code ("models from code").

``mlflow.pyfunc.log_model(python_model=<this file>, code_paths=[<patcher package>])`` copies this
file and the ``patcher`` package into the version's ``code/`` folder; MLflow puts that folder on
``sys.path`` and executes this file when it loads the version. Nothing is pickled, and a process
that has only MLflow, torch and transformers installed (no patchflow checkout) can load and serve
the version. This file therefore imports nothing of patchflow except ``patcher``.

What a version holds in its artifacts (``context.artifacts``):

``pointer``   ``patchflow.json``: what the version is (kind, base fingerprint, where the base is);
``hf_model``  base version only: the Hugging Face folder (safetensors, config, tokenizer);
``patches``   patch versions only: the cumulative patch set written by ``PatchSet.save``;
``ledger`` / ``metrics`` / ``report`` / ``plot``  patch versions only.

A patch version names its base two ways: ``base_artifact_uri`` (the storage location of the base
version's model artifacts, used in place when it is a local folder) and ``base_model_uri``
(``models:/NAME/<base version>``, resolved with the loading process' tracking URI). Downloaded
bases are kept in ``$PATCHFLOW_BASE_CACHE`` when it is set.

Load-time options (``mlflow.pyfunc.load_model(uri, model_config={...})``): ``device`` ("auto":
cuda when available, else cpu; or "cpu", "cuda", "cuda:N") and ``dtype`` ("auto" keeps the saved
dtype; "float32", "bfloat16", "float16"), resolved by ``patcher.load_model``. Weights are only
ever read from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd

import patcher
from patcher.storage import build_once

POINTER_FORMAT = "patchflow-pointer/1"
POINTER_FILE = "patchflow.json"
HF_MODEL_ARTIFACT = "hf_model"
PATCHES_ARTIFACT = "patches"
#: Where a pyfunc model folder keeps its ``artifacts={...}`` entries (MLflow's layout).
PYFUNC_ARTIFACTS_DIR = "artifacts"
#: Column read from a DataFrame input.
INPUT_COLUMN = "input"
#: Environment variable: a folder in which downloaded base models are kept between loads.
BASE_CACHE_ENV = "PATCHFLOW_BASE_CACHE"
#: Load-time options (``model_config``) and their defaults, logged with every version.
DEFAULT_OPTIONS = {"device": "auto", "dtype": "auto"}

_PREDICT_BATCH = 64


def local_path_of(uri: str) -> Path | None:
    """The local folder behind ``uri`` when it is a plain path or a ``file:`` URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        return path if path.exists() else None
    if len(parsed.scheme) == 1:  # a Windows drive letter
        path = Path(uri)
        return path if path.exists() else None
    return None


def build_model(base_folder: Path, patch_set: "patcher.PatchSet | None", *, device="auto", dtype=None,
                base_fingerprint: str | None = None):
    """Load the base from ``base_folder`` on ``device`` in ``dtype`` and apply ``patch_set``.

    The patch set is checked against the loaded base's fingerprint when the base keeps its saved
    dtype; in another dtype the weights differ by design, so the manifest's fingerprint is checked
    against ``base_fingerprint`` (the registered base's) instead."""
    model, tokenizer = patcher.load_model(base_folder, dtype=dtype, device=device)
    if patch_set is not None:
        if patcher.resolve_dtype(dtype) is None:
            patch_set.apply(model)
        else:
            if base_fingerprint and patch_set.manifest.base_fingerprint != base_fingerprint:
                raise patcher.PatchError("patch set was made for a different base model (fingerprint mismatch)")
            patch_set.apply(model, check_base=False)
    model.eval()
    return model, tokenizer


def to_texts(model_input: Any) -> list[str]:
    """Normalise a pyfunc input to a list of strings.

    Accepts a pandas DataFrame (column ``input``, or its only column), a Series, a list/tuple of
    strings, a single string, a numpy array, or a dict ``{"input": [...]}``.
    """
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            values = model_input[INPUT_COLUMN]
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a DataFrame with a column {INPUT_COLUMN!r}, "
                             f"got columns {list(model_input.columns)}")
        return [str(v) for v in values.tolist()]
    if isinstance(model_input, pd.Series):
        return [str(v) for v in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise ValueError(f"expected a dict with key {INPUT_COLUMN!r}")
        return to_texts(model_input[INPUT_COLUMN])
    if hasattr(model_input, "tolist"):  # numpy array
        model_input = model_input.tolist()
    if isinstance(model_input, (list, tuple)):
        out = []
        for v in model_input:
            if isinstance(v, dict):
                v = v[INPUT_COLUMN]
            elif isinstance(v, (list, tuple)) and len(v) == 1:
                v = v[0]
            out.append(str(v))
        return out
    raise TypeError(f"unsupported model input type {type(model_input).__name__}")


def resolve_base_folder(pointer: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The local HF folder of the base model a patch version points at.

    Tries the base's storage location first (used in place when it is local), then the
    ``models:/`` URI through the ambient MLflow tracking / registry URI. Downloads are kept in
    ``cache_dir`` (or ``$PATCHFLOW_BASE_CACHE``) when given, keyed by the base's storage location,
    else in a temporary folder.
    """
    errors: list[str] = []
    art_uri = pointer.get("base_artifact_uri")
    candidates: list[str] = []
    if art_uri:
        sub = f"{art_uri.rstrip('/')}/{PYFUNC_ARTIFACTS_DIR}/{HF_MODEL_ARTIFACT}"
        local = local_path_of(sub)
        if local is not None and (local / "config.json").is_file():
            return local
        candidates.append(sub)
    if pointer.get("base_model_uri"):
        candidates.append(f"{pointer['base_model_uri'].rstrip('/')}/{PYFUNC_ARTIFACTS_DIR}/{HF_MODEL_ARTIFACT}")
    cache_dir = cache_dir or os.environ.get(BASE_CACHE_ENV)
    for uri in candidates:
        try:
            if cache_dir:
                key = hashlib.sha256((art_uri or uri).encode()).hexdigest()[:16]
                return build_once(Path(cache_dir) / f"base-{key}", lambda tmp, uri=uri: Path(
                    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))))
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                            dst_path=tempfile.mkdtemp(prefix="patchflow-base-")))
        except Exception as exc:  # try the next way of reaching the base
            errors.append(f"{uri}: {exc}")
    raise RuntimeError("patchflow: cannot reach the base model of this version "
                       f"({pointer.get('base_model_uri')}); tried: " + "; ".join(errors or ["nothing to try"]))


class PatchflowModel(mlflow.pyfunc.PythonModel):
    """Base HF model (+ the version's cumulative patch set), predicting label names or text."""

    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.pointer: dict[str, Any] = {}
        self.patch_set = None

    def load_context(self, context) -> None:
        arts = dict(context.artifacts or {})
        if "pointer" not in arts:
            raise RuntimeError("patchflow: this model has no 'pointer' artifact")
        options = {**DEFAULT_OPTIONS, **(getattr(context, "model_config", None) or {})}
        self.pointer = json.loads(Path(arts["pointer"]).read_text())
        kind = self.pointer.get("kind")
        if kind == "base":
            folder = Path(arts[HF_MODEL_ARTIFACT])
        elif kind == "patch":
            folder = resolve_base_folder(self.pointer)
            self.patch_set = patcher.PatchSet.load(arts[PATCHES_ARTIFACT])
        else:
            raise RuntimeError(f"patchflow: unknown version kind {kind!r} in pointer")
        self.model, self.tokenizer = build_model(
            folder, self.patch_set, device=options["device"], dtype=options["dtype"],
            base_fingerprint=self.pointer.get("base_fingerprint"))

    # A DataFrame hint is one MLflow infers no signature from, so it neither validates nor converts:
    # every form to_texts lists is accepted (DataFrame, Series, list of str, str, dict).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        if self.model is None:
            raise RuntimeError("patchflow: model not loaded (load_context was not called)")
        texts = to_texts(model_input)
        out: list[str] = []
        for i in range(0, len(texts), _PREDICT_BATCH):
            out.extend(patcher.predict(self.model, self.tokenizer, texts[i : i + _PREDICT_BATCH]))
        return out


# Models from code: MLflow executes this file under a fresh module name to load a version; only
# then is the model object handed over (importing it as a module has no side effect).
if __name__ != "tasks.registry.pyfunc_model":
    mlflow.models.set_model(PatchflowModel())
