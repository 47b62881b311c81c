"""Per-model configuration: ``deployments/<model>.yaml``, validated by pydantic.

One file per maintained model says where its errors come from, what it is gated on, how it is
patched, whether it is promoted automatically and when it runs. Relative paths are resolved
against the current working directory (the repository root for `prefect deploy` / `serve`);
``PATCHFLOW_TRACKING_URI`` / ``PATCHFLOW_STATE_URL`` override the stores (production switch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from patcher import PatcherConfig
from tasks.ingest import SourceConfig
from tasks.settings import StoreOverrides

DEPLOYMENTS_DIR = Path("deployments")


class ConfigError(ValueError):
    """A model config is missing or invalid; the message says which file and which field."""


class GateThresholds(BaseModel):
    """A candidate is registered only if every check passes."""

    model_config = ConfigDict(extra="forbid")

    min_success_rate: float = Field(0.95, ge=0, le=1, description="SR on tonight's edits")
    min_edit_retain_rate: float = Field(0.95, ge=0, le=1, description="ER on every edit in the ledger")
    min_generalization_rate: float = Field(
        0.0, ge=0, le=1, description="GR on the held-out paraphrases of tonight's edits (never trained on)")
    max_drawdown: float = Field(
        0.01, ge=0, le=1, description="share of the held-out items the parent got right that the candidate gets "
        "wrong (1 - locality); items the candidate fixes by accident never offset it")


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str = "0 2 * * *"
    timezone: str = "UTC"


class Evaluation(BaseModel):
    """How the gate evaluates: in-process, or sharded over a Dask cluster (prefect-dask)."""

    model_config = ConfigDict(extra="forbid")

    runner: Literal["local", "dask"] = "local"
    address: str | None = Field(None, description="a Dask scheduler address; None starts a LocalCluster")
    shards: int = Field(4, ge=1)
    n_workers: int = Field(2, ge=1, description="LocalCluster workers when no address is given")


class ModelConfig(BaseModel):
    """Everything patchflow needs to maintain one registered model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="MLflow registered model name")
    task: Literal["classification", "generation"]
    source: SourceConfig
    holdout: Path = Field(description="held-out locality set: JSONL rows with input and correction")
    memory: Path = Field(description="unrelated inputs for the patcher's memory: JSONL with input (or .txt lines)")
    gate: GateThresholds = Field(default_factory=GateThresholds)
    patcher: PatcherConfig = Field(default_factory=PatcherConfig)
    auto_promote: bool = False
    schedule: Schedule = Field(default_factory=Schedule)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    workdir: Path = Path(".patchflow")
    tracking_uri: str | None = Field(None, description="default sqlite:///<workdir>/mlflow.db")
    state_url: str | None = Field(None, description="default sqlite:///<workdir>/state.db")
    naive_timestamps: Literal["reject", "utc"] = "reject"
    max_input_chars: int = Field(4000, gt=0, description="longest input, correction or paraphrase accepted")
    paraphrase_holdout: float = Field(
        0.5, ge=0, le=1, description="share of each error's paraphrases kept out of training (rounded up) so the "
        "gate measures generalisation on wordings the patch never saw; 0 trains on all of them (GR not measured)")
    device: str = Field("auto", description="where the model runs: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the dtype the model is loaded (and served) in; auto keeps the saved dtype")
    registry_retries: int = Field(3, ge=1, le=11, description="attempts per HTTP request to MLflow (MLflow's own retries)")
    registry_backoff_s: float = Field(0.5, ge=0, le=120, description="MLflow's retry backoff factor (whole seconds)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError("name must be letters, digits, '-', '_' or '.'")
        return value

    @property
    def resolved_tracking_uri(self) -> str:
        return StoreOverrides().tracking_uri or self.tracking_uri or f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}"

    @property
    def resolved_state_url(self) -> str:
        return StoreOverrides().state_url or self.state_url or f"sqlite:///{(self.workdir / 'state.db').resolve()}"

    @property
    def model_workdir(self) -> Path:
        return self.workdir / self.name


def config_path(model: str, directory: Path | None = None) -> Path:
    return (directory or DEPLOYMENTS_DIR) / f"{model}.yaml"


def load_config(model_or_path: str | Path, directory: Path | None = None) -> ModelConfig:
    """Load ``deployments/<model>.yaml`` (or a path to a YAML file) with errors a person can fix."""
    path = Path(model_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = config_path(str(model_or_path), directory)
    if not path.is_file():
        known = sorted(p.stem for p in (directory or DEPLOYMENTS_DIR).glob("*.yaml"))
        raise ConfigError(f"no config for model {model_or_path!r}: {path} does not exist "
                          f"(configured models: {', '.join(known) or 'none'})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path} is invalid: {problems}") from None
