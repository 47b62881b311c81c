"""The scale benchmark end to end on a tiny Llama shape on the CPU (seconds): the three modes run
(the compiled one in bf16 too), every figure is there and sane, and bad options fail with a
one-line error."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import scale

torch.set_num_threads(1)

TINY = ["--shape", "1.1b", "--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2",
        "--device", "cpu", "--memory", "12", "--edits", "2", "--steps", "3"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_tiny_cpu_run_writes_every_field(tmp_path):
    out = tmp_path / "scale.json"
    returned = scale.main(TINY + ["--dtype", "bfloat16", "--modes", "cached,compiled,graphed,compiled-graphed,full", "--profile",
                                  "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data["benchmark"] == "scale" and data["device"] == "cpu" and data["dtype"] == "bfloat16"
    assert data["model"]["num_hidden_layers"] == 2 and data["model"]["hidden_size"] == 64
    assert data["model"]["intermediate_size"] == 128 and data["model"]["vocab_size"] == 30522
    assert data["model"]["parameters"] > 30522 * 64
    assert data["memory"]["sentences"] == 12 and data["memory"]["queries"] > 12 and data["memory"]["build_s"] > 0
    assert set(data["modes"]) == {"cached", "compiled", "graphed", "compiled-graphed", "full"}
    assert data["compile"] == "default"
    for mode in data["modes"].values():
        assert mode["edits"] == 2 and mode["edits"] - mode["already_correct"] >= 1
        assert mode["steps"] == 3 * (mode["edits"] - mode["already_correct"])
        assert mode["ms_per_step"] > 0 and mode["s_per_edit"] > mode["ms_per_step"] * 3 / 1000
        assert mode["peak_gpu_mb"] is None
        prof = mode["profile"]  # one more edit, profiled: on a CPU no launches or syncs, some .item() calls
        assert prof["steps"] == 3 and prof["wall_ms"] > 0 and prof["device_busy_ms"] is None
        assert prof["launches_per_step"] == 0 and prof["syncs_per_step"] == 0 and prof["items_per_step"] > 0
        assert prof["top_host_ops"] and all(op["count"] >= 1 for op in prof["top_host_ops"])
    assert data["modes"]["compiled"]["compile_counters"]["stats"]["unique_graphs"] >= 1
    assert "compile_counters" in data["modes"]["compiled-graphed"] and "compile_counters" not in data["modes"]["graphed"]
    assert data["modes"]["graphed"]["recordings_failed"] == 0 and data["modes"]["graphed"]["recording_errors"] == []
    assert "recordings_failed" not in data["modes"]["cached"]
    assert all(data[f"full_over_{m}_step"] > 0 for m in ("cached", "compiled", "graphed", "compiled-graphed"))
    assert data["command"].startswith("python -m benchmarks.scale")


def test_the_batched_mode_edits_through_edit_batch(tmp_path):
    """batched: the requests go through Editor.edit_batch in packs of --edit-batch (here 2 packs:
    3 then 1), each edit trained for exactly --steps steps. (compiled-batched only adds
    PatcherConfig.compile, which here would compile the batch step: about 30 s of a cold CI run.)"""
    out = tmp_path / "scale.json"
    scale.main(TINY[:-4] + ["--edits", "4", "--steps", "3", "--edit-batch", "3", "--modes", "batched,full",
                            "--profile", "--out", str(out)])
    data = json.loads(out.read_text())
    mode = data["modes"]["batched"]
    assert mode["edit_batch"] == 3 and mode["edits"] == 4 and "profile" not in mode
    trained = mode["edits"] - mode["already_correct"]
    assert trained >= 1 and mode["steps"] >= 3 * trained  # a pack's try that misses is trained again alone
    assert mode["ms_per_step"] > 0 and mode["s_per_edit"] > 0 and data["full_over_batched_step"] > 0
    assert "edit_batch" not in data["modes"]["full"] and "profile" in data["modes"]["full"]


@pytest.mark.parametrize("bad, message", [(["--modes", "fast"], "--modes"), (["--steps", "0"], "--steps"),
                                          (["--edit-batch", "0"], "--edit-batch"),
                                          (["--heads", "5"], "divide evenly"),
                                          (["--compile", "reduce-overhead"], "--compile"),
                                          (["--tokenizer", "/"], "no tokenizer_config.json")])
def test_bad_options_exit_with_one_line(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        scale.main(TINY + bad + ["--out", str(tmp_path / "x.json")])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    text = str(exc.value.code) if isinstance(exc.value.code, str) else err[-1]
    assert message in text and "\n" not in text
    assert not (tmp_path / "x.json").exists()


def test_a_failing_mode_is_recorded_and_the_others_kept(tmp_path, monkeypatch):
    """A mode that fails (a fault injected into the full mode) leaves its error in the JSON, the
    cached mode's figures stay, and the command exits non-zero naming the mode."""
    real = scale.run_mode

    def run_mode(model, tok, mode, *args, **kwargs):
        if mode == "full":
            raise RuntimeError("injected fault")
        return real(model, tok, mode, *args, **kwargs)

    monkeypatch.setattr(scale, "run_mode", run_mode)
    out = tmp_path / "scale.json"
    with pytest.raises(SystemExit) as exc:
        scale.main(TINY + ["--modes", "cached,full", "--out", str(out)])
    assert "full" in str(exc.value.code) and str(out) in str(exc.value.code)
    data = json.loads(out.read_text())
    assert data["modes"]["full"] == {"error": "RuntimeError: injected fault"}
    assert data["modes"]["cached"]["ms_per_step"] > 0 and "full_over_cached_step" not in data


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lifecycle_checks_apply_fold_and_remove_on_the_device(tmp_path):
    """--lifecycle (bf16 on the CPU here, the GPU script's dtype): kept edits, the patch set applied
    to a copy of the base gives the patched logits bit for bit, the folded model serves every fixed
    edit, and removing them all gives the base back bit for bit."""
    out = tmp_path / "scale.json"
    scale.main(TINY + ["--dtype", "bfloat16", "--modes", "cached", "--lifecycle", "--out", str(out)])
    life = json.loads(out.read_text())["lifecycle"]
    assert life["ok"] is True and life["fixed"] >= 1 and life["neurons"] >= life["fixed"]
    assert life["fixed_as_served"] == life["folded_fixed_as_served"] == life["fixed"]
    assert life["applied_equals_patched"] and life["removed_equals_base"] and life["patched_differs_from_base"]
    assert 0 <= life["folded_max_abs_diff"] and 0 < life["folded_argmax_agreement"] <= 1


def test_a_failing_lifecycle_check_exits_non_zero_and_keeps_the_rest(tmp_path, monkeypatch):
    """A patch set that loads wrong (a fault injected into PatchSet.apply) is caught, recorded,
    and the command exits 1 with the modes' figures written."""
    from patcher import PatchSet

    def broken_apply(self, model, check_base=True):
        return model  # nothing applied: the copy keeps the base's logits

    monkeypatch.setattr(PatchSet, "apply", broken_apply)
    out = tmp_path / "scale.json"
    with pytest.raises(SystemExit, match="lifecycle failed"):
        scale.main(TINY + ["--modes", "cached", "--lifecycle", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["lifecycle"]["ok"] is False and data["lifecycle"]["applied_equals_patched"] is False
    assert data["modes"]["cached"]["ms_per_step"] > 0
