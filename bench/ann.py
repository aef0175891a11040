"""ANN retrieval vs the exact scan: recall@k and time per query batch, for a few factories and C.

    PYTHONPATH=. python bench/ann.py --rows 100000 --layers 4 --queries 64 --out /tmp/bench-ann

Synthetic index (`build_index`): D = 256 x layers (16 x 16 per layer), float16 shards, raw
projected Fisher from the rows themselves. Rows are low rank with a decaying spectrum plus noise,
r = 64 directions with scales j^-0.7 and per-row norms log-normal (sigma 0.5): what projected
gradients look like (a few directions carry most of the energy, a long noisy tail, outliers in
norm). Queries are drawn from the same model. For each (mode, factory, sketch dim, C): build the
ANN files (timed once), then `Scorer.topk(k, ann=True, candidates=C)` against the exact
`Scorer.topk(k)`: recall@k (the share of the exact top-k ids found) and the median seconds of a
`--queries` batch over --rounds. Prints one JSON object (and writes it to --out/ann.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from logra_dist import LoGraConfig, Scorer
from logra_dist.core.curvature import CURVATURES
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import stats_attrs, write_stats
from logra_dist.index.writer import write_index
from logra_dist.scoring.ann import build_ann

RANK, DECAY, NORM_SIGMA = 64, 0.7, 0.5


def _model(width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    basis = np.linalg.qr(gen.standard_normal((width, RANK)))[0].T.astype(np.float32)  # (r, D)
    return basis, (np.arange(1, RANK + 1, dtype=np.float32) ** -DECAY)


def structured_rows(n: int, width: int, seed: int, gen: np.random.Generator) -> np.ndarray:
    basis, scale = _model(width, seed)
    z = gen.standard_normal((n, RANK), dtype=np.float32) * scale
    noise = gen.standard_normal((n, width), dtype=np.float32) * (0.3 / np.sqrt(width))
    rows = z @ basis + noise
    return rows * np.exp(NORM_SIGMA * gen.standard_normal((n, 1))).astype(np.float32)


def build_index(out: Path, rows: int, layers: int, shards: int, storage: str = "float16", seed: int = 0) -> int:
    """Write the synthetic index (with stats.h5); returns D."""
    specs = [LayerSpec(f"model.layers.{i}.mlp", "linear", 64, 64, 16, 16) for i in range(layers)]
    cfg = LoGraConfig(k_in=16, k_out=16, storage_dtype=storage, hessian="raw", flush_rows=4096)
    width = sum(s.width for s in specs)
    gen = np.random.default_rng(seed + 1)
    acc = CURVATURES.get("raw")(specs, torch.float64)
    per_shard = [len(a) for a in np.array_split(np.arange(rows), shards)]
    starts = np.cumsum([0] + per_shard)

    def blocks(r: int):
        for s in range(0, per_shard[r], 8192):
            b = min(8192, per_shard[r] - s)
            block = torch.from_numpy(structured_rows(b, width, seed, gen))
            acc.update_rows(block.double())
            yield torch.arange(starts[r] + s, starts[r] + s + b), block

    manifest = write_index(out, specs, cfg.to_json(), [blocks(r) for r in range(shards)])
    write_stats(
        out / "stats.h5",
        "raw",
        cfg.damping,
        acc.preconditioner(cfg.damping).state(),
        stats_attrs(manifest, acc.samples),
    )
    return width


def queries(n: int, width: int, seed: int = 0) -> np.ndarray:
    return structured_rows(n, width, seed, np.random.default_rng(seed + 99))


def recall(exact: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(exact, got)]))


def scored(index: Path, q: np.ndarray, mode: str, k: int, **kw) -> tuple[float, np.ndarray]:
    sc = Scorer(None, index, mode=mode)
    sc.add_query_gradients(q, np.arange(len(q)))
    t = time.perf_counter()
    res = sc.topk(k, **kw)
    took = time.perf_counter() - t
    sc.close()
    return took, res.train_ids


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    index = out / "index"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    width = build_index(index, args.rows, args.layers, args.shards) if not index.exists() else 256 * args.layers
    q = queries(args.queries, width)
    results = {"rows": args.rows, "D": width, "queries": args.queries, "k": args.k, "shards": args.shards, "runs": []}
    for mode in args.modes:
        scored(index, q, mode, args.k)  # warm: self-influence cache, page cache
        times, exact = zip(*[scored(index, q, mode, args.k) for _ in range(args.rounds)])
        results["runs"].append({"mode": mode, "method": "exact", "seconds": float(np.median(times))})
        for factory in args.factories:
            for dim in args.dims:
                t = time.perf_counter()
                build_ann(
                    index,
                    factory=factory,
                    dim=dim,
                    mode=mode,
                    search_params=args.search_params if "IVF" in factory else "",
                )
                build_s = time.perf_counter() - t
                for c in args.candidates:
                    runs = [scored(index, q, mode, args.k, ann=True, candidates=c) for _ in range(args.rounds)]
                    row = {
                        "mode": mode,
                        "method": factory,
                        "sketch_dim": dim,
                        "candidates": c,
                        "build_s": round(build_s, 2),
                        "seconds": float(np.median([r[0] for r in runs])),
                        "recall": recall(exact[0], runs[0][1]),
                    }
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
    (out / "ann.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["relatif"])
    p.add_argument("--factories", nargs="+", default=["Flat", "HNSW32", "IVF1024,Flat"])
    p.add_argument("--dims", nargs="+", type=int, default=[256])
    p.add_argument("--candidates", nargs="+", type=int, default=[100, 1000])
    p.add_argument("--search-params", default="nprobe=32", help="for IVF factories")
    p.add_argument("--out", default="/tmp/bench-ann")
    p.add_argument("--fresh", action="store_true")
    print(json.dumps(run(p.parse_args()), indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
