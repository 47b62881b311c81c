"""Why a patched classifier breaks held-out items it used to get right, neuron by neuron.

A patch neuron changes an input's output in one of two ways: it *fires* (pre-activation z > 0,
or above ``clip_threshold`` for clipped neurons) and adds up to its full value, or it stays below
0 and, GELU or SiLU being negative there, adds a small multiple of minus its value (GELU reaches
-0.17 at z = -0.75 and is still -0.004 at z = -3), which pushes towards the other label. For each held-out item the base got right and the patched
model gets wrong, this takes the patch neurons out of the model, a group at a time, and judges
the item again:

- ``firing``: some neuron fires on it, and without the firing ones it is right again;
- ``below_zero_one``: none fires, and without the one with the highest z it is right again (one
  neuron's negative lobe);
- ``below_zero_many``: none fires, and only without all of them is it right again (many small
  contributions adding up);
- ``other``: none of those gives the base answer back.

Each broken item also records the edit whose neuron has the highest z on it, and whether the item
is one of that edit's hard neighbours as the task lists them (fact-check: the opposite claim about
the same city, then up to 20 claims naming or really in the same country). Classifiers only:
their query is read at one position per input.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from patcher import Editor

CAUSES = ("firing", "below_zero_one", "below_zero_many", "other")
Pair = tuple[str, object]


def _preactivations(editor: Editor, texts: list[str]) -> torch.Tensor:
    """(len(texts), neurons): every patch neuron's z on each text's query (fp32); for gated FFNs the
    gate's z, the one whose activation can be negative."""
    ffn = editor.ffn
    q = editor._text_queries(texts, 32)
    return q @ ffn.ins[0].extra_weight.float().T + ffn.ins[0].extra_bias.float()


def broken_causes(editor: Editor, correct: Callable[[Pair], bool], pairs: Sequence[Pair],
                  before: Sequence[bool], after: Sequence[bool],
                  neighbours: Callable[[str], Sequence[Pair]] = lambda edit_id: ()) -> dict:
    """The cause of each item right ``before`` and wrong ``after`` (the editor's model as it is now);
    ``correct`` judges one (input, target) pair on that model; ``neighbours(edit_id)``: the items
    the task counts as that edit's hard neighbours. The model is left as it was."""
    if editor.task != "classification":
        raise ValueError("broken_causes reads one query per input: classifiers only")
    broken = [i for i, (b, a) in enumerate(zip(before, after)) if b and not a]
    ffn = editor.ffn
    owners = [b.edit_id for b in ffn.blocks for _ in range(b.neurons)]
    counts = dict.fromkeys(CAUSES, 0)
    rows: list[dict] = []
    if not broken or not owners:
        return {"broken": len(broken), "counts": counts, "top_edit_neighbour": 0, "items": rows}
    values = ffn.out.extra_weight

    def right_with(i: int, keep: torch.Tensor) -> bool:
        ffn.out.extra_weight = values * keep[:, None].to(values.dtype)
        try:
            return bool(correct(pairs[i]))
        finally:
            ffn.out.extra_weight = values

    z_all = _preactivations(editor, [pairs[i][0] for i in broken])
    threshold = ffn.clip_threshold if ffn.clip else 0.0  # clipped neurons pass nothing at or below it
    for i, z in zip(broken, z_all):
        firing = z > threshold
        top = int(z.argmax())
        if bool(firing.any()):
            cause = "firing" if right_with(i, ~firing) else "other"
        else:
            only_top = torch.zeros_like(firing)
            only_top[top] = True
            if right_with(i, ~only_top):
                cause = "below_zero_one"
            else:
                cause = "below_zero_many" if right_with(i, firing) else "other"
        counts[cause] += 1
        rows.append({"index": i, "cause": cause, "firing": int(firing.sum()), "z_max": round(float(z[top]), 3),
                     "within_3_of_zero": int((z > -3).sum()), "top_edit": owners[top],
                     "top_edit_neighbour": tuple(pairs[i]) in set(map(tuple, neighbours(owners[top])))})
    return {"broken": len(broken), "counts": counts,
            "top_edit_neighbour": sum(r["top_edit_neighbour"] for r in rows), "items": rows}
