"""The method registry: every name the CLI accepts makes the editor it says, user options override
the method's defaults, and the reference method runs PatcherConfig.reference or fails clearly."""

from __future__ import annotations

import pytest
import torch

from benchmarks import methods, sme
from benchmarks.baselines import FineTuner
from patcher import Editor, PatcherConfig
from tests.benchmarks.test_sme import synthetic_task

torch.set_num_threads(1)


def test_the_registry():
    assert list(methods.METHODS) == ["patcher", "faithful", "reference", "ft", "ftkl", "locft-bf"]
    assert {n for n, m in methods.METHODS.items() if m.prefix} == {"faithful", "reference"}
    assert {n for n, m in methods.METHODS.items() if m.family == "ft"} == {"ft", "ftkl", "locft-bf"}
    assert set(sme.DEFAULT_METHODS) < set(methods.METHODS)
    with pytest.raises(ValueError, match="unknown methods"):
        methods.check_methods(["patcher", "lora"])
    with pytest.raises(ValueError, match="no method"):
        methods.check_methods([])


@pytest.mark.parametrize("name, expect", [
    ("ft", dict(breadth_first=False, kl_weight=0.0, layers=1)),
    ("ftkl", dict(breadth_first=False, kl_weight=1.0, layers=1)),
    ("locft-bf", dict(breadth_first=True, kl_weight=1.0, layers=2, batch_size=16, max_steps=100)),
])
def test_ft_family_defaults_and_overrides(name, expect):
    task = synthetic_task()
    model, tok = task.fresh()
    tuner, info = methods.make_editor(name, task, {}, seed=3, memory_cache={})(model, tok)
    assert isinstance(tuner, FineTuner)
    for key, value in expect.items():
        assert getattr(tuner.config, key) == value and info["ft"][key] == value
    assert tuner.config.seed == 3 and info["trained_parameters"] == tuner.trained_parameter_count > 0
    model, tok = task.fresh()
    tuner, _ = methods.make_editor(name, task, {"layers": 1, "seed": 9, "kl_weight": 0.5}, 3, {})(model, tok)
    assert (tuner.config.layers, tuner.config.seed, tuner.config.kl_weight) == (1, 9, 0.5)


def test_patcher_methods_share_a_memory_only_with_the_same_settings():
    task = synthetic_task()
    cache: dict = {}
    made = {}
    for name in ("patcher", "faithful"):
        model, tok = task.fresh()
        made[name] = methods.make_editor(name, task, {"memory_size": 50}, 0, cache)(model, tok)
    (cached, info_c), (full, info_f) = made["patcher"], made["faithful"]
    assert isinstance(cached, Editor) and cached.config.cached and not full.config.cached
    assert len(cache) == 1 and info_c["memory_queries"] == info_f["memory_queries"] > 0
    assert torch.equal(cached.memory, full.memory) and cached.memory.data_ptr() != full.memory.data_ptr()
    model, tok = task.fresh()
    methods.make_editor("patcher", task, {"memory_size": 20}, 0, cache)(model, tok)
    assert len(cache) == 2


def test_reference_method_uses_patcher_config_reference():
    assert callable(getattr(PatcherConfig, "reference", None)), \
        "patcher/config.py lacks PatcherConfig.reference(task, **overrides), which the reference method runs"
    task = synthetic_task()
    model, tok = task.fresh()
    editor, info = methods.make_editor("reference", task, {"memory_size": 60}, 0, {})(model, tok)
    assert editor.config == PatcherConfig.reference("classification", memory_size=60)
    assert info["patcher"] == editor.config.model_dump()
    result = sme.run_benchmark(synthetic_task(), n_edits=2, seed=0, methods=("patcher", "reference"),
                               patcher_config={"memory_size": 100, "max_steps": 30},
                               reference_config={"memory_size": 100, "max_steps": 30}, reference_edits=1,
                               every=1, progress=False)
    ref = result["methods"]["reference"]
    assert ref["stream"] == ref["stream_prefix"] == 1 and result["methods"]["patcher"]["stream"] == 2
    cmp = ref["comparison"]
    assert cmp["method"] == "reference" and cmp["stream_prefix"] == 1
    assert {"reference_seconds_per_edit_median", "fixed_by_reference", "test_prediction_agreement"} <= set(cmp)


def test_reference_without_patcher_support_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.delattr(PatcherConfig, "reference", raising=False)  # the fault: an older patcher
    with pytest.raises(methods.MethodUnavailable, match=r"PatcherConfig.reference\(task"):
        methods.check_methods(["patcher", "reference"])
    with pytest.raises(methods.MethodUnavailable):
        sme.run_benchmark(synthetic_task(), n_edits=1, methods=("patcher", "reference"), progress=False)
    # the CLI refuses before it loads a task (no model cache exists under this folder)
    with pytest.raises(SystemExit) as exc:
        sme.main(["--task", "fact-check", "--edits", "1", "--out", "/nonexistent/x.json", "--methods",
                  "patcher,reference", "--cache-dir", "/nonexistent"])
    message = str(exc.value.code)
    assert message.startswith("error: --methods:") and "PatcherConfig.reference" in message and "\n" not in message


@pytest.mark.parametrize("argv, message", [(["--methods", "patcher,lora"], "unknown methods"),
                                           (["--reference-edits", "0"], "--reference-edits must be >= 1")])
def test_bad_cli_options_fail_before_loading(argv, message):
    with pytest.raises(SystemExit) as exc:
        sme.main(["--task", "qa", "--edits", "1", "--out", "/nonexistent/x.json", "--cache-dir", "/nonexistent", *argv])
    assert message in str(exc.value.code)


def test_patcher_configs_per_task_kind():
    assert methods.patcher_config("reference", "generation", {}) == PatcherConfig.reference("generation")
    assert methods.patcher_config("faithful", "generation", {"max_steps": 7}) == PatcherConfig(cached=False, max_steps=7)
