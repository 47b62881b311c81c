"""MLflow access for the registry: one ``MlflowClient``, lookups, aliases, downloads.

Retries are MLflow's own. Over HTTP, MLflow retries every request (urllib3 ``Retry``) as its
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` /
``MLFLOW_HTTP_REQUEST_TIMEOUT`` settings say; it reads them from the process environment on every
request. A :class:`RegistryClient` sets them from its ``retries`` / ``backoff_s`` / ``timeout_s``
only for the duration of its own calls (:func:`mlflow_http_settings`) and puts the previous values
back afterwards. A call that still cannot reach the store raises :class:`RegistryUnavailable`
naming the tracking URI.
"""

from __future__ import annotations

import hashlib
import math
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.registry.mlflow_env import cause, fluent_tracking_uri, is_unreachable, mlflow_http_settings
from tasks.registry.versions import (MAX_TAG_VALUE, TAG_KIND, TAG_REGISTERED_MODEL, TAG_TASK, ModelVersionInfo,
                                     RegistryError, RegistryUnavailable)

T = TypeVar("T")
_HTTP_SCHEMES = ("http://", "https://")


def default_tracking_uri(directory: str | Path) -> str:
    """``sqlite:///<abs dir>/mlflow.db`` — the app's default store (artifacts beside it)."""
    return f"sqlite:///{(Path(directory).resolve() / 'mlflow.db').as_posix()}"


