"""The LM benchmark with 120 held-out queries instead of 40 (the plan's 40 plus the next 80 of the
same split; the training set and every retraining unchanged), for tighter confidence intervals of
issue 14's statements. Everything else is `python -m logra_dist.eval run --benchmark lm --peers`.

    PYTHONPATH=. python bench/lm_120_queries.py [--out bench/results/accuracy-120q]

Results: bench/results/accuracy/lm-120q.json (copied there from --out).
"""

from __future__ import annotations

import argparse
import dataclasses

from logra_dist.eval import runner
from logra_dist.eval.plans import plan_for
from logra_dist.eval.report import write_markdown
from logra_dist.eval.tasks import TaskSpec

QUERIES = 120


def plan_with_more_queries(benchmark, fast, peers=False, smaller=False):
    plan = plan_for(benchmark, fast, peers, smaller)
    spec = TaskSpec(plan.spec.name, {**plan.spec.params, "n_query_pool": QUERIES})
    note = f"{QUERIES} held-out queries (the plan's 40 and the next {QUERIES - 40} of the same split)"
    return dataclasses.replace(plan, spec=spec, lds_queries=QUERIES, notes=[*plan.notes, note])


if __name__ == "__main__":  # the retraining workers are spawned: they import this file
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/accuracy-120q")
    p.add_argument("--peer-python", default="bench/.bench-venv/bin/python")
    args = p.parse_args()
    runner.plan_for = plan_with_more_queries
    runner.run_benchmark(
        "lm",
        args.out,
        "bench/cache/accuracy",
        workers=2,
        command=f"PYTHONPATH=. python bench/lm_120_queries.py --out {args.out}",
        peer_python=args.peer_python,
    )
    write_markdown(args.out, f"{args.out}.md")
