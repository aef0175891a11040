"""Score an index with precomputed query gradients (a query index) and print the top-k and the
self-influence as JSON; run as a subprocess by the cache placement tests, optionally under a
file-size limit (a full disk) or inside a read-only bind mount of the index.

    python tests/faults/score_worker.py INDEX QUERY_INDEX [--cache-dir DIR] [--no-cache] [--fsize BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), HERE]

import hooks  # noqa: E402

import logra_dist as ld  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("index")
    p.add_argument("query_index")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--fsize", type=int, default=0)
    args = p.parse_args()
    if args.fsize:
        hooks.install(f"fsize:{args.fsize}")
    sc = ld.Scorer(None, args.index, mode="relatif", cache_self_influence=not args.no_cache, cache_dir=args.cache_dir)
    sc.add_query_gradients(args.query_index)
    res = sc.topk(5)
    selfinf = sc.train_self_influence()
    sc.close()
    print(json.dumps({"ids": res.train_ids.tolist(), "scores": res.scores.tolist(), "selfinf": selfinf.tolist()}))
