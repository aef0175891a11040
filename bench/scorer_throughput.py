"""Scorer throughput streaming from HDF5 shards vs a plain in-memory torch.matmul of the same shapes.

    PYTHONPATH=. python bench/scorer_throughput.py --rows 100000 --queries 256 --out /tmp/bench-scorer

Builds a synthetic index (`--layers` layers of k_in x k_out = 16 x 16, so D = 256 x layers;
float16 storage, --shards files, raw projected Fisher) unless it already exists, then measures,
in one process on this machine:
  matmul_s        q @ R.T with R (rows x D) float32 already in memory (one call)
  matmul_chunked_s the same GEMM in chunks of --chunk-rows (the scorer's block shape)
  read_s          streaming every row from the shards as float32 (the scorer's ChunkStream)
  dot_s           Scorer(mode=dot).topk(k): read + GEMM + running top-k
  relatif_cold_s  Scorer(mode=relatif).topk(k) computing and caching the self-influence
  relatif_warm_s  the same with the cache in place
Throughputs are (train x query) pairs per second; ratios are matmul_s / x_s (1.0 = as fast as
the in-memory GEMM). The page cache is warm (the index was just written or read). Each figure
is the best of --rounds interleaved rounds (the machine may be shared); prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from logra_dist import GradientStore, LoGraConfig, Scorer
from logra_dist.projection import LayerSpec
from logra_dist.statistics import Accumulator
from logra_dist.stream import ChunkStream
from logra_dist.store import layout_to_json, write_index, write_stats


def build_index(out: Path, rows: int, layers: int, shards: int, seed: int = 0) -> None:
    specs = [LayerSpec(f"model.layers.{i}.mlp", "linear", 64, 64, 16, 16) for i in range(layers)]
    cfg = LoGraConfig(k_in=16, k_out=16, storage_dtype="float16", hessian="raw")
    width = sum(s.width for s in specs)
    gen = torch.Generator().manual_seed(seed)
    acc = Accumulator(specs, "raw", torch.float64)
    per_shard = [len(a) for a in np.array_split(np.arange(rows), shards)]
    starts = np.cumsum([0] + per_shard)

    def blocks(r: int):
        for s in range(0, per_shard[r], 8192):
            b = min(8192, per_shard[r] - s)
            block = torch.randn(b, width, generator=gen) * torch.linspace(0.2, 2.0, width)
            if r == 0 and s == 0:
                acc.update_rows(block.double())  # statistics from a sample: enough for timing
            yield torch.arange(starts[r] + s, starts[r] + s + b), block

    cfg.flush_rows = 4096
    write_index(out, specs, cfg.to_json(), [blocks(r) for r in range(shards)])
    pre = acc.preconditioner(cfg.damping)
    write_stats(out / "stats.h5", "raw", cfg.damping, pre.state(),
                {"samples": acc.samples, "layout": layout_to_json(specs), "config": cfg.to_json()})

def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def peak_only(out: Path, args: argparse.Namespace) -> None:
    d = GradientStore(out).width
    q = torch.randn(args.queries, d, generator=torch.Generator().manual_seed(1))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = {}
    for mode in ("dot", "relatif", "relatif"):
        sc = Scorer(None, out, mode=mode, chunk_rows=args.chunk_rows)
        sc.add_query_gradients(q.numpy(), np.arange(args.queries))
        times.setdefault(mode, []).append(timed(lambda: sc.topk(args.k))[0])
        sc.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": len(GradientStore(out)), "width": d, "queries": args.queries,
                      "chunk_rows": args.chunk_rows, "peak_rss_mb": peak / 1024,
                      "rss_before_scoring_mb": base / 1024, "times_s": times}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--out", default="/tmp/logra-bench-scorer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--scorer-only", action="store_true",
                    help="only run the scorer (dot, then relatif) and report this process's peak RSS: "
                         "compare indexes of different sizes to see memory independent of N")
    args = ap.parse_args()
    out = Path(args.out)
    if args.rebuild and out.exists():
        shutil.rmtree(out)
    t_build = None
    if not (out / "manifest.json").exists():
        t_build, _ = timed(lambda: build_index(out, args.rows, args.layers, args.shards))
    (out / "selfinf.h5").unlink(missing_ok=True)
    if args.scorer_only:
        peak_only(out, args)
        return

    store = GradientStore(out)
    n, d = len(store), store.width
    q = torch.randn(args.queries, d, generator=torch.Generator().manual_seed(1))
    pairs = n * args.queries
    rows = torch.from_numpy(store.read(0, n))  # float32, in memory, for the baselines

    def read_all() -> int:  # what the scorer streams: stored dtype -> float32, in a thread
        return sum(len(ids) for _, ids, _, _ in ChunkStream(store, [(0, n)], args.chunk_rows))

    def raw_read() -> int:  # the floor: the shard files' bytes, sequentially, no decoding
        total = 0
        for info in store.shards:
            with open(info.path, "rb", buffering=0) as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
        return total

    def score(mode: str) -> float:
        sc = Scorer(None, out, mode=mode, chunk_rows=args.chunk_rows)
        sc.add_query_gradients(q.numpy(), np.arange(args.queries))
        t, _ = timed(lambda: sc.topk(args.k))
        sc.close()
        return t

    # The machine may be shared: every figure is the best of --rounds interleaved rounds.
    t_cold = score("relatif")  # computes and caches the self-influence
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, fn in [("matmul", lambda: q @ rows.T),
                         ("matmul_chunked", lambda: [q @ rows[s:s + args.chunk_rows].T
                                                     for s in range(0, n, args.chunk_rows)]),
                         ("read", read_all), ("raw_read", raw_read), ("dot", lambda: score("dot")), ("relatif_warm", lambda: score("relatif"))]:
            t, value = timed(fn)
            times.setdefault(name, []).append(value if name in ("dot", "relatif_warm") else t)
    best = {k: min(v) for k, v in times.items()}
    t_mm, t_mm_chunked, t_read, t_dot, t_warm = (best[k] for k in ("matmul", "matmul_chunked", "read", "dot",
                                                                    "relatif_warm"))
    result = {
        "rows": n, "width": d, "queries": args.queries, "k": args.k, "chunk_rows": args.chunk_rows,
        "storage_dtype": store.storage_dtype, "shards": len(store.shards), "index_bytes": n * d * 2,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "build_s": t_build,
        "matmul_s": t_mm, "matmul_chunked_s": t_mm_chunked, "read_s": t_read,
        "dot_s": t_dot, "relatif_cold_s": t_cold, "relatif_warm_s": t_warm,
        "all_times_s": times, "load_average": os.getloadavg(),
        "read_gb_per_s_stored": n * d * 2 / t_read / 1e9,
        "pairs_per_s": {"matmul": pairs / t_mm, "dot": pairs / t_dot, "relatif_cold": pairs / t_cold,
                        "relatif_warm": pairs / t_warm},
        "ratio_to_matmul": {"matmul_chunked": t_mm / t_mm_chunked, "dot": t_mm / t_dot,
                            "relatif_cold": t_mm / t_cold, "relatif_warm": t_mm / t_warm},
        # load changes over seconds: the ratio within each round (measured back to back) is steadier
        "ratio_to_matmul_median_of_rounds": {
            name: float(np.median([m / x for m, x in zip(times["matmul"], times[name])]))
            for name in ("matmul_chunked", "read", "dot", "relatif_warm")},
        # the scorer's read path (decode + widen to float32 into reused buffers) vs a raw file read
        "read_rate_vs_raw_read_median_of_rounds": float(np.median(
            [r / x for r, x in zip(times["raw_read"], times["read"])])),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
