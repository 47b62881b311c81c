"""Evaluation that grows with the data: held-out locality set, every past edit, paraphrases.

A model is judged as it is served: a classifier by its top label, a generator by its greedy
answer, cut where it stops (``patcher.served_correct``). In process by default; with
``evaluation.runner: dask`` the inputs are cut into shards that run as Prefect tasks on a
``DaskTaskRunner`` (a LocalCluster here, any scheduler address in production). Each shard loads
the model from disk (base folder + patch set), so workers need nothing but the paths; results
are concatenated in order and are identical to the local path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from patcher import PatchSet, load_model, served_correct
from tasks.config import Evaluation

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRef(BaseModel):
    """A model as files: a base folder, optionally a patch set on top, and where to run it."""

    base_folder: Path
    patch_dir: Path | None = None
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def load(self):
        model, tokenizer = load_model(self.base_folder, dtype=DTYPES[self.dtype], device=self.device)
        if self.patch_dir is not None:
            PatchSet.load(self.patch_dir).apply(model)
        return model, tokenizer


def correct_on(ref: ModelRef, inputs: Sequence[str], targets: Sequence[str]) -> list[bool]:
    model, tokenizer = ref.load()
    return served_correct(model, tokenizer, list(inputs), list(targets))


@task(name="evaluate-shard", cache_policy=NO_CACHE, retries=1)
def evaluate_shard(ref: ModelRef, inputs: list[str], targets: list[str]) -> list[bool]:
    torch.set_num_threads(1)  # one thread per Dask worker process; the cluster gives parallelism
    return correct_on(ref, inputs, targets)


@flow(name="sharded-evaluation")
def sharded_evaluation(ref: ModelRef, inputs: list[str], targets: list[str], shards: int) -> list[bool]:
    size = max(1, -(-len(inputs) // shards))
    chunks = [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]
    futures = [evaluate_shard.submit(ref, xs, ys) for xs, ys in chunks]
    return [flag for future in futures for flag in future.result()]


def evaluate(ref: ModelRef, inputs: Sequence[str], targets: Sequence[str], evaluation: Evaluation,
             loaded=None) -> list[bool]:
    """Which inputs the model gets right, as served. ``loaded`` (model, tokenizer) skips reloading locally."""
    inputs, targets = list(inputs), list(targets)
    if not inputs:
        return []
    if evaluation.runner == "local":
        if loaded is not None:
            return served_correct(loaded[0], loaded[1], inputs, targets)
        return correct_on(ref, inputs, targets)
    from prefect_dask import DaskTaskRunner

    if evaluation.address:
        runner = DaskTaskRunner(address=evaluation.address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": evaluation.n_workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None})
    return sharded_evaluation.with_options(task_runner=runner)(ref, inputs, targets, evaluation.shards)


def evaluate_sets(ref: ModelRef, sets: dict[str, list[tuple[str, str]]], evaluation: Evaluation,
                  loaded=None) -> dict[str, list[bool]]:
    """Named sets of (input, target) pairs judged in one pass (one model load); flags by name."""
    pairs = [pair for name in sets for pair in sets[name]]
    flags = evaluate(ref, [x for x, _ in pairs], [y for _, y in pairs], evaluation, loaded=loaded)
    out, start = {}, 0
    for name, items in sets.items():
        out[name], start = flags[start : start + len(items)], start + len(items)
    return out
