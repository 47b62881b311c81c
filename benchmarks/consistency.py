"""The base model's own consistency across wordings, per kind of wording: what GR per kind is read
against.

    python -m benchmarks.consistency --task qa --threads 2 --out benchmarks/results/consistency-qa-d0.json

Of the facts in no edit stream (fact-check: the test claims; QA: the locality pool) that the base
model gets right in their main wording, the share it also gets right in each other wording, judged
as the SME benchmark judges (``--judge``, served by default). A wording in which the model does not
answer even the facts it knows is one an edit can hardly be expected to carry over to: the GR of
that kind is read against this share (``benchmarks/README.md``, table ``gr-kinds``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import JUDGES, Judge, wording_consistency
from benchmarks.report import write_json
from benchmarks.sme import machine_info


def main(argv: list[str] | None = None) -> int:
    from benchmarks.setups import factcheck_task, qa_task

    ap = argparse.ArgumentParser(description="The base model's consistency across wordings, per kind.")
    ap.add_argument("--task", choices=("fact-check", "qa"), required=True)
    ap.add_argument("--data-seed", type=int, default=0, help="data split (and fact-check base model) seed")
    ap.add_argument("--judge", choices=JUDGES, default="served")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--cache-dir", type=Path, default=Path("benchmarks/cache"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    task = factcheck_task(args.cache_dir, args.data_seed) if args.task == "fact-check" else qa_task(args.cache_dir, args.data_seed)
    result = {"benchmark": "consistency", "task": task.name, "data_seed": args.data_seed, "judge": args.judge,
              **wording_consistency(task, Judge(args.judge)), "machine": machine_info(),
              "command": "python -m benchmarks.consistency " + " ".join(argv if argv is not None else sys.argv[1:]),
              "wall_seconds": time.perf_counter() - t0}
    write_json(result, args.out)
    print(f"{task.name}: the base gets {result['main_correct']:,} of {result['items']:,} facts right in their main wording; "
          "of those, right in each other wording:")
    for kind, v in result["by_kind"].items():
        print(f"  {v['rate']:.3f} ({v['correct']:,} of {v['total']:,})  {kind}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
