"""A registered version serves outside this checkout (issue 10 #9): it loads and predicts in a
process that cannot import patchflow's packages, and ``mlflow models serve`` answers over HTTP.

How the checkout is kept out: the venv has patchflow installed in editable mode (a meta-path
finder from site-packages maps ``tasks``, ``patcher``, ... to this checkout). The child runs with
``python -I`` (no current directory or PYTHONPATH on sys.path) from a folder outside the
checkout, and puts a finder in front of every other one that refuses any of our top-level
packages whose file lies inside the checkout. ``patcher`` can then only come from where MLflow
put it: the version's ``code/`` folder. The child first proves the block works (each import
fails), then loads ``models:/<name>@champion`` and predicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

from tasks.registry import CHAMPION, Registry
from tests.flows import procs
from tests.tasks.registry.conftest import NAME, TEXTS, candidate

CHILD = r'''
import importlib.machinery, json, sys
repo, name, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
OURS = {"tasks", "patcher", "flows", "patchflow", "benchmarks", "editdata", "tests"}


class CheckoutBlocker:
    """Our packages only from outside the checkout (MLflow's copy in the model's code/ folder)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in OURS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or spec.origin.startswith(repo):
            raise ModuleNotFoundError(f"{fullname} is not importable here", name=fullname)
        return spec


sys.meta_path.insert(0, CheckoutBlocker())
for package in sorted(OURS):
    try:
        __import__(package)
    except ModuleNotFoundError:
        continue
    sys.exit(f"the checkout leaks: {package} is importable")

import mlflow.pyfunc
model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
import patcher
print(json.dumps({"predictions": list(model.predict(texts)), "patcher": patcher.__file__,
                  "ours_loaded": sorted({m.split(".")[0] for m in sys.modules} & (OURS - {"patcher"}))}))
'''


def test_a_version_loads_and_predicts_where_the_checkout_cannot_be_imported(reg: Registry, assets, tmp_path):
    reg.register_base(NAME, assets["base"], "text-classification")
    assert candidate(reg, assets, alias=CHAMPION).aliases == (CHAMPION,)
    env = procs.child_env(PYTHONPATH=None, MLFLOW_TRACKING_URI=reg.tracking_uri)
    out = subprocess.run([sys.executable, "-I", "-c", CHILD, str(procs.REPO), NAME, json.dumps(TEXTS)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["predictions"] == assets["p1_preds"]  # the base + the patch, rebuilt out there
    assert not result["patcher"].startswith(str(procs.REPO)) and "/code/patcher/" in result["patcher"]
    assert result["ours_loaded"] == []


def test_mlflow_models_serve_answers_invocations(reg: Registry, assets, tmp_path):
    reg.register_base(NAME, assets["base"], "text-classification")
    candidate(reg, assets, alias=CHAMPION)
    port = procs.free_port()
    log = tmp_path / "serve.log"
    cmd = [str(procs.BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1"]
    env = procs.child_env(MLFLOW_TRACKING_URI=reg.tracking_uri, PATH=f"{procs.BIN}{os.pathsep}{os.environ['PATH']}")
    server = procs.start(cmd, log, env, cwd=tmp_path)  # the venv's bin on PATH: MLflow runs its `uvicorn`
    try:
        procs.wait_http(f"http://127.0.0.1:{port}/ping", server, log, timeout=240)
        body = json.dumps({"dataframe_split": {"columns": ["input"], "data": [[t] for t in TEXTS]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            answer = json.loads(response.read())
    finally:
        procs.stop(server)
    assert answer == {"predictions": assets["p1_preds"]}
    assert server.returncode is not None
