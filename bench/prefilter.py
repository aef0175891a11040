"""The exact scan with and without the bfloat16 prefilter (scoring/prefilter.py), interleaved in
one run: time per query batch, the share of rows it scores exactly, and that the lists agree
(ids exactly, scores to float32 rounding), over modes, k, bottom-k, query counts and groups.

    PYTHONPATH=. python bench/scale.py --rows 100000 1000000 --factories --rounds 1 --threads 2 --work /tmp/pf
    PYTHONPATH=. python bench/prefilter.py /tmp/pf/int8-100000 /tmp/pf/int8-1000000 --out bench/results/prefilter.json

Both variants are forced (LOGRA_DIST_BF16_PREFILTER=0 / 1), also where `prefilter.worthwhile` would
leave the filter off: those cases are the evidence for its thresholds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ann import queries  # noqa: E402

import logra_dist as ld  # noqa: E402
from logra_dist.scoring import prefilter  # noqa: E402

CASES = [  # (mode, queries, k, bottomk, groups)
    ("dot", 64, 10, 0, None),
    ("relatif", 64, 10, 0, None),
    ("relatif", 64, 10, 5, None),
    ("relatif", 64, 10, 0, {"first": r"layers\.0\.", "middle": r"layers\.[12]\."}),
    ("relatif", 8, 10, 0, None),
    ("relatif", 4, 10, 0, None),
    ("relatif", 1, 10, 0, None),
    ("relatif", 64, 100, 0, None),
    ("relatif", 64, 1000, 0, None),
]


def counted():
    """Patch Prefilter.keep to count rows seen and kept."""
    seen = {"rows": 0, "kept": 0}
    keep = prefilter.Prefilter.keep

    def counting(self, rows, *args):
        out = keep(self, rows, *args)
        seen["rows"] += len(rows)
        seen["kept"] += len(out)
        return out

    prefilter.Prefilter.keep = counting
    return seen


def one(index: str, mode: str, q: np.ndarray, k: int, bottomk: int, groups, on: str):
    os.environ[prefilter.ENV] = on
    sc = ld.Scorer(None, index, mode=mode)
    sc.add_query_gradients(q, np.arange(len(q)))
    t = time.perf_counter()
    res = sc.topk(k, groups=groups, bottomk=bottomk)
    took = time.perf_counter() - t
    sc.close()
    return took, res


def same(a, b) -> bool:
    pairs = [(a, b)] + [(a.groups[g], b.groups[g]) for g in a.groups]
    pairs += [(x.bottom, y.bottom) for x, y in pairs if x.bottom is not None]
    return all(
        np.array_equal(x.train_ids, y.train_ids) and np.allclose(x.scores, y.scores, rtol=2e-6, atol=0)
        for x, y in pairs
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("indexes", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefilter.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seen = counted()
    result = {
        "command": "PYTHONPATH=. python bench/prefilter.py " + " ".join(args.indexes),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "loadavg_at_start": os.getloadavg()},
        "cpu_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        "runs": [],
    }
    for index in args.indexes:
        rows = len(ld.GradientStore(index))
        for mode, nq, k, bottomk, groups in CASES:
            q = queries(nq, 1024)
            times: dict[str, list[float]] = {"0": [], "1": []}
            ref, agree = None, True
            seen.update(rows=0, kept=0)
            for _ in range(args.rounds):
                for on in ("0", "1"):
                    took, res = one(index, mode, q, k, bottomk, groups, on)
                    times[on].append(took)
                    ref = res if ref is None else ref
                    agree = agree and same(ref, res)
            run = {
                "rows": rows,
                "mode": mode,
                "queries": nq,
                "k": k,
                "bottomk": bottomk,
                "groups": sorted(groups or {}),
                "plain_s": [round(t, 3) for t in times["0"]],
                "prefilter_s": [round(t, 3) for t in times["1"]],
                "ratio_of_medians": round(statistics.median(times["1"]) / statistics.median(times["0"]), 3),
                "kept_share": round(seen["kept"] / max(1, seen["rows"]), 4),
                "same_lists": agree,
                "auto_would_enable": prefilter.worthwhile(nq, max(k, bottomk), rows),
            }
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
