"""The leak-trace benchmark on a tiny BERT: a stopping rule replayed on a trace stops where a real
run with that rule stops."""

from __future__ import annotations

import copy

import pytest

from benchmarks import leak_trace
from benchmarks.harness import Judge, split_paraphrases
from benchmarks.sme import build_stream
from patcher import EditRequest, Editor, PatcherConfig
from tests.benchmarks.test_sme import synthetic_task

AFTER_FIXED = 80


def _editor(model, task, config: PatcherConfig) -> Editor:
    editor = Editor(copy.deepcopy(model), task.tokenizer, config)
    editor.build_memory(task.memory_texts)
    return editor


def test_run_traces_every_edit_and_replays_the_rules():
    task = synthetic_task()
    stream, _ = build_stream(task, 0, 2, Judge("served"))
    config = PatcherConfig(memory_size=100, leak_tol=0.05, patience=20, fixed_patience=40)
    result = leak_trace.run(task.model, task.tokenizer, task.memory_texts, stream, "half", AFTER_FIXED, config)

    assert result["items"] == 2 and result["edited"] == len(result["edits"]) >= 1
    for edit in result["edits"]:
        assert edit["first_fixed"] is not None and edit["steps"] >= AFTER_FIXED  # no early stop
        assert len(edit["leak"]) == -(-edit["steps"] // 10)  # every 10th step kept
    rules = result["rules"]
    assert rules["default"]["share_of_default_steps"] == 1.0
    assert sum(rules["default"]["reasons"].values()) == result["edited"]
    assert rules["fixed_patience=200"]["steps"] <= rules["fixed_patience=300"]["steps"]


@pytest.mark.parametrize("rule, reason", [(dict(leak_tol=0.05, patience=10**9, fixed_patience=200), "leak"),
                                          (dict(leak_tol=0.0, patience=10**9, fixed_patience=30), "fixed_patience")])
def test_a_replayed_rule_stops_where_the_run_stops(rule, reason):
    task = synthetic_task()
    item = build_stream(task, 0, 1, Judge("served"))[0][0]
    # a memory without the mistake's own sentence, so that its leak can fall below the tolerance
    task.memory_texts = [t for t in task.memory_texts if not t.startswith(item.input)]
    request = EditRequest(item.id, item.input, item.target, split_paraphrases(item, "half")[0])
    config = PatcherConfig(memory_size=100, retry_neurons=1, **rule)
    traced = config.model_copy(update=dict(leak_tol=0.0, patience=10**9, fixed_patience=200))

    trace = leak_trace.trace_edits(_editor(task.model, task, traced), [request])[0]["trace"]
    real = _editor(task.model, task, config).edit(request)
    assert leak_trace.Rule(**rule).stop(trace, config.memory_refresh) == (real.steps, reason)
    assert real.steps < len(trace)
