"""The SME harness on a tiny BERT and synthetic claims: structure and ranges only, no quality bars
(those belong to results files)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import breakage, harness, methods, report, sme
from benchmarks.baselines import FineTuner, FTConfig, trainable_parameters
from patcher import EditRequest, served_correct, target_correct
from tests import tiny

torch.set_num_threads(1)

RATES = ("sr", "gr", "er", "er_stream", "neighbour_r", "train_acc", "test_acc", "train_acc_base", "test_acc_base")
RATIOS = ("train_r", "test_r")


def synthetic_task() -> harness.Task:
    model, tok = tiny.build("bert", num_labels=2)
    s = tiny.SENTENCES
    claims = [(text, i % 2) for i, text in enumerate(s)]
    pool = [harness.Item(f"c{i}", text, label, [f"{text} today", f"the {text}"], ["suffix", "prefix"])
            for i, (text, label) in enumerate(claims[:16])]

    def neighbours(item):
        i = int(item.id[1:])
        return [claims[(i + k) % len(claims)] for k in (1, 2, 3)]

    return harness.Task(name="synthetic", model=model, tokenizer=tok, edit_pool=pool,
                        memory_texts=s + [f"{t} today" for t in s], train_eval=claims[16:22], test_eval=claims[22:],
                        neighbours=neighbours)


RUN = ("patcher", "faithful", "ft", "ftkl", "locft-bf")  # reference: test_reference_method


@pytest.fixture(scope="module")
def result():
    task = synthetic_task()
    return sme.run_benchmark(task, n_edits=3, seed=0, methods=RUN,
                             patcher_config={"memory_size": 100, "max_steps": 60},
                             faithful_edits=2, ft_config={"max_steps": 5, "lr": 1e-3},
                             ftkl_config={"max_steps": 5, "lr": 1e-3, "kl_pool": 8, "kl_batch": 4},
                             locft_config={"max_steps": 5, "lr": 1e-3, "kl_pool": 8, "kl_batch": 4, "batch_size": 2},
                             every=2, progress=False)


def test_json_structure(result, tmp_path):
    out = tmp_path / "r.json"
    report.write_json(result, out)
    data = json.loads(out.read_text())  # strict JSON: no NaN
    for key in ("task", "seed", "N", "machine", "wall_seconds", "methods", "stream_length", "base_mistakes", "judge"):
        assert key in data
    assert data["judge"] == "served"
    assert {"platform", "cpu_count", "torch_threads", "cpu_model", "cpu_capability"} <= set(data["machine"])
    assert isinstance(data["machine"]["cpu_capability"], str) and data["machine"]["cpu_capability"]
    assert data["stream_length"] == min(3, data["base_mistakes"]) > 0
    assert list(data["methods"]) == list(RUN)
    for name, res in data["methods"].items():
        assert res["edited"] + res["fixed_before_edit"] == res["stream"]
        assert len(res["edits"]) == res["stream"]
        for row in res["edits"]:  # each held-out paraphrase's verdict, in the item's order
            if not row["fixed_before_edit"]:
                assert len(row["gr"]) == row["gr_total"] and sum(row["gr"]) == row["gr_correct"]
        assert sum(len(r.get("gr", [])) for r in res["edits"]) == res["gr_paraphrases"]
        by_kind = res["gr_by_kind"]  # every held-out paraphrase counted once, under its kind
        assert set(by_kind) == {"suffix", "prefix"} and {v["total"] for v in by_kind.values()} == {res["edited"]}
        assert sum(v["correct"] for v in by_kind.values()) == sum(r.get("gr_correct", 0) for r in res["edits"])
        assert by_kind["prefix"]["correct"] == sum(r["gr"][1] for r in res["edits"] if "gr" in r)
        assert res["series"] and res["series"][-1]["t"] == res["stream"]
        for point in res["series"]:
            for k in ("sr", "gr", "er", "test_retained"):
                assert point[k] is None or 0.0 <= point[k] <= 1.0
        for k in RATES:
            assert res[k] is None or 0.0 <= res[k] <= 1.0, (name, k, res[k])
        for k in RATIOS:  # netted ratios may exceed 1 when the edited model does better
            assert res[k] is None or res[k] >= 0.0
        for k in ("train_locality", "test_locality"):  # per item, never netted
            loc = res[k]
            assert loc["kept"] + loc["broken"] == loc["base_correct"] <= loc["n"]
            assert 0.0 <= loc["retained"] <= 1.0
        assert res["test_locality"]["n"] == data["base"]["test_eval"]
        assert res["seconds_per_edit_median"] is None or res["seconds_per_edit_median"] >= 0
        assert "config" in res
    assert data["methods"]["faithful"]["stream"] == 2
    cmp = data["methods"]["faithful"]["comparison"]
    assert cmp["method"] == "faithful" and cmp["faithful_edits"] + cmp["patcher_edits"] >= 1
    assert 0.0 <= cmp["test_prediction_agreement"] <= 1.0
    assert isinstance(cmp["same_edits_fixed"], bool)
    assert data["methods"]["patcher"]["config"]["memory_queries"] > 0
    for name in ("patcher", "faithful"):  # each broken test item, with its cause (benchmarks.breakage)
        res = data["methods"][name]
        causes = res["test_broken_causes"]
        assert causes["broken"] == res["test_locality"]["broken"] == len(causes["items"]) == sum(causes["counts"].values())
        assert all(row["cause"] in breakage.CAUSES for row in causes["items"])
    assert all("test_broken_causes" not in data["methods"][n] for n in ("ft", "ftkl", "locft-bf"))
    assert data["methods"]["ft"]["neurons"] == 0
    bf = data["methods"]["locft-bf"]
    assert bf["config"]["ft"]["breadth_first"] and bf["config"]["ft"]["layers"] == 2
    assert bf["config"]["ft"]["batch_size"] == 2 and bf["config"]["ft"]["lr"] == 1e-3  # the options win
    assert "comparison" not in bf and "stream_prefix" not in bf and bf["stream"] == data["stream_length"]


def test_plot_and_summary(result, tmp_path):
    png = tmp_path / "r.png"
    report.plot(result, png)
    assert png.stat().st_size > 1000
    assert "patcher" in report.summary(result)


def test_judge_is_patchers_two_judges():
    """The harness has no judge of its own: each mode is one of patcher's."""
    task = synthetic_task()
    pairs = task.train_eval + task.test_eval
    inputs, targets = [p for p, _ in pairs], [y for _, y in pairs]
    assert harness.Judge("teacher-forced").correct(task.model, task.tokenizer, pairs) == \
        target_correct(task.model, task.tokenizer, inputs, targets)
    gen, gtok = tiny.build("llama")
    gpairs = [("the capital of france is", " paris"), ("the cat is", " in the house")]
    gin, gtar = [p for p, _ in gpairs], [y for _, y in gpairs]
    assert harness.Judge("served").correct(gen, gtok, gpairs) == served_correct(gen, gtok, gin, gtar)
    assert harness.Judge("teacher-forced").correct(gen, gtok, gpairs) == target_correct(gen, gtok, gin, gtar)
    assert harness.Judge().correct(gen, gtok, []) == []
    with pytest.raises(ValueError, match="judge must be one of"):
        harness.Judge("argmax")


