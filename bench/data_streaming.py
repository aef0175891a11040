"""The streaming data path on a large jsonl (no model): pass 1 (every record read, this rank's
documents tokenized and digested: `RankShare.plan`) and pass 2 (the samples fed to the logger),
with the peak RSS before and after. Makes the corpus if it does not exist.

    nice -n 10 python bench/data_streaming.py /tmp/docs100k.jsonl --documents 100000 --world 1
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

from logra_dist.data import DataSpec, RankShare
from logra_dist.embedded.tokenizer import build_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "data",
    "model",
    "gradient",
    "influence",
    "score",
    "training",
    "sample",
    "token",
    "layer",
    "rank",
    "shard",
    "index",
]


def make_corpus(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--documents", type=int, default=100_000)
    p.add_argument("--world", type=int, default=1, help="measure rank 0 of this many")
    p.add_argument("--max-samples", type=int, default=None)
    args = p.parse_args()
    if not args.path.exists():
        make_corpus(args.path, args.documents)

    def rss_mb() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

    before = rss_mb()
    share = RankShare(DataSpec([str(args.path)], 128, args.max_samples), build_tokenizer(), 0, args.world, None)
    start = time.perf_counter()
    plan = share.plan()
    first = time.perf_counter() - start
    start = time.perf_counter()
    n = sum(1 for _ in share.samples())
    second = time.perf_counter() - start
    print(
        json.dumps(
            {
                "documents": plan.documents,
                "world": args.world,
                "rank0_samples": n,
                "pass1_s": round(first, 2),
                "pass2_s": round(second, 2),
                "peak_rss_mb_before": before,
                "peak_rss_mb_after": rss_mb(),
            }
        )
    )


if __name__ == "__main__":
    main()
