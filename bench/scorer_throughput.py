"""Scorer throughput streaming from HDF5 shards vs a plain in-memory torch.matmul of the same shapes.

    PYTHONPATH=. python bench/scorer_throughput.py --rows 100000 --queries 256 --out /tmp/bench-scorer

Builds a synthetic index (`--layers` layers of k_in x k_out = 16 x 16, so D = 256 x layers;
float16 storage, --shards files, raw projected Fisher) unless it already exists, then measures,
in one process on this machine (--threads torch threads; the stream reads in one more thread):
  matmul          q @ R.T with R (rows x D) float32 already in memory (one call)
  matmul_chunked  the same GEMM in chunks of --chunk-rows (the scorer's block shape)
  raw_read        the shard files' bytes, read sequentially in 16 MiB pieces, nothing else
  raw_readinto    the same into one reused 1 MiB buffer (faster here: the strictest floor)
  read_io         the scorer's stream (ChunkStream, decode=False): every row's stored bytes off
                  the files into memory, checked against the block checksums, in its thread
  read            the same plus the widening to float32 the scorer scores on (decode=True)
  dot             Scorer(mode=dot).topk(k): read + GEMM + running top-k, end to end
  dot_split       the same with block_bytes set so the queries take --query-chunks query chunks
  relatif_cold    Scorer(mode=relatif).topk(k) computing and caching the self-influence (once)
  relatif_warm    the same with the cache in place
Throughputs are (train x query) pairs per second. Every figure is the median over --rounds
rounds (order rotated each round) of a rate ratio measured within the round: matmul / x for
the GEMM rate (1.0 = as fast as the in-memory GEMM; also against matmul_chunked, the
scorer's own shapes), raw_read and raw_readinto / x for the read rates. The page
cache is warm (the index was just written or read). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from logra_dist import GradientStore, LoGraConfig, Scorer
from logra_dist.core.curvature import CURVATURES
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import stats_attrs, write_stats
from logra_dist.index.stream import ChunkStream
from logra_dist.index.writer import write_index


def build_index(out: Path, rows: int, layers: int, shards: int, seed: int = 0) -> None:
    specs = [LayerSpec(f"model.layers.{i}.mlp", "linear", 64, 64, 16, 16) for i in range(layers)]
    cfg = LoGraConfig(k_in=16, k_out=16, storage_dtype="float16", hessian="raw")
    width = sum(s.width for s in specs)
    gen = torch.Generator().manual_seed(seed)
    acc = CURVATURES.get("raw")(specs, torch.float64)
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
    manifest = write_index(out, specs, cfg.to_json(), [blocks(r) for r in range(shards)])
    pre = acc.preconditioner(cfg.damping)
    write_stats(
        out / "stats.h5",
        "raw",
        cfg.damping,
        pre.state(),
        stats_attrs(manifest, acc.samples),
    )


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
    print(
        json.dumps(
            {
                "rows": len(GradientStore(out)),
                "width": d,
                "queries": args.queries,
                "chunk_rows": args.chunk_rows,
                "peak_rss_mb": peak / 1024,
                "rss_before_scoring_mb": base / 1024,
                "times_s": times,
            },
            indent=2,
        )
    )


def rate_ratio(times: dict[str, list[float]], ref: str, name: str) -> dict[str, float]:
    """time[ref] / time[name] per round (higher = faster): median, spread, fastest rounds."""
    per_round = [r / x for r, x in zip(times[ref], times[name])]
    return {
        "ratio": float(np.median(per_round)),
        "min": min(per_round),
        "max": max(per_round),
        "ratio_of_mins": min(times[ref]) / min(times[name]),
        "rounds": len(per_round),
        "vs": ref,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument(
        "--chunk-rows",
        type=int,
        default=inspect.signature(Scorer).parameters["chunk_rows"].default,
        help="training rows per streamed chunk (default: the Scorer's)",
    )
    ap.add_argument(
        "--query-chunks",
        type=int,
        default=4,
        help="dot_split: block_bytes set so the queries take this many query chunks",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--out", default="/tmp/logra-bench-scorer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument(
        "--scorer-only",
        action="store_true",
        help="only run the scorer (dot, then relatif) and report this process's peak RSS: "
        "compare indexes of different sizes to see memory independent of N",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    stored_bytes = n * store.codec.bytes_per_row(d)  # the rows as stored, headers excluded

    def stream(decode: bool) -> int:  # what the scorer streams, in its reader thread
        return sum(len(ids) for _, ids, _, _ in ChunkStream(store, [(0, n)], args.chunk_rows, decode=decode))

    def raw_read() -> int:  # a floor: the shard files' bytes, sequentially, no decoding
        total = 0
        for info in store.shards:
            with open(info.path, "rb", buffering=0) as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
        return total

    def raw_readinto() -> int:  # the fastest floor found here: one reused 1 MiB buffer (stays in cache)
        total, buf = 0, bytearray(1 << 20)
        for info in store.shards:
            with open(info.path, "rb", buffering=0) as f:
                while got := f.readinto(buf):
                    total += got
        return total

    # one query chunk per `per_query` bytes (Scorer._query_chunk with one layer-group atom)
    per_query = args.chunk_rows * 4 * 4
    split_bytes = per_query * -(-args.queries // args.query_chunks)
    query_chunks = {}

    def score(mode: str, block_bytes: int = 256 << 20) -> float:
        sc = Scorer(None, out, mode=mode, chunk_rows=args.chunk_rows, block_bytes=block_bytes)
        sc.add_query_gradients(q.numpy(), np.arange(args.queries))
        query_chunks[block_bytes] = -(-args.queries // sc._query_chunk(args.queries, 1))
        t, _ = timed(lambda: sc.topk(args.k))
        sc.close()
        return t

    t_cold = score("relatif")  # computes and caches the self-influence
    steps = {
        "matmul": lambda: q @ rows.T,
        "matmul_chunked": lambda: [q @ rows[s : s + args.chunk_rows].T for s in range(0, n, args.chunk_rows)],
        "raw_read": raw_read,
        "raw_readinto": raw_readinto,
        "read_io": lambda: stream(False),
        "read": lambda: stream(True),
        "dot": lambda: score("dot"),
        "dot_split": lambda: score("dot", split_bytes),
        "relatif_warm": lambda: score("relatif"),
    }
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    load = [os.getloadavg()]
    for r in range(args.rounds):  # the machine may be shared: order rotated, ratios within a round
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t, value = timed(steps[name])
            times[name].append(value if name in ("dot", "dot_split", "relatif_warm") else t)
        load.append(os.getloadavg())
    best = {k: min(v) for k, v in times.items()}
    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "rows": n,
        "width": d,
        "queries": args.queries,
        "k": args.k,
        "chunk_rows": args.chunk_rows,
        "storage_dtype": store.storage_dtype,
        "shards": len(store.shards),
        "index_bytes": stored_bytes,
        "query_chunks": {"dot": query_chunks[256 << 20], "dot_split": query_chunks[split_bytes]},
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "build_s": t_build,
        "relatif_cold_s": t_cold,
        "best_s": best,
        "median_s": med,
        "all_times_s": times,
        "load_average": load,
        "pairs_per_s_median": {k: pairs / med[k] for k in ("matmul", "dot", "dot_split", "relatif_warm")},
        "read_gb_per_s_stored_median": {
            k: stored_bytes / med[k] / 1e9 for k in ("raw_read", "raw_readinto", "read_io", "read")
        },
        # the figures: rate ratios within each round, medians over rounds
        "gemm_rate_vs_matmul": {
            k: rate_ratio(times, "matmul", k) for k in ("matmul_chunked", "dot", "dot_split", "relatif_warm")
        },
        # the scorer's own GEMM shapes (chunk_rows rows per call), often faster than one big call
        "gemm_rate_vs_matmul_chunked": {
            k: rate_ratio(times, "matmul_chunked", k) for k in ("dot", "dot_split", "relatif_warm")
        },
        "read_rate_vs_raw_read": {k: rate_ratio(times, "raw_read", k) for k in ("read_io", "read")},
        "read_rate_vs_raw_readinto": {k: rate_ratio(times, "raw_readinto", k) for k in ("read_io", "read")},
        "read_includes": {
            "read_io": "preadv of every row's stored bytes into the stream's reused buffers + "
            "block checksum verification, in the reader thread",
            "read": "read_io + widening to float32 (the rows the GEMM consumes)",
            "raw_read": "open + read(16 MiB) of the whole shard files (headers included), no verification, no decoding",
            "raw_readinto": "the same with readinto() a reused 1 MiB buffer: the fastest plain "
            "read measured here (the destination stays in cache)",
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
