"""MLflow model registry for patchflow (DESIGN §5): plain functions, no Prefect.

Conventions
-----------
* One registered model per maintained model.  Its base (the deployed HF model) is registered
  once (:meth:`Registry.register_base`, version 1) and every approved night adds a *patch
  version* (:meth:`Registry.register_candidate`) whose model artifacts hold only what rebuilds it:
  the cumulative patch set (``patches.safetensors`` + ``manifest.json``), a pointer JSON naming
  the base version, the night's ledger / gate metrics / gate report / plot.
* Every version is an MLflow pyfunc model served by :class:`tasks.serving.PatchflowModel`
  (logged as code, no pickle), so ``mlflow.pyfunc.load_model("models:/NAME@champion")`` predicts.
* Aliases: ``champion`` (serving) and ``challenger`` (passed the gate, awaiting promotion).
* Version tags (all prefixed ``patchflow.``): ``kind`` (base|patch), ``task``, ``base_version``,
  ``parent_version``, ``patch_count``, ``flow_run_id``, ``night_key``, ``base_fingerprint``,
  ``complete`` ("true" once the artifacts were read back and checked — no alias is ever set on a
  version without it), ``previous_champion`` / ``promoted_at`` / ``promotion_reason`` (set when a
  version becomes champion), ``rolled_back_at`` / ``rollback_reason`` (set on a version that was
  rolled back).  Registered-model tags: ``patchflow.task`` and ``patchflow.champion_history``
  (JSON list, newest last, trimmed to fit MLflow's tag size).

Where things are stored
-----------------------
* Tracking/registry store: whatever URI is given; the app default is
  :func:`default_tracking_uri` = ``sqlite:///<dir>/mlflow.db``.
* Artifacts: one experiment per registered model, ``patchflow-<name>``.  For a SQLite store the
  experiment's artifact location is ``<dir of the db>/mlartifacts/<name>`` (for other stores the
  server default, unless ``artifact_root`` is given).  A version's model artifacts live under
  ``<experiment artifacts>/models/<model_id>/artifacts/`` (MLflow 3 LoggedModel layout); the run
  artifacts (plot, ledger, gate report, metrics) under the run's artifact folder.
* Local cache of downloaded bases (and patch sets): ``cache_dir`` (default ``<dir of the db>/cache``
  for SQLite, else ``~/.cache/patchflow``), keyed by model name, version and storage location.

Global state
------------
None is touched: no ``mlflow.set_tracking_uri`` / ``mlflow.start_run``.  Models are logged with
``mlflow.pyfunc.save_model`` into a temporary folder and uploaded through this registry's own
``MlflowClient`` (``create_logged_model`` → ``log_model_artifacts`` → ``finalize_logged_model`` →
``create_model_version``), which is what ``mlflow.pyfunc.log_model`` does internally, minus the
fluent globals.  Loading through ``mlflow.pyfunc.load_model("models:/...")`` is the caller's
business and uses the caller's ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

import mlflow
import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from tasks import serving

log = logging.getLogger(__name__)

T = TypeVar("T")

TAG = "patchflow."
TAG_KIND = TAG + "kind"
TAG_TASK = TAG + "task"
TAG_BASE_VERSION = TAG + "base_version"
TAG_PARENT_VERSION = TAG + "parent_version"
TAG_PATCH_COUNT = TAG + "patch_count"
TAG_FLOW_RUN_ID = TAG + "flow_run_id"
TAG_NIGHT_KEY = TAG + "night_key"
TAG_FINGERPRINT = TAG + "base_fingerprint"
TAG_COMPLETE = TAG + "complete"
TAG_INCOMPLETE = TAG + "incomplete"
TAG_PREVIOUS_CHAMPION = TAG + "previous_champion"
TAG_PROMOTED_AT = TAG + "promoted_at"
TAG_PROMOTION_REASON = TAG + "promotion_reason"
TAG_ROLLED_BACK_AT = TAG + "rolled_back_at"
TAG_ROLLBACK_REASON = TAG + "rollback_reason"
TAG_HISTORY = TAG + "champion_history"

CHAMPION = "champion"
CHALLENGER = "challenger"

PATCHES_FILE = "patches.safetensors"
MANIFEST_FILE = "manifest.json"
LEDGER_FILE = "ledger.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "gate_report.json"
PLOT_FILE = "metrics.png"

#: MLflow's limit on a registry tag value (SQL stores); the history is trimmed to fit.
_MAX_TAG_VALUE = 5000
#: Files copied from a HF folder into the base version (never pickles).
_HF_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".tiktoken"}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack"}


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message names the model / alias / version."""


class RegistryUnavailable(RegistryError):
    """MLflow could not be reached (still failing after the bounded retries)."""


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    kind: str  # "base" | "patch"
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    model_id: str | None
    source: str
    created: datetime

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def patch_count(self) -> int:
        return int(self.tags.get(TAG_PATCH_COUNT, "0") or 0)

    @property
    def base_version(self) -> str:
        return self.tags.get(TAG_BASE_VERSION, "")

    @property
    def parent_version(self) -> str:
        return self.tags.get(TAG_PARENT_VERSION, "")


@dataclass
class LoadedVersion:
    name: str
    version: str
    kind: str
    model: Any
    tokenizer: Any
    patch_set: Any | None  # patcher.PatchSet, None for the base
    tags: dict[str, str]
    #: ids of every edit applied in this version (cumulative, from the patch manifest; [] for base)
    ledger: list[str]
    #: the ledger logged with this version (the night's entries, dicts with at least ``id``)
    ledger_entries: list[dict] = field(default_factory=list)
    base_version: str = ""
    base_folder: Path | None = None
    manifest: dict | None = None

    @property
    def model_uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# ----------------------------------------------------------------------------- helpers


