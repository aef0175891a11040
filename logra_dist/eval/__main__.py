"""python -m logra_dist.eval run --benchmark digits|synthetic|lm|all [--fast] --out DIR"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from logra_dist.eval.report import write_markdown
from logra_dist.eval.runner import run_benchmark

BENCHMARKS = ("digits", "lm", "synthetic")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m logra_dist.eval",
        description="Counterfactual accuracy of LoGra and baselines (LDS, brittleness).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run benchmarks and write JSON results and the markdown table")
    run.add_argument(
        "--benchmark",
        choices=BENCHMARKS + ("all",),
        default="all",
        help="all = digits and lm (synthetic is the CI-sized stand-in for digits)",
    )
    run.add_argument("--out", default="bench/results/accuracy", help="folder of the JSON results")
    run.add_argument("--markdown", default=None, help="table file (default: <out>.md)")
    run.add_argument(
        "--cache",
        default="bench/cache/accuracy",
        help="retraining cache (reused by every later run with the same recipe)",
    )
    run.add_argument("--fast", action="store_true", help="small counts (CI): same methods, fewer subsets/seeds")
    run.add_argument("--workers", type=int, default=2, help="retraining processes (1 thread each)")
    run.add_argument(
        "--peers",
        action="store_true",
        help="also score the peer libraries (Kronfluence, TRAK, LogIX; LM and digits tasks) in the bench venv",
    )
    run.add_argument(
        "--smaller",
        action="store_true",
        help="lm: the labelled smaller plan (1 seed, fewer removal queries) for a loaded machine",
    )
    run.add_argument(
        "--peer-python",
        default="bench/.bench-venv/bin/python",
        help="python of the bench venv holding the peers (made by bash bench/setup_peers.sh)",
    )
    rep = sub.add_parser("report", help="rewrite the markdown table from the JSON results in --out")
    rep.add_argument("--out", default="bench/results/accuracy")
    rep.add_argument("--markdown", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    markdown = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    if args.cmd == "run":
        names = ("digits", "lm") if args.benchmark == "all" else (args.benchmark,)
        command = "python -m logra_dist.eval " + " ".join(argv)
        for name in names:
            peer_python = args.peer_python if args.peers and name != "synthetic" else None
            run_benchmark(
                name,
                out,
                args.cache,
                fast=args.fast,
                workers=args.workers,
                command=command,
                peer_python=peer_python,
                smaller=args.smaller and name == "lm",
            )
    write_markdown(out, markdown)
    print(f"wrote {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
