"""The MLflow pyfunc wrapper that serves a patchflow model version.

Every registered version of a patchflow model is a pyfunc model whose ``python_model`` is
:class:`PatchflowModel`, logged *as code* (MLflow "models from code"): this file itself is copied
into the version's artifacts and executed on load, so no pickle is involved at all.  What a
version holds in its artifacts (``context.artifacts``):

``pointer``   ``patchflow.json`` — a small JSON that says what the version is (see below);
``hf_model``  base version only: the Hugging Face folder (safetensors, config, tokenizer);
``patches``   patch versions only: the cumulative patch set as written by ``PatchSet.save``
              (``patches.safetensors`` + ``manifest.json``);
``ledger`` / ``metrics`` / ``report`` / ``plot``  patch versions only, for people, not for loading.

The pointer of a patch version names its base two ways: ``base_artifact_uri`` (the storage
location of the base version's model artifacts, e.g. ``file:///.../models/m-.../artifacts``,
readable without a tracking server when it is a plain file/object-store URI) and
``base_model_uri`` (``models:/NAME/<base version>``, resolved with the tracking / registry URI
of the process that loads the model).  ``load_context`` tries them in that order.

Loading needs the ``patcher`` package importable (it is part of patchflow).  Model weights are
only ever read from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import mlflow.pyfunc
import pandas as pd

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
            raise ValueError(
                f"expected a DataFrame with a column {INPUT_COLUMN!r}, "
                f"got columns {list(model_input.columns)}"
            )
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


def _download(uri: str, *, dst: Path | None = None, tracking_uri: str | None = None,
              registry_uri: str | None = None) -> Path:
    kwargs: dict[str, Any] = {"artifact_uri": uri}
    if dst is not None:
        kwargs["dst_path"] = str(dst)
    if tracking_uri:
        kwargs["tracking_uri"] = tracking_uri
    if registry_uri:
        kwargs["registry_uri"] = registry_uri
    return Path(mlflow.artifacts.download_artifacts(**kwargs))


def resolve_base_folder(pointer: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The local HF folder of the base model a patch version points at.

    Tries the base's storage location first (used in place when it is local), then the
    ``models:/`` URI through the ambient MLflow tracking / registry URI.  Downloads go to
    ``cache_dir`` (or ``$PATCHFLOW_BASE_CACHE``) when given, keyed by the base's storage
    location, so a base is fetched once; otherwise to a temporary folder.
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
        candidates.append(
            f"{pointer['base_model_uri'].rstrip('/')}/{PYFUNC_ARTIFACTS_DIR}/{HF_MODEL_ARTIFACT}"
        )
    cache_dir = cache_dir or os.environ.get(BASE_CACHE_ENV)
    for uri in candidates:
        try:
            if cache_dir:
                key = hashlib.sha256((art_uri or uri).encode()).hexdigest()[:16]
                target = Path(cache_dir) / f"base-{key}"
                if (target / "DONE").is_file():
                    return target / (target / "DONE").read_text().strip()
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=cache_dir))
                got = _download(uri, dst=tmp)
                (tmp / "DONE").write_text(got.name + "\n")
                if target.exists():
                    shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
                return target / got.name
            return _download(uri)
        except Exception as exc:  # try the next way of reaching the base
            errors.append(f"{uri}: {exc}")
    raise RuntimeError(
        "patchflow: cannot reach the base model of this version "
        f"({pointer.get('base_model_uri')}); tried: " + "; ".join(errors or ["nothing to try"])
    )


class PatchflowModel(mlflow.pyfunc.PythonModel):
    """Base HF model (+ the version's cumulative patch set), predicting label names or text."""

    def __init__(self) -> None:
        self.model = None
        self.tokenizer = None
        self.pointer: dict[str, Any] = {}
        self.patch_set = None

    def load_context(self, context) -> None:
        import patcher

        arts = dict(context.artifacts or {})
        if "pointer" not in arts:
            raise RuntimeError("patchflow: this model has no 'pointer' artifact")
        self.pointer = json.loads(Path(arts["pointer"]).read_text())
        kind = self.pointer.get("kind")
        if kind == "base":
            folder = Path(arts[HF_MODEL_ARTIFACT])
        elif kind == "patch":
            folder = resolve_base_folder(self.pointer)
        else:
            raise RuntimeError(f"patchflow: unknown version kind {kind!r} in pointer")
        self.model, self.tokenizer = patcher.load_model(folder)
        if kind == "patch":
            self.patch_set = patcher.PatchSet.load(arts[PATCHES_ARTIFACT])
            self.patch_set.apply(self.model)
        self.model.eval()

    # The DataFrame hint only tells MLflow not to validate/convert: we accept the forms to_texts
    # lists (DataFrame, Series, list of str, str, dict).
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        import patcher

        if self.model is None:
            raise RuntimeError("patchflow: model not loaded (load_context was not called)")
        texts = to_texts(model_input)
        out: list[str] = []
        for i in range(0, len(texts), _PREDICT_BATCH):
            out.extend(patcher.predict(self.model, self.tokenizer, texts[i : i + _PREDICT_BATCH]))
        return out


# Models from code: when MLflow executes this file to load a logged version it runs it as a
# fresh module (not as ``tasks.serving``); only then do we hand it the model object.
if __name__ != "tasks.serving":
    mlflow.models.set_model(PatchflowModel())
