"""Production faults, for real: a run SIGKILLed mid-patching, MLflow going down (and dying in the
middle of a registration), two runs at once, a night re-run after it succeeded.

Real Prefect (the test harness' API, shared with child processes), real MLflow (SQLite, or a real
``mlflow server`` over HTTP), real GX, a tiny BERT. The only fakes are the faults injected.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows.nightly import nightly
from patchflow.cli import EXIT_LOCKED
from tasks.config import load_config
from tasks.ingest import StateStore
from tasks.night import NightLocked, night_lock
from tasks.quarantine import QuarantineStore
from tasks.registry import CHAMPION, TAG_COMPLETE, Registry, RegistryError, RegistryUnavailable
from tests.flows import procs
from tests.flows.conftest import World


def run(world: World, **kw):
    return nightly(model=world.name, config_dir=str(world.deployments), progress=False, **kw)


def harness_api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "the Prefect test harness should provide an API URL"
    return str(url)


def nightly_in_child(world: World, log: Path) -> subprocess.Popen:
    """The nightly flow in its own Python process, talking to the harness' Prefect API."""
    code = ("import sys; from flows.nightly import nightly; "
            "print(nightly(model=sys.argv[1], config_dir=sys.argv[2], progress=False))")
    env = procs.child_env(PREFECT_API_URL=harness_api_url())
    return procs.start([procs.PYTHON, "-c", code, world.name, str(world.deployments)], log, env)


def assert_registry_clean(registry: Registry, name: str) -> dict:
    """Only complete versions; the champion is one of them."""
    status = registry.status(name)
    incomplete = [v["version"] for v in status["versions"] if not v["complete"]]
    assert not incomplete, f"half-made versions left behind: {incomplete}"
    champion = registry.info(name, CHAMPION)
    assert champion.tags.get(TAG_COMPLETE) == "true"
    return status


# ------------------------------------------------------------------------------------------------
# 1. SIGKILL in the middle of patching


def test_sigkill_mid_patching_resumes_without_applying_an_edit_twice(world: World, tmp_path: Path):
    n = 12
    # the subject is resuming; twelve edits on the 32-wide tiny model break more of its holdout than
    # the default gate allows, so the gate is widened here (the gate has its own tests)
    world.config(gate={"max_drawdown": 0.3})
    logged = {r["id"] for r in world.log_errors("night1.jsonl", 0, n)}
    checkpoints = world.workdir / world.name / "checkpoints"
    log = tmp_path / "child.log"
    child = nightly_in_child(world, log)
    killed_at = 0
    try:
        deadline = time.monotonic() + 240
        while killed_at < 2:
            assert child.poll() is None, f"the child ended before it was killed:\n{procs.tail(log)}"
            assert time.monotonic() < deadline, f"no 2 checkpointed edits in time:\n{procs.tail(log)}"
            for current in checkpoints.glob("*/CURRENT"):
                try:
                    killed_at = max(killed_at, int(current.read_text().strip() or 0))
                except (OSError, ValueError):
                    pass
            time.sleep(0.02)
        procs.stop(child, signal.SIGKILL)
    finally:
        procs.stop(child, signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    (current,) = checkpoints.glob("*/CURRENT")
    done_before_kill = int(current.read_text())
    assert 2 <= done_before_kill < n, "the kill should land mid-night"
    registry = Registry(world.tracking_uri)
    assert [v["version"] for v in registry.status(world.name)["versions"]] == ["1"]

    # the next run (same rows: the watermark did not move) resumes from the checkpoint; the
    # night lock the dead process held was released by the kernel
    report = run(world)
    assert report.status == "registered", report
    assert report.resumed_after == done_before_kill
    assert report.rows_read == n and report.accepted == n

    version = registry.load_version(world.name, CHAMPION)
    assert version.version == report.version == "2"
    ids = version.patch_set.edit_ids  # the edit ids in the registered patch set's manifest
    assert len(ids) == len(set(ids)), f"an edit was applied twice: {ids}"
    assert ids == version.edit_ids and set(ids) <= logged
    assert len(ids) == report.edits_applied == int(version.tags["patchflow.patch_count"])
    status = assert_registry_clean(registry, world.name)
    assert [v["version"] for v in status["versions"]] == ["1", "2"]
    assert not any(checkpoints.glob("*/CURRENT")), "the finished night's checkpoint is cleared"


# ------------------------------------------------------------------------------------------------
# 2. MLflow server down, and dying in the middle of a registration


@pytest.fixture()
def mlflow_server(tmp_path: Path, monkeypatch):
    # MLflow does the retrying; the Registry sets its retries (registry_retries / backoff) per call.
    # The environment here only bounds calls made outside the Registry (the pyfunc loader).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the Registry's download cache for http stores
    server = procs.MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_mlflow_server_down_then_dying_then_back(tmp_path: Path, mlflow_server: procs.MlflowServer, monkeypatch):
    import tasks.registry

    world = World(tmp_path / "world")
    world.tracking_uri = mlflow_server.url
    world.config(registry_retries=2, registry_backoff_s=0.2)
    assert world.register_base().version == "1"
    world.log_errors("night1.jsonl", 0, 3)
    real_register, real_create = tasks.registry.Registry.register_candidate, tasks.registry.Registry._create_version

    # (a) the server is gone when the night registers: a clear error after bounded retries
    def server_gone_first(self, *args, **kwargs):
        mlflow_server.stop()
        return real_register(self, *args, **kwargs)

    monkeypatch.setattr(tasks.registry.Registry, "register_candidate", server_gone_first)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=rf"MLflow at {mlflow_server.url} is unreachable.*failed 2 time"):
        run(world)
    assert time.monotonic() - started < 120
    monkeypatch.setattr(tasks.registry.Registry, "register_candidate", real_register)

    mlflow_server.start()
    registry = Registry(mlflow_server.url)
    assert [v["version"] for v in assert_registry_clean(registry, world.name)["versions"]] == ["1"]
    assert registry.info(world.name, CHAMPION).version == "1"

    # (b) the server dies right after the version was created, before it was verified
    def dies_after_create(self, *args, **kwargs):
        mv = real_create(self, *args, **kwargs)
        mlflow_server.stop()
        return mv

    monkeypatch.setattr(tasks.registry.Registry, "_create_version", dies_after_create)
    with pytest.raises(RegistryError, match="after version 2 was created; it could not be removed now"):
        run(world)
    monkeypatch.setattr(tasks.registry.Registry, "_create_version", real_create)

    mlflow_server.start()
    status = registry.status(world.name)
    assert status["aliases"] == {CHAMPION: "1"}, "no alias may point at the half-made version"
    half = [v for v in status["versions"] if v["version"] == "2"]
    assert half and not half[0]["complete"]

    # (c) back up: the next night registers exactly one new, complete version and removes the
    # half-made one (same night key); it resumed from the checkpoint of the failed nights
    report = run(world)
    assert report.status == "registered", report
    assert report.resumed_after == 3
    status = assert_registry_clean(registry, world.name)
    assert [v["version"] for v in status["versions"]] == ["1", report.version]
    assert registry.info(world.name, CHAMPION).version == report.version
    assert run(world).status == "nothing-new"
    assert [v["version"] for v in registry.status(world.name)["versions"]] == ["1", report.version]


