"""The shell's environment: offline/telemetry defaults defined once (Python and scripts/env.sh
agree), and the PATCHFLOW_* overrides read with pydantic-settings."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from patchflow import cli
from patchflow.settings import ENV_DEFAULTS, Settings, apply_env_defaults, shell_exports

REPO = Path(__file__).resolve().parents[2]


def test_defaults_fill_only_what_is_unset():
    env = {"HF_HUB_OFFLINE": "0", "OTHER": "x"}
    applied = apply_env_defaults(env)
    assert "HF_HUB_OFFLINE" not in applied and applied == {k: v for k, v in ENV_DEFAULTS.items() if k != "HF_HUB_OFFLINE"}
    assert env == {**ENV_DEFAULTS, "HF_HUB_OFFLINE": "0", "OTHER": "x"}
    assert apply_env_defaults(env) == {}


def test_the_offline_and_telemetry_switches_are_all_there():
    assert {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "TOKENIZERS_PARALLELISM": "false"}.items() <= ENV_DEFAULTS.items()


def _sourced(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", "set -eu; source scripts/env.sh; env -0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)


def test_env_sh_exports_the_same_defaults(tmp_path: Path):
    runtime = tmp_path / "runtime"
    got = _sourced({"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(runtime),
                    "DO_NOT_TRACK": "1"})
    assert {k: got[k] for k in ENV_DEFAULTS} == {**ENV_DEFAULTS, "DO_NOT_TRACK": "1"}  # an exported value wins
    assert got["PATCHFLOW_HOME"] == str(REPO)
    assert runtime.is_dir() and got["XDG_RUNTIME_DIR"] == str(runtime)
    assert shell_exports().count("export ") == len(ENV_DEFAULTS)


def test_env_sh_gives_embedded_postgres_a_runtime_dir(tmp_path: Path):
    got = _sourced({"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert got["XDG_RUNTIME_DIR"] == f"/tmp/runtime-{os.getuid()}" and Path(got["XDG_RUNTIME_DIR"]).is_dir()


def test_config_dir_override(monkeypatch, tmp_path: Path, capsys):
    assert Settings().config_dir == Path("deployments")
    monkeypatch.setenv("PATCHFLOW_CONFIG_DIR", str(tmp_path))
    assert Settings().config_dir == tmp_path
    assert cli.main(["status", "nope"]) == 2
    assert f"{tmp_path}/nope.yaml does not exist" in capsys.readouterr().err


def test_prefect_reads_the_temporary_server_wait():
    """The default is a real Prefect setting (a misspelt name would be ignored silently)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    assert ENV_DEFAULTS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    assert PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() == int(
        os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