def test_paraphrase_split():
    item = harness.Item("x", "a", 1, ["p0", "p1", "p2"])
    assert harness.split_paraphrases(item, "heldout") == ([], ["p0", "p1", "p2"])
    assert harness.split_paraphrases(item, "half") == (["p0", "p2"], ["p1"])
    with pytest.raises(ValueError):
        harness.split_paraphrases(item, "all")
    assert harness.held_out_kinds(item, "half") == ["paraphrase"]  # no kinds given
    kinds = harness.Item("x", "a", 1, ["p0", "p1", "p2"], ["k0", "k1", "k2"])
    assert harness.held_out_kinds(kinds, "half") == ["k1"] and harness.held_out_kinds(kinds, "heldout") == ["k0", "k1", "k2"]


def test_wording_consistency_reads_each_wording_of_the_facts_the_base_knows():
    task = synthetic_task()
    task.wording_items = task.edit_pool
    judge = harness.Judge()
    out = harness.wording_consistency(task, judge)
    main = judge.correct(task.model, task.tokenizer, [(i.input, i.target) for i in task.edit_pool])
    known = [i for i, ok in zip(task.edit_pool, main) if ok]
    assert out["items"] == 16 and out["main_correct"] == len(known) > 0
    assert list(out["by_kind"]) == ["suffix", "prefix"]
    for n, kind in enumerate(("suffix", "prefix")):
        flags = judge.correct(task.model, task.tokenizer, [(i.paraphrases[n], i.target) for i in known])
        assert out["by_kind"][kind] == {"correct": sum(flags), "total": len(known), "rate": sum(flags) / len(known)}


