"""CPU cost of `--bottomk` and `--groups` on top of a plain top-k scan (one process, one thread).

    PYTHONPATH=. nice -n 10 python bench/bottomk_overhead.py --rows 50000 --queries 256

Builds the synthetic index of bench/scorer_throughput.py (4 layers, D = 1024, float16, 2 shards)
unless it exists, then times Scorer(mode=dot).topk(10) with and without bottomk=10 and two layer
groups, as process CPU time (robust on a shared machine), the minimum over --rounds rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scorer_throughput import build_index

from logra_dist import Scorer

CASES = {
    "topk": {},
    "topk+bottomk": {"bottomk": 10},
    "topk+groups": {"groups": {"a": r"layers\.[01]\.", "b": r"layers\.[23]\."}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="/tmp/bench-bottomk")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if not (out / "manifest.json").exists():
        build_index(out, args.rows, 4, 2)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, options in CASES.items():
            sc = Scorer(None, out, mode="dot")
            width = sc.store.width
            sc.add_query_gradients(
                np.random.default_rng(0).standard_normal((args.queries, width)).astype(np.float32),
                np.arange(args.queries),
            )
            start = time.process_time()
            sc.topk(10, **options)
            times[name].append(time.process_time() - start)
            sc.close()
    best = {name: min(v) for name, v in times.items()}
    print(json.dumps({"cpu_s": best, "vs_topk": {n: best[n] / best["topk"] for n in best}}))


if __name__ == "__main__":
    main()
