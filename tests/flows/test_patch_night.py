"""Patching a night: a record the patcher refuses does not stop the others, and a night killed
half-way and resumed trains exactly the patches an uninterrupted one does."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from patcher import PatchSet
from tasks.config import load_config
from tasks.patch import patch_night, split_paraphrases
from tasks.records import ErrorRecord
from tasks.registry import Registry


def _records(world, start: int, n: int, paraphrases: int = 0) -> list[ErrorRecord]:
    rows = world.log_errors(f"rows-{start}.jsonl", start, n)
    out = []
    for k, row in enumerate(rows):
        extra = [s for s, _ in world.pool[40 + 3 * k : 40 + 3 * k + paraphrases]]
        out.append(ErrorRecord(id=row["id"], logged_at=datetime.now(timezone.utc), input=row["input"],
                               correction=row["correction"], equivalents=extra, origin="test"))
    return out


def _parent(world):
    return Registry(world.tracking_uri).load_version(world.name, "champion")


def _batched(cfg, edit_batch: int, edit_negatives: int = 0):
    update = {"edit_batch": edit_batch, "edit_negatives": edit_negatives}
    return cfg.model_copy(update={"patcher": cfg.patcher.model_copy(update=update)})


@pytest.mark.parametrize("edit_batch", [1, 3])
def test_an_unpatchable_record_is_returned_with_its_reason_and_the_night_goes_on(world, edit_batch):
    cfg = _batched(load_config(world.name, world.deployments), edit_batch)
    good = _records(world, 0, 3)
    huge = ErrorRecord(id="too-long", logged_at=datetime.now(timezone.utc), input=" ".join(["word"] * 3000),
                       correction="L0", origin="test")
    run = patch_night(cfg, _parent(world), good[:1] + [huge] + good[1:])
    assert [f.id for f in run.failed] == ["too-long"]
    assert run.failed[0].reason.startswith("unpatchable: ") and "tokens" in run.failed[0].reason
    assert [r.id for r in run.results] == [r.id for r in good]
    assert run.applied, "the other records were patched"
    assert set(PatchSet.load(run.patch_dir).edit_ids) == {r.id for r in run.applied}


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("edit_batch, edit_negatives", [(1, 4), (2, 0)])
def test_a_resumed_night_gives_bit_identical_patches(world, tmp_path: Path, edit_batch, edit_negatives):
    """With ``edit_negatives`` the resumed night reads its memory from the cache the first one wrote,
    and must draw the same negatives from the memory texts."""
    base_cfg = _batched(load_config(world.name, world.deployments), edit_batch, edit_negatives)
    records = _records(world, 0, 4, paraphrases=2)

    whole = patch_night(base_cfg.model_copy(update={"workdir": tmp_path / "a"}), _parent(world), records)

    cfg = base_cfg.model_copy(update={"workdir": tmp_path / "b"})

    def crash_after_two(i, n, step):  # after a whole batch of two, so both nights batch the rest alike
        if i == 2:
            raise Crash("killed")

    with pytest.raises(Crash):
        patch_night(cfg, _parent(world), records, crash_after_two)
    resumed = patch_night(cfg, _parent(world), records)
    assert resumed.resumed_after == 2
    assert [r.id for r in resumed.results] == [r.id for r in whole.results]
    a, b = PatchSet.load(whole.patch_dir), PatchSet.load(resumed.patch_dir)
    assert a.edit_ids == b.edit_ids and len(a.blocks) >= 3
    for x, y in zip(a.blocks, b.blocks):
        for s, t in zip(x.in_weight + x.in_bias + [x.out_weight], y.in_weight + y.in_bias + [y.out_weight]):
            assert torch.equal(s, t), f"edit {x.edit_id}: resumed patch differs"


def test_paraphrase_split_is_stable_and_holds_out_the_rounded_up_share():
    eqs = [f"p{i}" for i in range(5)]
    trained, held = split_paraphrases("r1", eqs, 0.5)
    assert len(held) == 3 and len(trained) == 2 and sorted(trained + held) == eqs
    assert split_paraphrases("r1", eqs, 0.5) == (trained, held)
    assert split_paraphrases("r1", ["only"], 0.5) == ([], ["only"])
    assert split_paraphrases("r1", eqs, 0.0) == (eqs, [])
    # a different record gets its own split: the choice is not always the same positions
    assert any(split_paraphrases(f"r{k}", eqs, 0.4)[1] != held[:2] for k in range(2, 8))


def test_patching_leaves_the_parent_model_as_it_was(world):
    """The gate compares the candidate with the parent: the parent's model object, which patching
    works on to save a copy, must come back bit for bit (an earlier version left tonight's patches
    in it, so the gate compared the candidate with itself and never saw a regression)."""
    from tests.patcher import _common as C

    from patcher import served_correct

    cfg = load_config(world.name, world.deployments)
    parent = _parent(world)
    records = _records(world, 0, 3)
    before = C.logits(parent.model, parent.tokenizer)
    run = patch_night(cfg, parent, records)
    fixed = [r for r in records if r.id in {a.id for a in run.applied}]
    assert fixed
    assert torch.equal(C.logits(parent.model, parent.tokenizer), before)
    # the parent still makes tonight's mistakes; the candidate on disk does not
    assert not any(served_correct(parent.model, parent.tokenizer, [r.input for r in fixed], [r.correction for r in fixed]))