def default_tracking_uri(directory: str | Path) -> str:
    """``sqlite:///<abs dir>/mlflow.db`` — the app's default store (artifacts beside it)."""
    return f"sqlite:///{(Path(directory).resolve() / 'mlflow.db').as_posix()}"


def _sqlite_dir(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).resolve().parent


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="seconds")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100] or "_"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics, '_', '-', '.', ' ', ':', '/'.
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", str(key))[:250]


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, MlflowException) and exc.error_code in (
        "TEMPORARILY_UNAVAILABLE",
        "REQUEST_LIMIT_EXCEEDED",
    ):
        return True
    text = str(exc).lower()
    return any(
        s in text
        for s in ("database is locked", "connection refused", "max retries exceeded",
                  "connection reset", "temporarily unavailable")
    )


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in (
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
    )


def _copy_hf_folder(src: Path, dst: Path) -> None:
    """Copy the loadable part of a HF folder (safetensors, configs, tokenizer) — never pickles."""
    if not (src / "config.json").is_file():
        raise RegistryError(f"{src} is not a Hugging Face model folder (no config.json)")
    if not any(src.glob("*.safetensors")):
        found = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        raise RegistryError(
            f"{src} has no *.safetensors weights"
            + (f" (only pickled weights {found}, which patchflow does not load)" if found else "")
        )
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix in _HF_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def _copy_patch_dir(src: Path, dst: Path) -> None:
    for required in (MANIFEST_FILE, PATCHES_FILE):
        if not (src / required).is_file():
            raise RegistryError(f"patch folder {src} lacks {required}")
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix not in _PICKLE_SUFFIXES:
            shutil.copy2(p, dst / p.name)