def sqlite_dir(uri: str) -> Path | None:
    """The folder of a ``sqlite:///`` store's database file, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).resolve().parent


def utc_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100] or "_"


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


class RegistryClient:
    """patchflow's handle on one MLflow tracking store + model registry, through its own
    ``MlflowClient`` (MLflow's fluent tracking URI is set only around ``log_model``).

    ``retries``: attempts per HTTP request (MLflow retries ``retries - 1`` times);
    ``backoff_s``: MLflow's backoff factor (whole seconds, rounded up: urllib3 retries once at
    once, then waits factor x 2^(n-1) s plus up to ``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER`` s);
    ``timeout_s``: per-request connect/read timeout (None keeps MLflow's setting, 120 s).
    ``artifact_root``: where new experiments keep artifacts (default ``<db dir>/mlartifacts`` for a
    SQLite store, else the server's default). ``cache_dir``: downloaded bases and patch sets
    (default ``<db dir>/cache`` for SQLite, else ``~/.cache/patchflow``).
    """

    def __init__(self, tracking_uri: str, registry_uri: str | None = None, *,
                 artifact_root: str | Path | None = None, cache_dir: str | Path | None = None,
                 retries: int = 3, backoff_s: float = 0.5, timeout_s: int | None = None) -> None:
        if not 1 <= int(retries) <= 11:
            raise ValueError(f"retries must be 1..11 (MLflow allows at most 10 retries), not {retries}")
        if not 0 <= backoff_s <= 120:
            raise ValueError(f"backoff_s must be 0..120 s (MLflow's limit), not {backoff_s}")
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri or tracking_uri
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        db_dir = sqlite_dir(tracking_uri)
        if artifact_root is None and db_dir is not None:
            artifact_root = db_dir / "mlartifacts"
        self.artifact_root = artifact_root
        if cache_dir is None:
            cache_dir = (db_dir / "cache") if db_dir is not None else Path.home() / ".cache" / "patchflow"
        self.cache_dir = Path(cache_dir)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.http_settings = {
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.retries - 1),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(math.ceil(max(0.0, self.backoff_s))),
        }
        if timeout_s is not None:
            self.http_settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout_s))

    # ------------------------------------------------------------------ calls

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One MLflow call under this client's HTTP settings; unreachable -> RegistryUnavailable."""
        try:
            with mlflow_http_settings(self.http_settings):
                return fn(*args, **kwargs)
        except RegistryError:
            raise
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            attempts = self.retries if self.tracking_uri.startswith(_HTTP_SCHEMES) else 1
            raise RegistryUnavailable(
                f"MLflow at {self.tracking_uri} is unreachable: {getattr(fn, '__name__', 'call')} "
                f"failed {attempts} time(s) ({cause(exc)})") from exc

    @contextmanager
    def fluent(self) -> Iterator[None]:
        """For MLflow APIs that only use the fluent tracking URI (``mlflow.pyfunc.log_model``)."""
        with fluent_tracking_uri(self.tracking_uri):
            yield

    def download(self, uri: str, dst: Path) -> Path:
        return Path(self.call(mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=str(dst),
                              tracking_uri=self.tracking_uri, registry_uri=self.registry_uri))

    # ------------------------------------------------------------------ lookups

    def registered_model(self, name: str):
        try:
            return self.call(self.client.get_registered_model, name)
        except MlflowException as exc:
            if is_not_found(exc):
                raise RegistryError(f"unknown registered model {name!r}") from exc
            raise

    def ensure_registered_model(self, name: str, task: str):
        try:
            return self.call(self.client.get_registered_model, name)
        except MlflowException as exc:
            if not is_not_found(exc):
                raise
        try:
            return self.call(self.client.create_registered_model, name, tags={TAG_TASK: task},
                             description=f"patchflow-maintained model ({task}); version 1 is the base.")
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return self.call(self.client.get_registered_model, name)
            raise

    def experiment_id(self, name: str) -> str:
        """The experiment ``patchflow-<name>`` (created on first use)."""
        exp_name = f"patchflow-{name}"
        exp = self.call(self.client.get_experiment_by_name, exp_name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root is not None:
            root = str(self.artifact_root)
            if "://" in root:
                location = f"{root.rstrip('/')}/{safe_name(name)}"
            else:
                location = (Path(root).resolve() / safe_name(name)).as_uri()
        try:
            return self.call(self.client.create_experiment, exp_name, artifact_location=location,
                             tags={TAG_REGISTERED_MODEL: name})
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return self.call(self.client.get_experiment_by_name, exp_name).experiment_id
            raise

    def versions(self, name: str) -> list:
        """Every version of ``name``, oldest first (search results carry tags, not aliases)."""
        escaped = name.replace("'", "\\'")
        mvs = self.call(self.client.search_model_versions, f"name='{escaped}'")
        return sorted(mvs, key=lambda mv: int(mv.version))

    def get_version(self, name: str, version: str):
        try:
            return self.call(self.client.get_model_version, name, str(version))
        except MlflowException as exc:
            if is_not_found(exc):
                raise RegistryError(f"model {name!r} has no version {version!r}") from exc
            raise

    def alias_version(self, name: str, alias: str):
        """The version behind ``alias``, or None when the alias is not set."""
        try:
            return self.call(self.client.get_model_version_by_alias, name, alias)
        except MlflowException as exc:
            if is_not_found(exc) or "alias" in str(exc).lower():
                return None
            raise

    def resolve(self, name: str, alias_or_version: str | int):
        ref = str(alias_or_version)
        self.registered_model(name)
        if ref.isdigit():
            return self.get_version(name, ref)
        mv = self.alias_version(name, ref)
        if mv is None:
            raise RegistryError(f"model {name!r} has no alias {ref!r}")
        return mv

    def aliases_by_version(self, name: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for alias, version in (getattr(self.registered_model(name), "aliases", None) or {}).items():
            out.setdefault(str(version), []).append(alias)
        return out

    @staticmethod
    def to_info(mv, aliases_by_version: dict[str, list[str]] | None = None) -> ModelVersionInfo:
        tags = dict(mv.tags or {})
        if aliases_by_version is None:
            aliases = getattr(mv, "aliases", None) or []
        else:
            aliases = aliases_by_version.get(str(mv.version), [])
        return ModelVersionInfo(
            name=mv.name, version=str(mv.version), kind=tags.get(TAG_KIND, "unknown"),
            aliases=tuple(sorted(aliases)), tags=tags, run_id=mv.run_id or None,
            model_id=getattr(mv, "model_id", None) or None, source=mv.source,
            created=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, tz=timezone.utc),
        )

    def info(self, name: str, alias_or_version: str | int) -> ModelVersionInfo:
        """The version behind an alias or a version number."""
        return self.to_info(self.resolve(name, alias_or_version))

    def all_infos(self, name: str) -> dict[str, ModelVersionInfo]:
        """version -> info for every version, aliases included (two store calls)."""
        aliased = self.aliases_by_version(name)
        return {str(mv.version): self.to_info(mv, aliased) for mv in self.versions(name)}

    # ------------------------------------------------------------------ writes used by several modules

    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.call(self.client.set_model_version_tag, name, str(version), key, value[:MAX_TAG_VALUE])

    def _create_version(self, name: str, logged_model, run_id: str, tags: dict[str, str]):
        """``create_model_version`` for a logged model (one place, so tests can inject a fault)."""
        return self.call(self.client.create_model_version, name, source=logged_model.artifact_location,
                         run_id=run_id, tags=tags, model_id=logged_model.model_id)

    def end_run(self, run_id: str, status: str) -> None:
        try:
            self.call(self.client.set_terminated, run_id, status)
        except Exception:  # best effort: a run left RUNNING is cosmetic
            pass