def test_ft_trains_only_the_last_ffn():
    model, tok = tiny.build("bert", num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = FineTuner(model, tok, FTConfig(max_steps=3, lr=1e-2))
    text = tiny.SENTENCES[0]
    wrong = 1 - int(model(**tok(text, return_tensors="pt")).logits.argmax())
    tuner.edit(EditRequest("x", text, wrong))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".encoder.layer.1.intermediate." in k or ".encoder.layer.1.output.dense." in k for k in changed)
    assert len(trainable_parameters(model, "layer")) > len(trainable_parameters(model, "ffn")) == 4
    assert tuner.trained_ids == [["x"]]


def test_jsonable_strict():
    assert report.jsonable({"a": math.nan, "b": (1, math.inf)}) == {"a": None, "b": [1, None]}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_ft_builds_every_tensor_on_the_models_device(family: str):
    """With torch's default device set to meta, any tensor made without the model's device fails."""
    model, tok = tiny.build(family, **({"num_labels": 2} if family == "bert" else {}))
    tuner = FineTuner(model, tok, FTConfig(max_steps=2, lr=1e-2, kl_weight=1.0, kl_pool=4, kl_batch=2),
                      kl_texts=tiny.SENTENCES[:8])
    text = tiny.SENTENCES[0]
    target = 1 - int(model(**tok(text, return_tensors="pt")).logits.argmax()) if family == "bert" else " red car"
    with torch.device("meta"):
        result = tuner.edit(EditRequest("x", text, target, equivalents=[tiny.SENTENCES[1]]))
    assert result.already_correct or result.steps >= 1


def test_a_generation_task_judged_as_served():
    """The QA path: a tiny Llama, answers judged by greedy generation, the stream from its own mistakes."""
    model, tok = tiny.build("llama")
    s = tiny.SENTENCES
    pool = [harness.Item(f"g{i}", s[i], " red car", [f"{s[i]} today"]) for i in range(6)]
    task = harness.Task(name="synthetic-qa", model=model, tokenizer=tok, edit_pool=pool, memory_texts=s[6:],
                        train_eval=[(t, " blue sky") for t in s[10:14]], test_eval=[(t, " the sun") for t in s[14:20]])
    result = sme.run_benchmark(task, n_edits=2, seed=0, methods=("patcher", "ft"),
                               patcher_config={"memory_size": 200, "max_steps": 120}, ft_config={"max_steps": 3},
                               every=1, progress=False)
    assert result["kind"] == "generation" and result["judge"] == "served"
    served = served_correct(model, tok, [it.input for it in pool], [it.target for it in pool])
    assert result["base_mistakes"] == served.count(False) and result["stream_length"] == min(2, served.count(False))
    patched = result["methods"]["patcher"]
    assert patched["edited"] + patched["fixed_before_edit"] == result["stream_length"]
    assert 0.0 <= patched["folded_test_agreement"] <= 1.0


def test_a_batched_patcher_walks_the_stream_in_chunks():
    """``edit_batch``: the stream goes to the editor in chunks; every item gets its row, in order,
    and the edits the editor found right at their turn count as fixed before their edit."""
    task = synthetic_task()
    result = sme.run_benchmark(task, n_edits=5, seed=0, methods=("patcher",),
                               patcher_config={"memory_size": 100, "max_steps": 60, "edit_batch": 3},
                               every=2, progress=False)
    patched = result["methods"]["patcher"]
    rows = patched["edits"]
    assert [r["t"] for r in rows] == list(range(1, result["stream_length"] + 1))
    assert patched["edited"] + patched["fixed_before_edit"] == result["stream_length"] == 5
    assert patched["config"]["patcher"]["edit_batch"] == 3
    edited = [r for r in rows if not r["fixed_before_edit"]]
    assert edited and all(r["seconds"] > 0 and r["steps"] > 0 for r in edited)
    assert patched["sr"] == sum(r["success"] for r in edited) / len(edited)
    assert [s["t"] for s in patched["series"]] == [2, 4, 5]