def render_stream_plot(step_metrics: list[dict], metrics: dict[str, float], path: Path,
                       title: str) -> Path:
    """PNG of the per-edit metrics along the stream (matplotlib Agg, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(step_metrics):
        step = row.get("step", row.get("edit", i + 1))
        try:
            step = float(step)
        except (TypeError, ValueError):
            step = float(i + 1)
        for k, v in row.items():
            if k in ("step", "edit") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                xs, ys = series.setdefault(str(k), ([], []))
                xs.append(step)
                ys.append(float(v))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if series:
        for k, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=k)
        ax.legend(loc="best", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no per-edit metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("edit along the stream")
    ax.set_ylabel("metric")
    summary = ", ".join(f"{k}={v:.3g}" for k, v in sorted(metrics.items())[:6]
                        if isinstance(v, (int, float)))
    ax.set_title(f"{title}\n{summary}" if summary else title, fontsize="medium")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path


# ----------------------------------------------------------------------------- the registry


class Registry:
    """patchflow's view of an MLflow tracking store + model registry.

    ``tracking_uri`` / ``registry_uri`` are used only through this object's ``MlflowClient``.
    ``artifact_root``: where new experiments keep artifacts (default: ``<db dir>/mlartifacts``
    for a SQLite store, else the server's default).  ``retries`` / ``backoff_s``: bounded
    exponential backoff on transient MLflow/connection errors.
    """

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        *,
        artifact_root: str | Path | None = None,
        cache_dir: str | Path | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        db_dir = _sqlite_dir(tracking_uri)
        if artifact_root is None and db_dir is not None:
            artifact_root = db_dir / "mlartifacts"
        self.artifact_root = artifact_root
        if cache_dir is None:
            cache_dir = (db_dir / "cache") if db_dir is not None else Path.home() / ".cache" / "patchflow"
        self.cache_dir = Path(cache_dir)
        self.retries = max(1, int(retries))
        self.backoff_s = backoff_s

    # ------------------------------------------------------------------ low level

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(self.retries):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                if attempt + 1 >= self.retries:
                    raise RegistryUnavailable(
                        f"MLflow at {self.tracking_uri} is unreachable: {getattr(fn, '__name__', fn)} "
                        f"failed {self.retries} time(s) ({exc})"
                    ) from exc
                delay = self.backoff_s * (2**attempt)
                log.warning("MLflow call %s failed (%s); retrying in %.1fs",
                            getattr(fn, "__name__", fn), exc, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _registered_model(self, name: str):
        try:
            return self._call(self.client.get_registered_model, name)
        except MlflowException as exc:
            if _is_not_found(exc):
                raise RegistryError(f"unknown registered model {name!r}") from exc
            raise

    def _ensure_registered_model(self, name: str, task: str):
        try:
            return self._call(self.client.get_registered_model, name)
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise
        try:
            return self._call(
                self.client.create_registered_model,
                name,
                tags={TAG_TASK: task},
                description=f"patchflow-maintained model ({task}); version 1 is the base.",
            )
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return self._call(self.client.get_registered_model, name)
            raise

    def _experiment_id(self, name: str) -> str:
        exp_name = f"patchflow-{name}"
        exp = self._call(self.client.get_experiment_by_name, exp_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root is not None:
            root = str(self.artifact_root)
            if "://" in root:
                location = f"{root.rstrip('/')}/{_safe(name)}"
            else:
                location = (Path(root).resolve() / _safe(name)).as_uri()
        try:
            return self._call(self.client.create_experiment, exp_name, artifact_location=location,
                              tags={TAG + "registered_model": name})
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return self._call(self.client.get_experiment_by_name, exp_name).experiment_id
            raise

    def _versions(self, name: str) -> list:
        escaped = name.replace("'", "\\'")
        mvs = self._call(self.client.search_model_versions, f"name='{escaped}'")
        return sorted(mvs, key=lambda mv: int(mv.version))

    def _get_version(self, name: str, version: str):
        try:
            return self._call(self.client.get_model_version, name, str(version))
        except MlflowException as exc:
            if _is_not_found(exc):
                raise RegistryError(f"model {name!r} has no version {version!r}") from exc
            raise

    def _alias_version(self, name: str, alias: str):
        try:
            return self._call(self.client.get_model_version_by_alias, name, alias)
        except MlflowException as exc:
            if _is_not_found(exc) or "alias" in str(exc).lower():
                return None
            raise

    def _resolve(self, name: str, alias_or_version: str | int):
        ref = str(alias_or_version)
        self._registered_model(name)
        if ref.isdigit():
            return self._get_version(name, ref)
        mv = self._alias_version(name, ref)
        if mv is None:
            raise RegistryError(f"model {name!r} has no alias {ref!r}")
        return mv

    def _aliases_by_version(self, name: str) -> dict[str, list[str]]:
        """version -> aliases (search results do not carry aliases; the registered model does)."""
        out: dict[str, list[str]] = {}
        for alias, version in (getattr(self._registered_model(name), "aliases", None) or {}).items():
            out.setdefault(str(version), []).append(alias)
        return out

    def _info(self, mv, aliases_by_version: dict[str, list[str]] | None = None) -> ModelVersionInfo:
        tags = dict(mv.tags or {})
        if aliases_by_version is None:
            aliases = getattr(mv, "aliases", None) or []
        else:
            aliases = aliases_by_version.get(str(mv.version), [])
        return ModelVersionInfo(
            name=mv.name,
            version=str(mv.version),
            kind=tags.get(TAG_KIND, "unknown"),
            aliases=tuple(sorted(aliases)),
            tags=tags,
            run_id=mv.run_id or None,
            model_id=getattr(mv, "model_id", None) or None,
            source=mv.source,
            created=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=timezone.utc),
        )

    def info(self, name: str, alias_or_version: str | int) -> ModelVersionInfo:
        """The version behind an alias or a version number."""
        return self._info(self._resolve(name, alias_or_version))

    def _download(self, uri: str, dst: Path) -> Path:
        return Path(self._call(
            mlflow.artifacts.download_artifacts,
            artifact_uri=uri,
            dst_path=str(dst),
            tracking_uri=self.tracking_uri,
            registry_uri=self.registry_uri,
        ))

    def _cached(self, key_parts: list[str], fetch: Callable[[Path], Path]) -> Path:
        """A folder fetched once into the cache (``DONE`` marker written last, atomic rename)."""
        target = self.cache_dir.joinpath(*key_parts)
        done = target / "DONE"
        if done.is_file():
            return target / done.read_text().strip()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            got = fetch(tmp)
            (tmp / "DONE").write_text(got.relative_to(tmp).as_posix() + "\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target / done.read_text().strip()

    def _log_pyfunc(self, experiment_id: str, run_id: str, artifacts: dict[str, str],
                    tags: dict[str, str]):
        """Log a PatchflowModel pyfunc with ``artifacts`` as a LoggedModel of ``run_id``."""
        import torch
        import transformers
        from mlflow.models import Model

        lm = self._call(self.client.create_logged_model, experiment_id, name="model",
                        source_run_id=run_id, tags=tags, model_type="patchflow")
        try:
            self._call(self.client.log_outputs, run_id, [LoggedModelOutput(lm.model_id, step=0)])
            mlflow_model = Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id,
                                 run_id=run_id, model_id=lm.model_id)
            with tempfile.TemporaryDirectory(prefix="patchflow-model-") as tmp:
                local = Path(tmp) / "model"
                mlflow.pyfunc.save_model(
                    path=str(local),
                    python_model=str(Path(serving.__file__).resolve()),
                    artifacts=artifacts,
                    mlflow_model=mlflow_model,
                    pip_requirements=[
                        f"mlflow=={mlflow.__version__}",
                        f"torch=={torch.__version__.split('+')[0]}",
                        f"transformers=={transformers.__version__}",
                        "safetensors",
                        "pandas",
                    ],
                )
                for pycache in local.rglob("__pycache__"):
                    shutil.rmtree(pycache, ignore_errors=True)
                self._call(self.client.log_model_artifacts, lm.model_id, str(local))
            self._call(self.client.finalize_logged_model, lm.model_id, "READY")
        except BaseException:
            try:
                self.client.finalize_logged_model(lm.model_id, "FAILED")
            except Exception:  # pragma: no cover - best effort
                pass
            raise
        return self._call(self.client.get_logged_model, lm.model_id)

    def _create_version(self, name: str, lm, run_id: str, tags: dict[str, str]):
        """create_model_version, retried only after checking it did not go through."""
        for attempt in range(self.retries):
            try:
                return self.client.create_model_version(
                    name, source=lm.artifact_location, run_id=run_id, tags=tags,
                    model_id=lm.model_id,
                )
            except Exception as exc:
                if attempt + 1 >= self.retries or not _is_transient(exc):
                    raise
                time.sleep(self.backoff_s * (2**attempt))
                for mv in self._versions(name):
                    if mv.run_id == run_id and getattr(mv, "model_id", None) == lm.model_id:
                        return mv
        raise AssertionError("unreachable")  # pragma: no cover

    def _discard_version(self, name: str, version: str, why: str) -> bool:
        """Remove a version that must never be served; tag it incomplete if it cannot be removed.
        True when it was removed. (One that stays has no ``complete`` tag: never loaded, never
        aliased, and removed by the next attempt of the same night.)"""
        try:
            mv = self.client.get_model_version(name, version)
            previous = (mv.tags or {}).get(TAG_PREVIOUS_CHAMPION, "")
            for alias in getattr(mv, "aliases", None) or []:
                if alias == CHAMPION and previous:  # the move half happened: put it back
                    self.client.set_registered_model_alias(name, CHAMPION, previous)
                else:
                    self.client.delete_registered_model_alias(name, alias)
            self.client.delete_model_version(name, version)
            log.warning("deleted incomplete version %s of %s: %s", version, name, why)
            return True
        except Exception as exc:  # pragma: no cover - best effort
            log.error("could not delete version %s of %s (%s); tagging it incomplete",
                      version, name, exc)
            try:
                self.client.set_model_version_tag(name, version, TAG_INCOMPLETE, "true")
                self.client.set_model_version_tag(name, version, TAG_COMPLETE, "false")
            except Exception:
                pass
            return False

    def _end_run(self, run_id: str, status: str) -> None:
        try:
            self._call(self.client.set_terminated, run_id, status)
        except Exception as exc:  # pragma: no cover - best effort
            log.warning("could not terminate run %s: %s", run_id, exc)

    # ------------------------------------------------------------------ verification

    def verify_version(self, name: str, version: str) -> dict[str, Any]:
        """Read a version's artifacts back from the store and check them; returns the pointer.

        Base: pointer, ``hf_model/config.json`` and a ``*.safetensors`` file are listed.
        Patch: pointer, ``patches/manifest.json`` and ``patches/patches.safetensors`` are
        downloaded; the manifest must parse, its edit count must match the version's
        ``patch_count`` tag and its base fingerprint the pointer's; the safetensors header must
        parse.  Raises :class:`RegistryError` naming what is missing.
        """
        mv = self._get_version(name, version)
        tags = dict(mv.tags or {})
        source = mv.source.rstrip("/")
        arts = f"{source}/{serving.PYFUNC_ARTIFACTS_DIR}"
        with tempfile.TemporaryDirectory(prefix="patchflow-verify-") as tmp:
            tmp = Path(tmp)
            try:
                mlmodel = self._download(f"{source}/MLmodel", tmp / "m")
                pointer_path = self._download(f"{arts}/{serving.POINTER_FILE}", tmp / "p")
            except Exception as exc:
                raise RegistryError(
                    f"model {name!r} version {version}: MLmodel / pointer missing at {source}: {exc}"
                ) from exc
            if not mlmodel.is_file():
                raise RegistryError(f"model {name!r} version {version}: no MLmodel at {source}")
            pointer = json.loads(pointer_path.read_text())
            kind = tags.get(TAG_KIND)
            if pointer.get("kind") != kind:
                raise RegistryError(
                    f"model {name!r} version {version}: pointer kind {pointer.get('kind')!r} "
                    f"!= tag {kind!r}"
                )
            if kind == "base":
                listed = mlflow.artifacts.list_artifacts(
                    artifact_uri=f"{arts}/{serving.HF_MODEL_ARTIFACT}", tracking_uri=self.tracking_uri
                )
                names = {Path(f.path).name for f in listed if not f.is_dir}
                if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
                    raise RegistryError(
                        f"model {name!r} version {version}: base artifacts incomplete "
                        f"(found {sorted(names)})"
                    )
            else:
                try:
                    pdir = self._download(f"{arts}/{serving.PATCHES_ARTIFACT}", tmp / "patches")
                except Exception as exc:
                    raise RegistryError(
                        f"model {name!r} version {version}: patch set missing at {arts}: {exc}"
                    ) from exc
                for required in (MANIFEST_FILE, PATCHES_FILE):
                    if not (pdir / required).is_file():
                        raise RegistryError(
                            f"model {name!r} version {version}: {required} missing from the "
                            "stored patch set"
                        )
                manifest = json.loads((pdir / MANIFEST_FILE).read_text())
                n_edits = len(manifest.get("edits", []))
                if str(n_edits) != tags.get(TAG_PATCH_COUNT):
                    raise RegistryError(
                        f"model {name!r} version {version}: stored manifest has {n_edits} edits, "
                        f"tag {TAG_PATCH_COUNT} says {tags.get(TAG_PATCH_COUNT)}"
                    )
                if manifest.get("base_fingerprint") != pointer.get("base_fingerprint"):
                    raise RegistryError(
                        f"model {name!r} version {version}: manifest and pointer disagree on the "
                        "base fingerprint"
                    )
                from safetensors import safe_open

                with safe_open(str(pdir / PATCHES_FILE), framework="pt") as fh:
                    list(fh.keys())
        return pointer

    # ------------------------------------------------------------------ base

    def register_base(self, name: str, model_dir: str | Path, task: str) -> ModelVersionInfo:
        """Register the HF folder ``model_dir`` as the base version (1) and make it champion.

        Idempotent: when the model already has a complete base, returns it (and raises
        :class:`RegistryError` when ``model_dir``'s fingerprint differs from it).
        """
        import patcher

        model_dir = Path(model_dir)
        with tempfile.TemporaryDirectory(prefix="patchflow-base-") as tmp:
            staged = Path(tmp) / serving.HF_MODEL_ARTIFACT
            _copy_hf_folder(model_dir, staged)
            model, _tok = patcher.load_model(staged)
            fp = patcher.fingerprint(model)
            model_type = getattr(model.config, "model_type", "")
            del model, _tok

            self._ensure_registered_model(name, task)
            aliased = self._aliases_by_version(name)
            for mv in self._versions(name):
                tags = dict(mv.tags or {})
                if tags.get(TAG_KIND) != "base":
                    continue
                if tags.get(TAG_COMPLETE) != "true":
                    if str(mv.version) not in aliased:
                        self._discard_version(name, mv.version, "leftover incomplete base")
                    continue
                if tags.get(TAG_FINGERPRINT) != fp:
                    raise RegistryError(
                        f"model {name!r} already has base version {mv.version} with fingerprint "
                        f"{tags.get(TAG_FINGERPRINT, '?')[:12]}…, but {model_dir} has "
                        f"{fp[:12]}…; register it under another name"
                    )
                return self._info(self._get_version(name, str(mv.version)))

            exp_id = self._experiment_id(name)
            lineage = {TAG_KIND: "base", TAG_TASK: task, TAG_FINGERPRINT: fp,
                       TAG_PATCH_COUNT: "0", TAG_PARENT_VERSION: "", TAG_FLOW_RUN_ID: ""}
            run = self._call(self.client.create_run, exp_id, run_name=f"{_safe(name)}-base",
                             tags={**lineage, TAG + "registered_model": name})
            run_id = run.info.run_id
            version = None
            try:
                pointer = {
                    "format": serving.POINTER_FORMAT,
                    "kind": "base",
                    "registered_model": name,
                    "task": task,
                    "model_type": model_type,
                    "base_fingerprint": fp,
                }
                pointer_path = Path(tmp) / serving.POINTER_FILE
                pointer_path.write_text(json.dumps(pointer, indent=2))
                lm = self._log_pyfunc(
                    exp_id, run_id,
                    {"pointer": str(pointer_path), serving.HF_MODEL_ARTIFACT: str(staged)},
                    tags={TAG_KIND: "base", TAG + "registered_model": name},
                )
                mv = self._create_version(name, lm, run_id, lineage)
                version = str(mv.version)
                self._call(self.client.set_model_version_tag, name, version, TAG_BASE_VERSION, version)
                self.verify_version(name, version)
                self._call(self.client.set_model_version_tag, name, version, TAG_COMPLETE, "true")
                if self._alias_version(name, CHAMPION) is None:
                    self._move_champion(name, version, action="register_base",
                                        reason="base model registered")
            except BaseException as exc:
                if version is not None:
                    self._discard_version(name, version, f"register_base failed: {exc}")
                self._end_run(run_id, "FAILED")
                if isinstance(exc, RegistryError):
                    raise
                raise RegistryError(
                    f"registering the base of model {name!r} failed"
                    + (f" after version {version} was created (it was removed)" if version else "")
                    + f": {exc}"
                ) from exc
            self._end_run(run_id, "FINISHED")
            return self._info(self._get_version(name, version))

    # ------------------------------------------------------------------ loading

    def base_folder(self, name: str, base_version: str) -> Path:
        """Local HF folder of a base version, downloaded once into the cache."""
        mv = self._get_version(name, base_version)
        if (mv.tags or {}).get(TAG_KIND) != "base":
            raise RegistryError(f"model {name!r} version {base_version} is not a base version")
        uri = f"{mv.source.rstrip('/')}/{serving.PYFUNC_ARTIFACTS_DIR}/{serving.HF_MODEL_ARTIFACT}"
        key = [_safe(name), f"base-v{mv.version}-{_short_hash(mv.source)}"]
        return self._cached(key, lambda dst: self._download(uri, dst))

    def patch_folder(self, name: str, version: str) -> Path:
        """Local copy of a patch version's patch set (cached; versions are immutable)."""
        mv = self._get_version(name, version)
        uri = f"{mv.source.rstrip('/')}/{serving.PYFUNC_ARTIFACTS_DIR}/{serving.PATCHES_ARTIFACT}"
        key = [_safe(name), f"patch-v{mv.version}-{_short_hash(mv.source)}"]
        return self._cached(key, lambda dst: self._download(uri, dst))

    def load_version(self, name: str, alias_or_version: str | int) -> LoadedVersion:
        """Base model (cached locally) + the version's patch set, ready to predict or patch."""
        import patcher

        mv = self._resolve(name, alias_or_version)
        tags = dict(mv.tags or {})
        if tags.get(TAG_COMPLETE) != "true":
            raise RegistryError(f"model {name!r} version {mv.version} is incomplete; not loading it")
        kind = tags.get(TAG_KIND, "")
        base_version = tags.get(TAG_BASE_VERSION) or str(mv.version)
        folder = self.base_folder(name, base_version)
        model, tokenizer = patcher.load_model(folder)
        patch_set = None
        manifest = None
        ids: list[str] = []
        entries: list[dict] = []
        if kind == "patch":
            patch_set = patcher.PatchSet.load(self.patch_folder(name, str(mv.version)))
            patch_set.apply(model)
            manifest = patch_set.manifest
            ids = [str(e.get("id")) for e in manifest.get("edits", [])]
            arts = f"{mv.source.rstrip('/')}/{serving.PYFUNC_ARTIFACTS_DIR}/{LEDGER_FILE}"
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    entries = json.loads(self._download(arts, Path(tmp)).read_text())
            except Exception as exc:  # the ledger is informative, not needed to rebuild
                log.warning("no ledger for %s v%s: %s", name, mv.version, exc)
        elif kind != "base":
            raise RegistryError(f"model {name!r} version {mv.version} has unknown kind {kind!r}")
        model.eval()
        return LoadedVersion(
            name=name, version=str(mv.version), kind=kind, model=model, tokenizer=tokenizer,
            patch_set=patch_set, tags=tags, ledger=ids, ledger_entries=entries,
            base_version=base_version, base_folder=folder, manifest=manifest,
        )

    # ------------------------------------------------------------------ candidates

    def find_night(self, name: str, night_key: str) -> ModelVersionInfo | None:
        """The complete version registered with ``night_key``, if any."""
        for mv in self._versions(name):
            tags = dict(mv.tags or {})
            if tags.get(TAG_NIGHT_KEY) == night_key and tags.get(TAG_COMPLETE) == "true":
                return self._info(self._get_version(name, str(mv.version)))
        return None

    def register_candidate(
        self,
        name: str,
        patch_dir: str | Path,
        metrics: dict[str, float],
        step_metrics: list[dict],
        ledger: list[dict],
        parent_version: str,
        flow_run_id: str,
        alias: Literal["challenger", "champion"] | None = CHALLENGER,
        report: dict | None = None,
        night_key: str | None = None,
    ) -> ModelVersionInfo:
        """Register a patched model (cumulative patch set in ``patch_dir``) as a new version.

        One MLflow run logs ``metrics`` (step 0), ``step_metrics`` (as ``stream/<key>`` series,
        step = the row's ``step``/``edit`` or its index + 1), the stream plot, the ledger, the
        gate report; its LoggedModel holds the pyfunc (patch set + pointer to the base + the
        same JSONs).  The version is verified (read back) before any alias is set; on any
        failure after it was created it is deleted and :class:`RegistryError` is raised.
        ``night_key`` (default: a hash of parent version, base fingerprint and edit ids) makes
        the call idempotent: a complete version with the same key is returned as is.
        ``alias="champion"`` promotes (recording the previous champion), ``"challenger"`` only
        marks it, ``None`` sets no alias.
        """
        import patcher

        if alias not in (None, CHALLENGER, CHAMPION):
            raise ValueError(f"alias must be 'challenger', 'champion' or None, not {alias!r}")
        patch_dir = Path(patch_dir)
        report = dict(report or {})
        parent_version = str(parent_version)
        self._registered_model(name)
        parent = self._get_version(name, parent_version)
        ptags = dict(parent.tags or {})
        if ptags.get(TAG_COMPLETE) != "true":
            raise RegistryError(f"model {name!r}: parent version {parent_version} is incomplete")
        base_version = ptags.get(TAG_BASE_VERSION) or parent_version
        base = self._get_version(name, base_version)
        btags = dict(base.tags or {})
        task = btags.get(TAG_TASK, ptags.get(TAG_TASK, ""))

        patch_set = patcher.PatchSet.load(patch_dir)
        manifest = dict(patch_set.manifest)
        n_edits = len(patch_set)
        fp = manifest.get("base_fingerprint", "")
        if btags.get(TAG_FINGERPRINT) and fp != btags[TAG_FINGERPRINT]:
            raise RegistryError(
                f"model {name!r}: the patch set in {patch_dir} was made for base fingerprint "
                f"{str(fp)[:12]}…, but base version {base_version} has "
                f"{btags[TAG_FINGERPRINT][:12]}…"
            )
        edit_ids = [str(e.get("id")) for e in manifest.get("edits", [])]
        if night_key is None:
            night_key = "auto-" + _short_hash(json.dumps([parent_version, fp, edit_ids]))

        existing = self.find_night(name, night_key)
        if existing is not None:
            return self._repair_alias(name, existing, alias, parent_version)
        aliased = self._aliases_by_version(name)
        for mv in self._versions(name):  # leftovers of a crashed attempt with the same key
            tags = dict(mv.tags or {})
            if tags.get(TAG_NIGHT_KEY) == night_key and str(mv.version) not in aliased:
                self._discard_version(name, mv.version, "leftover of an earlier failed attempt")

        lineage = {
            TAG_KIND: "patch",
            TAG_TASK: task,
            TAG_BASE_VERSION: base_version,
            TAG_PARENT_VERSION: parent_version,
            TAG_PATCH_COUNT: str(n_edits),
            TAG_FLOW_RUN_ID: str(flow_run_id),
            TAG_NIGHT_KEY: night_key,
            TAG_FINGERPRINT: str(fp),
        }
        exp_id = self._experiment_id(name)
        run = self._call(self.client.create_run, exp_id, run_name=f"night-{_safe(night_key)}",
                         tags={**lineage, TAG + "registered_model": name})
        run_id = run.info.run_id
        version: str | None = None
        try:
            with tempfile.TemporaryDirectory(prefix="patchflow-candidate-") as tmp:
                tmp = Path(tmp)
                self._log_run_data(run_id, metrics, step_metrics, manifest)
                staged = tmp / "model"
                staged.mkdir()
                _copy_patch_dir(patch_dir, staged / serving.PATCHES_ARTIFACT)
                (staged / LEDGER_FILE).write_text(json.dumps(ledger, indent=2, default=str))
                (staged / METRICS_FILE).write_text(json.dumps(
                    {"metrics": metrics, "steps": step_metrics}, indent=2, default=str))
                (staged / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
                render_stream_plot(step_metrics, metrics, staged / PLOT_FILE,
                                   title=f"{name} — night {night_key} ({n_edits} edits)")
                pointer = {
                    "format": serving.POINTER_FORMAT,
                    "kind": "patch",
                    "registered_model": name,
                    "task": task,
                    "model_type": manifest.get("model_type"),
                    "base_version": base_version,
                    "base_model_uri": f"models:/{name}/{base_version}",
                    "base_artifact_uri": base.source,
                    "base_fingerprint": fp,
                    "parent_version": parent_version,
                    "patch_count": n_edits,
                    "edit_ids": edit_ids,
                    "night_key": night_key,
                    "flow_run_id": str(flow_run_id),
                }
                (staged / serving.POINTER_FILE).write_text(json.dumps(pointer, indent=2))
                for f in (LEDGER_FILE, REPORT_FILE, METRICS_FILE, PLOT_FILE):
                    self._call(self.client.log_artifact, run_id, str(staged / f))
                self._call(self.client.log_artifact, run_id,
                           str(staged / serving.PATCHES_ARTIFACT / MANIFEST_FILE))
                lm = self._log_pyfunc(
                    exp_id, run_id,
                    {
                        "pointer": str(staged / serving.POINTER_FILE),
                        serving.PATCHES_ARTIFACT: str(staged / serving.PATCHES_ARTIFACT),
                        "ledger": str(staged / LEDGER_FILE),
                        "metrics": str(staged / METRICS_FILE),
                        "report": str(staged / REPORT_FILE),
                        "plot": str(staged / PLOT_FILE),
                    },
                    tags={TAG_KIND: "patch", TAG + "registered_model": name,
                          TAG_NIGHT_KEY: night_key},
                )
            mv = self._create_version(name, lm, run_id, lineage)
            version = str(mv.version)
            self.verify_version(name, version)
            self._call(self.client.set_model_version_tag, name, version, TAG_COMPLETE, "true")
            if alias == CHAMPION:
                self._move_champion(name, version, action="register_candidate",
                                    reason=str(report.get("reason") or "auto-promotion"))
            elif alias == CHALLENGER:
                self._call(self.client.set_registered_model_alias, name, CHALLENGER, version)
        except BaseException as exc:
            removed = version is not None and self._discard_version(
                name, version, f"register_candidate failed: {exc}")
            self._end_run(run_id, "FAILED")
            if version is None:
                after = ""
            elif removed:
                after = f" after version {version} was created; that version was removed and no alias points at it"
            else:
                after = (f" after version {version} was created; it could not be removed now, is not marked "
                         "complete (so it is never loaded or aliased) and the next attempt of this night removes it")
            msg = f"registering a candidate of model {name!r} (night {night_key!r}) failed{after}: {exc}"
            raise RegistryError(msg) from exc
        self._end_run(run_id, "FINISHED")
        return self._info(self._get_version(name, version))

    def _log_run_data(self, run_id: str, metrics: dict[str, float], step_metrics: list[dict],
                      manifest: dict) -> None:
        ts = int(time.time() * 1000)
        batch: list[Metric] = []
        for k, v in (metrics or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                batch.append(Metric(_metric_key(k), float(v), ts, 0))
        for i, row in enumerate(step_metrics or []):
            step = row.get("step", row.get("edit", i + 1))
            step = int(step) if isinstance(step, (int, float)) else i + 1
            for k, v in row.items():
                if k in ("step", "edit") or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    batch.append(Metric(_metric_key(f"stream/{k}"), float(v), ts, step))
        params = []
        for k, v in sorted((manifest.get("hyperparameters") or {}).items())[:90]:
            params.append(Param(_metric_key(f"hp.{k}"), json.dumps(v, default=str)[:6000]))
        for k in ("format", "library_version", "architecture", "model_type", "layer", "neurons",
                  "version"):
            if k in manifest:
                params.append(Param(f"patch.{k}", str(manifest[k])[:6000]))
        for start in range(0, max(len(batch), 1), 900):
            self._call(self.client.log_batch, run_id, metrics=batch[start:start + 900],
                       params=params if start == 0 else [], tags=[RunTag("mlflow.note.content",
                       "patchflow nightly patch version")] if start == 0 else [])

    def _repair_alias(self, name: str, info: ModelVersionInfo, alias: str | None,
                      parent_version: str) -> ModelVersionInfo:
        """On a repeated night: set the requested alias if an earlier attempt died just before."""
        if alias is None or info.aliases:
            return info
        current = self._alias_version(name, alias)
        if current is None or str(current.version) == parent_version:
            if alias == CHAMPION:
                self._move_champion(name, info.version, action="register_candidate",
                                    reason="auto-promotion (repeated night)")
            else:
                self._call(self.client.set_registered_model_alias, name, alias, info.version)
            return self._info(self._get_version(name, info.version))
        return info

    # ------------------------------------------------------------------ promotion

    def _history(self, name: str) -> list[dict]:
        rm = self._registered_model(name)
        raw = (rm.tags or {}).get(TAG_HISTORY)
        try:
            return list(json.loads(raw)) if raw else []
        except (TypeError, ValueError):
            return []

    def _append_history(self, name: str, entry: dict) -> None:
        hist = self._history(name) + [entry]
        while hist:
            blob = json.dumps(hist, separators=(",", ":"))
            if len(blob) <= _MAX_TAG_VALUE:
                break
            hist = hist[1:]
        self._call(self.client.set_registered_model_tag, name, TAG_HISTORY, blob)

    def _move_champion(self, name: str, version: str, *, action: str, reason: str) -> None:
        current = self._alias_version(name, CHAMPION)
        previous = str(current.version) if current is not None else ""
        if previous == str(version):
            return
        at = _iso(_now())
        reason = reason or "(no reason given)"
        for key, value in ((TAG_PREVIOUS_CHAMPION, previous), (TAG_PROMOTED_AT, at),
                           (TAG_PROMOTION_REASON, reason[:_MAX_TAG_VALUE])):
            self._call(self.client.set_model_version_tag, name, str(version), key, value)
        self._call(self.client.set_registered_model_alias, name, CHAMPION, str(version))
        self._append_history(name, {"at": at, "action": action, "from": previous,
                                    "to": str(version), "reason": reason[:500]})

    def promote(self, name: str, version: str | None = None, reason: str = "") -> ModelVersionInfo:
        """Move ``champion`` to ``version`` (default: the ``challenger``).

        Records ``patchflow.previous_champion`` / ``promoted_at`` / ``promotion_reason`` on the
        version and an entry in the model's ``patchflow.champion_history``; the ``challenger``
        alias is removed when it pointed at the promoted version.
        """
        self._registered_model(name)
        if version is None:
            mv = self._alias_version(name, CHALLENGER)
            if mv is None:
                raise RegistryError(f"model {name!r} has no {CHALLENGER!r} alias to promote")
        else:
            mv = self._get_version(name, str(version))
        if (mv.tags or {}).get(TAG_COMPLETE) != "true":
            raise RegistryError(f"model {name!r} version {mv.version} is incomplete; not promoting")
        self._move_champion(name, str(mv.version), action="promote", reason=reason)
        challenger = self._alias_version(name, CHALLENGER)
        if challenger is not None and str(challenger.version) == str(mv.version):
            self._call(self.client.delete_registered_model_alias, name, CHALLENGER)
        return self._info(self._get_version(name, str(mv.version)))

    def rollback(self, name: str, reason: str, to_version: str | None = None) -> ModelVersionInfo:
        """Send ``champion`` back to the version it replaced (or ``to_version``), saying why.

        The rolled-back version gets ``patchflow.rolled_back_at`` / ``rollback_reason``; the
        target keeps its own ``previous_champion`` so rollbacks can be chained.  ``challenger``
        is left alone.
        """
        self._registered_model(name)
        current = self._alias_version(name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no {CHAMPION!r} alias to roll back")
        if to_version is None:
            to_version = (current.tags or {}).get(TAG_PREVIOUS_CHAMPION, "")
            if not to_version:
                raise RegistryError(
                    f"model {name!r}: champion version {current.version} has no previous champion "
                    "recorded; pass to_version"
                )
        target = self._get_version(name, str(to_version))
        if (target.tags or {}).get(TAG_COMPLETE) != "true":
            raise RegistryError(f"model {name!r} version {target.version} is incomplete")
        if str(target.version) == str(current.version):
            raise RegistryError(f"model {name!r}: version {target.version} is already champion")
        at = _iso(_now())
        reason = reason or "(no reason given)"
        self._call(self.client.set_model_version_tag, name, str(current.version),
                   TAG_ROLLED_BACK_AT, at)
        self._call(self.client.set_model_version_tag, name, str(current.version),
                   TAG_ROLLBACK_REASON, reason[:_MAX_TAG_VALUE])
        self._call(self.client.set_registered_model_alias, name, CHAMPION, str(target.version))
        self._append_history(name, {"at": at, "action": "rollback", "from": str(current.version),
                                    "to": str(target.version), "reason": reason[:500]})
        return self._info(self._get_version(name, str(target.version)))

    # ------------------------------------------------------------------ status

    def champion_history(self, name: str) -> list[dict]:
        return self._history(name)

    def status(self, name: str) -> dict[str, Any]:
        """Versions, aliases, champion history and the newest patch version's run metrics."""
        rm = self._registered_model(name)
        aliases = {a: str(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}
        versions = []
        newest_patch = None
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases.items():
            by_version.setdefault(v, []).append(alias)
        for mv in self._versions(name):
            info = self._info(mv, by_version)
            versions.append({
                "version": info.version,
                "kind": info.kind,
                "aliases": list(info.aliases),
                "complete": info.tags.get(TAG_COMPLETE) == "true",
                "patch_count": info.patch_count,
                "created": _iso(info.created),
                "run_id": info.run_id,
                "tags": info.tags,
            })
            if info.kind == "patch" and info.tags.get(TAG_COMPLETE) == "true":
                newest_patch = info
        last_night = None
        if newest_patch is not None and newest_patch.run_id:
            run = self._call(self.client.get_run, newest_patch.run_id)
            last_night = {
                "version": newest_patch.version,
                "night_key": newest_patch.tags.get(TAG_NIGHT_KEY),
                "flow_run_id": newest_patch.tags.get(TAG_FLOW_RUN_ID),
                "created": _iso(newest_patch.created),
                "metrics": {k: v for k, v in run.data.metrics.items()
                            if not k.startswith("stream/")},
            }
        return {
            "name": name,
            "task": (rm.tags or {}).get(TAG_TASK),
            "aliases": aliases,
            "versions": versions,
            "champion_history": self._history(name),
            "last_night": last_night,
        }
