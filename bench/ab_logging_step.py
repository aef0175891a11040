"""Before/after: the logging step time of two checkouts of logra_dist, interleaved in one run.

    git worktree add /tmp/base <commit>
    PYTHONPATH=. python bench/ab_logging_step.py /tmp/base . --rounds 4

Each round runs one fresh process per checkout (alternating, so drift hits both): the 25M bench
model logs padded batches (4 x 128 tokens, half the samples with their last 32 tokens padded and
labelled -100, so every per-batch check of the capture runs), raw Fisher, k = 16, one thread;
16 timed steps after one warm-up. Prints per checkout the median step of each round, the median
of those medians and the best step, and their ratios (second / first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(root: str, steps: int) -> dict:
    sys.path[:0] = [root, str(Path(root) / "bench")]
    import torch

    torch.set_num_threads(1)
    from common import log_step_fn, make_bench

    import logra_dist

    if not str(Path(logra_dist.__file__).resolve()).startswith(str(Path(root).resolve())):
        raise SystemExit(f"imported {logra_dist.__file__}, not the checkout {root}")
    bench = make_bench("large", 4, 128)
    for b in bench.batches:
        b.attention_mask[::2, -32:] = 0
        b.labels[::2, -32:] = -100
    cfg = logra_dist.LoGraConfig(k_in=16, k_out=16, hessian="raw", flush_rows=16)
    step = log_step_fn(logra_dist.attach(bench.model, cfg, Path(tempfile.mkdtemp(prefix="logra-ab-")) / "idx"))
    step(bench.batches[0])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(bench.batches[i % len(bench.batches)])
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("first")
    ap.add_argument("second")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": "", "WANDB_MODE": "disabled"}
    runs: dict[str, list[dict]] = {args.first: [], args.second: []}
    for _ in range(args.rounds):
        for root in (args.first, args.second):
            cmd = [sys.executable, __file__, "--worker", str(Path(root).resolve()), str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=True)
            runs[root].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {
        root: {
            "round_medians_s": [r["median"] for r in rs],
            "median_s": statistics.median(r["median"] for r in rs),
            "best_s": min(r["min"] for r in rs),
        }
        for root, rs in runs.items()
    }
    a, b = summary[args.first], summary[args.second]
    print(
        json.dumps(
            {
                "command": "PYTHONPATH=. python bench/ab_logging_step.py " + " ".join(sys.argv[1:]),
                "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "loadavg": os.getloadavg(),
                "checkouts": summary,
                "second_vs_first": {"median": b["median_s"] / a["median_s"], "best": b["best_s"] / a["best_s"]},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))), flush=True)
        os._exit(0)
    else:
        main()
