"""The ``patchflow`` command on its real code paths: a tiny classifier in a real MLflow (SQLite) store.
What a person sees: one line and exit 2 on errors they can fix. (``run``'s exit 4 while another night
holds the lock is checked where the lock's faults are, tests/flows/test_faults.py, on a real flow.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from patchflow import cli
from patchflow.settings import ENV_DEFAULTS
from tests import tiny

REPO = Path(__file__).resolve().parents[2]
NAME = "tiny-cli"


@pytest.fixture()
def deployments(tmp_path: Path) -> Path:
    """A config for a tiny classifier whose base folder is saved under tmp_path/base."""
    model, tok = tiny.build("bert", num_labels=2)
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "errors").mkdir()
    for name in ("holdout.jsonl", "memory.jsonl"):
        (tmp_path / name).write_text(json.dumps({"input": tiny.SENTENCES[0], "correction": "LABEL_0"}) + "\n")
    folder = tmp_path / "deployments"
    folder.mkdir()
    (folder / f"{NAME}.yaml").write_text(yaml.safe_dump({
        "name": NAME, "task": "classification", "source": {"kind": "files", "path": str(tmp_path / "errors")},
        "holdout": str(tmp_path / "holdout.jsonl"), "memory": str(tmp_path / "memory.jsonl"),
        "workdir": str(tmp_path / ".patchflow"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "state_url": f"sqlite:///{tmp_path / 'state.db'}",
    }))
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_commands_are_the_ones_the_readme_documents(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    shown = re.search(r"\{([a-z,\-]+)\}", capsys.readouterr().out).group(1).split(",")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `patchflow ([a-z\-]+)", readme, flags=re.M)
    assert shown == ["demo", "run", "status", "promote", "rollback", "quarantine", "register-base", "serve"]
    assert set(documented) == set(shown)


def test_errors_a_person_can_fix_are_one_line_and_exit_2(capsys, deployments: Path):
    code, out, err = run(capsys, "--config-dir", str(deployments), "status", "nope")
    assert code == 2 and out == ""
    assert err.startswith("patchflow: no config for model 'nope'") and err.count("\n") == 1
    assert f"configured models: {NAME}" in err
    (deployments / "broken.yaml").write_text("name: broken\ntask: translation\n")
    code, _, err = run(capsys, "--config-dir", str(deployments), "run", "broken")
    assert code == 2 and err.startswith("patchflow: ") and "is invalid" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:  # argparse: a missing --reason
        cli.main(["--config-dir", str(deployments), "promote", NAME])
    assert exc.value.code == 2
    assert "--reason" in capsys.readouterr().err


def test_register_base_status_and_quarantine(capsys, deployments: Path, tmp_path: Path):
    d = ["--config-dir", str(deployments)]
    code, out, _ = run(capsys, *d, "register-base", NAME, str(tmp_path / "base"))
    assert code == 0 and out == f"{NAME}: version 1 aliases ['champion']\n"
    code, out, _ = run(capsys, *d, "status", NAME)
    assert code == 0 and out.startswith(f"model {NAME}\n") and "'champion': '1'" in out
    code, out, _ = run(capsys, *d, "status", NAME, "--json")
    status = json.loads(out)
    assert code == 0 and [v["version"] for v in status["versions"]] == ["1"] and status["aliases"] == {"champion": "1"}
    code, out, _ = run(capsys, *d, "quarantine", NAME)
    assert code == 0 and out == f"0 quarantined rows for {NAME}\n"
    export = tmp_path / "rows.jsonl"
    code, out, _ = run(capsys, *d, "quarantine", NAME, "--export", str(export))
    assert code == 0 and out == f"exported 0 quarantined rows to {export}\n" and export.is_file()
    code, _, err = run(capsys, *d, "register-base", NAME, str(tmp_path / "no-such-folder"))
    assert code == 2 and err.startswith("patchflow: ") and err.count("\n") == 1


def test_main_sets_the_environment_defaults_first(capsys, monkeypatch, deployments: Path):
    for key in ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a value already set wins
    assert run(capsys, "--config-dir", str(deployments), "status", "nope")[0] == 2
    assert {k: os.environ[k] for k in ENV_DEFAULTS} == {**ENV_DEFAULTS, "HF_HUB_OFFLINE": "0"}


def test_the_module_runs_as_the_command():
    out = subprocess.run([sys.executable, "-m", "patchflow.cli", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: patchflow ")
