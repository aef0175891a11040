"""Verified stream scan per row codec: the scorer's read path (preadv, checksums, decode into
float32) over synthetic rows, one torch thread, best of 3 rounds interleaved across codecs.

    python bench/codec_scan.py [--rows 40000] [--layers 15] [--k 16] [--out bench/results/codec_scan.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import logra_dist as ld  # noqa: E402
from logra_dist.core.projection import LayerSpec  # noqa: E402
from logra_dist.index.stream import ChunkStream  # noqa: E402
from logra_dist.index.writer import write_index  # noqa: E402

CODECS = ("float16", "int8", "int4", "sign")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40000)
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--out", default="bench/results/codec_scan.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    specs = [LayerSpec(f"l{i}", "linear", 64, 64, args.k, args.k) for i in range(args.layers)]
    width = sum(s.width for s in specs)
    rows = torch.randn(args.rows, width, generator=torch.Generator().manual_seed(0))
    seconds: dict[str, list[float]] = {c: [] for c in CODECS}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in CODECS:
            cfg = ld.LoGraConfig(k_in=args.k, k_out=args.k, storage_dtype=codec, flush_rows=4096)
            blocks = [
                (torch.arange(s, min(args.rows, s + 8192)), rows[s : s + 8192]) for s in range(0, args.rows, 8192)
            ]
            write_index(Path(tmp) / codec, specs, cfg.to_json(), [blocks])
        for _ in range(3):
            for codec in CODECS:
                with ld.GradientStore(Path(tmp) / codec) as store:
                    t0 = time.perf_counter()
                    for _start, _ids, _rows, _side in ChunkStream(store, [(0, len(store))], 512):
                        pass
                    seconds[codec].append(time.perf_counter() - t0)
        sizes = {c: sum(p.stat().st_size for p in (Path(tmp) / c / "shards").glob("*.h5")) for c in CODECS}
    out = {
        "rows": args.rows,
        "D": width,
        "layers": args.layers,
        "command": f"python bench/codec_scan.py --rows {args.rows} --layers {args.layers} --k {args.k}",
        "codecs": {
            c: {
                "scan_seconds_best": min(seconds[c]),
                "rows_per_s": args.rows / min(seconds[c]),
                "scan_vs_float16": min(seconds[c]) / min(seconds["float16"]),
                "shard_bytes": sizes[c],
                "bytes_vs_float16": sizes[c] / sizes["float16"],
            }
            for c in CODECS
        },
    }
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True))
    for c, e in out["codecs"].items():
        print(
            f"{c:8s} scan {e['scan_seconds_best'] * 1e3:7.1f} ms ({e['scan_vs_float16']:.2f}x float16), "
            f"bytes {e['bytes_vs_float16']:.3f}x float16"
        )


if __name__ == "__main__":
    main()
