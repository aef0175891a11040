"""Figure 7: bytes on disk per logged sample vs the payload D x itemsize.

An end-to-end Logger run on the embedded model (N samples, finalized) for float16 and bfloat16,
with hessian="none" and the default "raw"; the per-sample bytes of the finished index (every
file under shards/: the shard, and anything else left there) over N are compared with
D x itemsize (plus the 8-byte id every row carries, reported separately). stats.h5 (the global
curvature, per model, not per sample) and manifest.json are per-index costs, reported apart.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from common import copy_model, log_step_fn, make_bench
from logging_speed import logra_config

import logra_dist


def one(bench, k: int, dtype: str, hessian: str, n_batches: int, tmp: Path) -> dict[str, Any]:
    out_dir = tmp / f"{k}-{dtype}-{hessian}"
    lg = logra_dist.attach(copy_model(bench.model), logra_config("embedded", k, hessian, storage_dtype=dtype), out_dir)
    step = log_step_fn(lg)
    for batch in bench.batches[:n_batches]:
        step(batch)
    manifest = lg.finalize()
    n = manifest["total_rows"]
    files = {str(p.relative_to(out_dir)): p.stat().st_size for p in (out_dir / "shards").rglob("*") if p.is_file()}
    size = sum(files.values())
    item = 2
    payload = n * lg.width * item
    return {
        "k": k,
        "storage_dtype": dtype,
        "hessian": hessian,
        "samples": n,
        "D": lg.width,
        "shard_bytes": size,
        "shard_files": files,
        "bytes_per_sample": size / n,
        "payload_bytes_per_sample": lg.width * item,
        "ratio": size / payload,
        "ratio_without_ids": (size - 8 * n) / payload,
        "stats_h5_bytes": (out_dir / "stats.h5").stat().st_size,
        "manifest_bytes": (out_dir / "manifest.json").stat().st_size,
    }


def run(quick: bool) -> dict[str, Any]:
    n_batches = 32 if quick else 192  # x 8 samples: 1536 > flush_rows, so a commit point is inside
    bench = make_bench("embedded", 8, 128, n_batches=n_batches)
    out: dict[str, Any] = {"results": []}
    with tempfile.TemporaryDirectory(prefix="logra-storage-") as tmp:
        plan = [(16, "none"), (16, "raw")] + ([] if quick else [(64, "none")])  # k=64 raw: minutes of eigh
        for dtype in ("float16", "bfloat16"):
            for k, hessian in plan:
                out["results"].append(one(bench, k, dtype, hessian, n_batches, Path(tmp)))
    return out


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(1)
    print(json.dumps(run("--quick" in sys.argv), indent=1))
