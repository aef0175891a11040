"""Verified stream scan per row codec: the scorer's read path (preadv, checksums, decode into
float32) over synthetic rows, one torch thread, every codec timed in each round (the order
rotated round to round), best and median of the rounds; then one instrumented pass per codec
that says where the time goes (read, checksum, decode: widening and, for the quantized codecs,
the per-block scale multiply).

`int8-contiguous` is int8 read as before the padded pieces (records back to back in a piece,
checksummed through a padded copy): the same run's A/B of that change. `--score-queries Q...`
also times `Scorer.topk(10)` end to end (dot, Q precomputed query rows, the stream in its
thread beside the GEMM), every codec in each round, for each Q.

    python bench/codec_scan.py [--rows 40000] [--layers 15] [--k 16] [--rounds 7] [--score-queries 8 64]
        [--out bench/results/codec_scan.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import logra_dist as ld  # noqa: E402
from logra_dist.core.projection import LayerSpec  # noqa: E402
from logra_dist.index import codecs, stream  # noqa: E402
from logra_dist.index.format import stats_attrs, write_stats  # noqa: E402
from logra_dist.index.stream import ChunkStream  # noqa: E402
from logra_dist.index.writer import write_index  # noqa: E402

CODECS = ("float32", "float16", "bfloat16", "int8", "int4", "sign")
VARIANTS = (*CODECS, "int8-contiguous")


@contextmanager
def _variant(name: str):
    """int8-contiguous: the stream without padded pieces (PADDED_ROW_MIN_BYTES above any row)."""
    saved = stream.PADDED_ROW_MIN_BYTES
    if name == "int8-contiguous":
        stream.PADDED_ROW_MIN_BYTES = 1 << 62
    try:
        yield
    finally:
        stream.PADDED_ROW_MIN_BYTES = saved


def _scan(index: Path, name: str) -> float:
    with _variant(name), ld.GradientStore(index) as store:
        t0 = time.perf_counter()
        for _start, _ids, _rows, _side in ChunkStream(store, [(0, len(store))], 512):
            pass
        return time.perf_counter() - t0


@contextmanager
def _timed(spent: dict[str, float]):
    """Wrap the stream's steps to add their seconds to `spent` (the profile pass only)."""
    wraps = [
        (stream._Source, "read", "read"),
        (stream._Source, "read_rows", "read"),
        (stream, "row_checksums", "checksum"),
        (codecs.RowCodec, "decode", "decode"),
        (codecs.BlockQuantized, "decode", "decode"),
        (codecs.Int8Codec, "_dequantize_into", "decode: codes to float"),
        (codecs.Int4Codec, "_dequantize_into", "decode: codes to float"),
        (codecs.SignCodec, "_dequantize_into", "decode: codes to float"),
    ]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in wraps]

    def wrap(f, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

        return timed

    for owner, attr, key in wraps:
        setattr(owner, attr, wrap(owner.__dict__[attr], key))
    try:
        yield
    finally:
        for owner, attr, f in saved:
            setattr(owner, attr, f)


def _score_rounds(index: dict[str, Path], queries: list[int], rounds: int, width: int) -> dict:
    """Scorer.topk(10) seconds per codec and query count, interleaved like the scan rounds."""
    out: dict = {}
    gen = torch.Generator().manual_seed(1)
    for nq in queries:
        q = torch.randn(nq, width, generator=gen)
        scorers = {c: ld.Scorer(None, index[c], mode="dot") for c in CODECS}
        for sc in scorers.values():
            sc.add_query_gradients(q, torch.arange(nq))
            sc.topk(10)  # warm
        seconds: dict[str, list[float]] = {c: [] for c in CODECS}
        for r in range(rounds):
            for c in CODECS[r % len(CODECS) :] + CODECS[: r % len(CODECS)]:
                t0 = time.perf_counter()
                scorers[c].topk(10)
                seconds[c].append(time.perf_counter() - t0)
        for sc in scorers.values():
            sc.close()
        m16 = statistics.median(seconds["float16"])
        out[str(nq)] = {
            c: {
                "topk_seconds_best": min(v),
                "topk_seconds_median": statistics.median(v),
                "topk_vs_float16_median": statistics.median(v) / m16,
                "topk_vs_float16_best": min(v) / min(seconds["float16"]),
            }
            for c, v in seconds.items()
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--score-queries", type=int, nargs="*", default=[], help="also time Scorer.topk per codec")
    ap.add_argument("--out", default="bench/results/codec_scan.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    specs = [LayerSpec(f"l{i}", "linear", 64, 64, args.k, args.k) for i in range(args.layers)]
    width = sum(s.width for s in specs)
    rows = torch.randn(args.rows, width, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    profile: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in CODECS:
            cfg = ld.LoGraConfig(k_in=args.k, k_out=args.k, storage_dtype=codec, flush_rows=4096, hessian="none")
            blocks = [
                (torch.arange(s, min(args.rows, s + 8192)), rows[s : s + 8192]) for s in range(0, args.rows, 8192)
            ]
            manifest = write_index(Path(tmp) / codec, specs, cfg.to_json(), [blocks])
            write_stats(Path(tmp) / codec / "stats.h5", "none", 1.0, {}, stats_attrs(manifest, args.rows))
        index = {v: Path(tmp) / v.split("-")[0] for v in VARIANTS}
        for v in VARIANTS:  # warm: page cache and first-use costs out of the timed rounds
            _scan(index[v], v)
        for r in range(args.rounds):
            for v in VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]:
                seconds[v].append(_scan(index[v], v))
        for v in VARIANTS:
            spent: dict[str, float] = {}
            with _timed(spent):
                spent["total (instrumented)"] = _scan(index[v], v)
            profile[v] = {k: round(s, 4) for k, s in sorted(spent.items())}
        scoring = _score_rounds(index, args.score_queries, args.rounds, width) if args.score_queries else {}
        sizes = {c: sum(p.stat().st_size for p in (Path(tmp) / c / "shards").glob("*.h5")) for c in CODECS}
    load_after = os.getloadavg()
    best16, med16 = min(seconds["float16"]), statistics.median(seconds["float16"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit.stdout.strip() or None,
        "command": f"python bench/codec_scan.py --rows {args.rows} --layers {args.layers} --k {args.k} "
        f"--rounds {args.rounds}"
        + "".join(f" --score-queries {' '.join(map(str, args.score_queries))}" * any(args.score_queries)),
        "what_ran": "one process, torch.set_num_threads(1); per round every variant scans the whole index once "
        "through ChunkStream (512-row chunks, verified, decoded to float32), order rotated per round; "
        "profile: one more scan per variant with its steps timed (read/checksum/decode overlap nothing: "
        "they run in the stream's thread; the rest is ids, queues, the consumer)",
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpus": os.cpu_count(),
        "rows": args.rows,
        "D": width,
        "layers": args.layers,
        "rounds": args.rounds,
        "codecs": {
            v: {
                "scan_seconds_best": min(seconds[v]),
                "scan_seconds_median": statistics.median(seconds[v]),
                "scan_seconds_all": [round(s, 4) for s in seconds[v]],
                "rows_per_s_best": args.rows / min(seconds[v]),
                "scan_vs_float16_best": min(seconds[v]) / best16,
                "scan_vs_float16_median": statistics.median(seconds[v]) / med16,
                "shard_bytes": sizes[v.split("-")[0]],
                "bytes_vs_float16": sizes[v.split("-")[0]] / sizes["float16"],
                "profile_seconds": profile[v],
            }
            for v in VARIANTS
        },
        "scoring_topk10_dot_by_queries": scoring,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    for v, e in out["codecs"].items():
        print(
            f"{v:16s} scan best {e['scan_seconds_best'] * 1e3:7.1f} ms ({e['scan_vs_float16_best']:.2f}x float16), "
            f"median {e['scan_seconds_median'] * 1e3:7.1f} ms ({e['scan_vs_float16_median']:.2f}x), "
            f"bytes {e['bytes_vs_float16']:.3f}x  profile {e['profile_seconds']}"
        )
    for nq, per in scoring.items():
        print(
            f"topk(10) with {nq} queries, median vs float16: "
            + ", ".join(
                f"{c} {e['topk_vs_float16_median']:.2f}x ({e['topk_seconds_median'] * 1e3:.0f} ms)"
                for c, e in per.items()
            )
        )
    print(f"load average before {out['loadavg_before']}, after {out['loadavg_after']}")


if __name__ == "__main__":
    main()
