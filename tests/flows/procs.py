"""Helpers for tests that run parts of patchflow in real child processes (servers, crashed runs).

Every process is started in its own session so it can be stopped by its own id (its process
group is the one we created), and is always stopped in a ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str | None) -> dict[str, str]:
    """This process' environment (offline switches from tests/conftest.py included), the repo on
    the path, one thread per child (2 shared cores), plus ``extra`` (None removes a variable)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop a child started by :func:`start` and everything it spawned (its own process group)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout}s:\n{tail(log)}")


def tail(log: Path, n: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class MlflowServer:
    """A real ``mlflow server`` on loopback, over any backend store (SQLite file, PostgreSQL)."""

    def __init__(self, root: Path, backend_store_uri: str | None = None):
        self.root, self.port = root, free_port()
        self.backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / f"mlflow-server-{self.starts}.log"
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        # No MLflow jobs (GenAI scorers, trace roll-ups): patchflow runs none, and without them the server
        # starts no job runner, a third process importing MLflow beside the CLI and the app server.
        self.proc = start(cmd, log, child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        wait_http(f"{self.url}/health", self.proc, log, timeout=180)

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def api_call(url: str, method: str = "GET", body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


class PrefectStack:
    """A real ``prefect server`` (SQLite or PostgreSQL), the ``patchflow`` process work pool, the
    deployments of prefect.yaml deployed from the repository, and a worker started elsewhere that
    finds the code through the deployment's pull step alone (PATCHFLOW_HOME, resolved at run time)."""

    def __init__(self, root: Path, database_url: str, extra_env: dict[str, str] | None = None):
        self.root, self.port = root, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        home = root / "prefect-home"
        self.env = child_env(
            PREFECT_HOME=str(home), PREFECT_API_URL=self.api, PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
            PREFECT_API_DATABASE_CONNECTION_URL=database_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false", PYTHONPATH=None,
            PREFECT_WORKER_QUERY_SECONDS="1",  # the worker looks for scheduled runs every second, not every 10
            **(extra_env or {}))
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        # PATCHFLOW_HOME unset here: `prefect deploy` would resolve the template at deploy time
        env = {k: v for k, v in self.env.items() if k != "PATCHFLOW_HOME"}
        out = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def __enter__(self) -> "PrefectStack":
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(self.port)], self.root / "server.log", self.env)
            wait_http(f"{self.api}/health", self.server, self.root / "server.log", timeout=180)
            self.cli("work-pool", "create", "patchflow", "--type", "process")
            elsewhere = self.root / "worker-cwd"
            elsewhere.mkdir(exist_ok=True)
            # the worker starts while the deployment is made (both are seconds of imports on a small machine)
            self.worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "patchflow", "--limit", "1"],
                                self.root / "worker.log", dict(self.env, PATCHFLOW_HOME=str(REPO)), cwd=elsewhere)
            self.cli("deploy", "-n", "nightly-manual")  # from prefect.yaml in the repository root
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop(self.worker)
        stop(self.server)

    def deployment(self, name: str = "patchflow-nightly/nightly-manual") -> dict:
        return api_call(f"{self.api}/deployments/name/{name}")

    def run(self, parameters: dict, timeout: float = 420) -> dict:
        """Run the nightly-manual deployment on the worker; the final flow-run state."""
        flow_run = api_call(f"{self.api}/deployments/{self.deployment()['id']}/create_flow_run", "POST",
                            {"parameters": parameters})
        deadline = time.monotonic() + timeout
        while True:
            state = api_call(f"{self.api}/flow_runs/{flow_run['id']}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert self.worker.poll() is None, tail(self.root / "worker.log")
            assert time.monotonic() < deadline, f"flow run still {state['type']}:\n{tail(self.root / 'worker.log')}"
            time.sleep(1)
        assert state["type"] == "COMPLETED", f"{state}\n{tail(self.root / 'worker.log', 8000)}"
        return state