# ------------------------------------------------------------------------------------------------
# 3. Two runs at once


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from tasks.config import load_config
from tasks.night import night_lock
with night_lock(load_config(sys.argv[1], Path(sys.argv[2]))):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_night_per_model_and_the_lock_survives_a_crash(world: World, tmp_path: Path):
    world.log_errors("night1.jsonl", 0, 2)
    cfg = load_config(world.name, world.deployments)
    args = [world.name, str(world.deployments)]
    log = tmp_path / "holder.log"
    holder = procs.start([procs.PYTHON, "-c", LOCK_HOLDER, *args], log, procs.child_env())
    try:
        deadline = time.monotonic() + 60
        while "locked" not in procs.tail(log):
            assert holder.poll() is None and time.monotonic() < deadline, procs.tail(log)
            time.sleep(0.05)

        # a person runs the night meanwhile: the real command, in its own process, on the harness' Prefect API;
        # one line naming the holder, exit 4
        other = subprocess.run([procs.PYTHON, "-m", "patchflow.cli", "--config-dir", str(world.deployments), "run",
                                world.name], env=procs.child_env(PREFECT_API_URL=harness_api_url()), cwd=procs.REPO,
                               capture_output=True, text=True, timeout=300)
        assert other.returncode == EXIT_LOCKED == 4, other.stderr[-3000:]
        mine = [line for line in other.stderr.splitlines() if line.startswith("patchflow: ")]
        assert len(mine) == 1, other.stderr[-3000:]
        assert mine[0].startswith(f"patchflow: another nightly run for model '{world.name}' is in progress "
                                  f"(pid {holder.pid} since") and mine[0].endswith("not starting a second one")

        # the flow: fails fast, before reading, validating or patching anything
        started = time.monotonic()
        with pytest.raises(NightLocked, match=rf"model '{world.name}' is in progress \(pid {holder.pid} since"):
            run(world)
        assert time.monotonic() - started < 30
        state_url = f"sqlite:///{world.workdir / 'state.db'}"
        assert StateStore(state_url).history(world.name) == []
        assert Registry(world.tracking_uri).status(world.name)["versions"][-1]["version"] == "1"

        # the holder crashes: the kernel drops its lock
        procs.stop(holder, signal.SIGKILL)
        assert holder.returncode == -signal.SIGKILL
    finally:
        procs.stop(holder, signal.SIGKILL)
    with night_lock(cfg):
        assert (cfg.model_workdir / "night.lock").read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(NightLocked):  # and it excludes a second holder in this process too
            with night_lock(cfg):
                pass
    assert run(world).status == "registered"


# ------------------------------------------------------------------------------------------------
# 4. Re-running a night that succeeded


def test_rerun_after_success_does_nothing_twice(world: World):
    world.log_errors("night1.jsonl", 0, 2, extra=[{"id": "bad-1", "logged_at": "yesterday", "input": "", "correction": "L7"}])
    first = run(world)
    assert first.status == "registered" and first.quarantined == 1, first
    registry = Registry(world.tracking_uri)
    state_url = f"sqlite:///{world.workdir / 'state.db'}"
    versions = registry.status(world.name)["versions"]
    quarantined = QuarantineStore(state_url).count(world.name)
    history = StateStore(state_url).history(world.name)
    ledger = registry.load_version(world.name, CHAMPION).ledger
    assert quarantined == 1 and len(history) == 1

    again = run(world)
    assert again.status == "nothing-new", again
    assert (again.rows_read, again.accepted, again.quarantined, again.edits_applied) == (0, 0, 0, 0)
    assert registry.status(world.name)["versions"] == versions
    assert registry.load_version(world.name, CHAMPION).ledger == ledger
    assert QuarantineStore(state_url).count(world.name) == quarantined
    assert len(StateStore(state_url).history(world.name)) <= len(history) + 1
