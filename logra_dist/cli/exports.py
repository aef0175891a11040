"""`logra-dist selfinf INDEX --out FILE.h5` and `score --export-matrix FILE.h5` (small cases)."""

from __future__ import annotations

import argparse

from logra_dist import comm
from logra_dist.cli.jobs import say
from logra_dist.engines.launch import init_distributed
from logra_dist.scoring.export import MatrixWriter, check_matrix_size, write_self_influence


def run_selfinf(args: argparse.Namespace) -> None:
    """Collective: every training row's g^T H^-1 g (per layer and total), computed over the ranks
    (or read from the index's cache) and written by rank 0."""
    from logra_dist.scoring.scorer import Scorer

    init_distributed()
    scorer = Scorer(None, args.index, mode="relatif", damping=args.damping, cache_self_influence=not args.no_cache)
    try:
        values = scorer.train_self_influence(per_layer=True)
        if comm.rank() == 0:
            attrs = {"index": str(scorer.index_dir.resolve()), "hessian": scorer.hessian, "damping": scorer.damping}
            layers = [s.name for s in scorer.store.layout]
            path = write_self_influence(args.out, scorer.store.ids, values, layers, attrs)
            say(f"self-influence of {len(values)} training rows ({len(layers)} layers) written to {path}")
    finally:
        scorer.close()


def matrix_writer(args: argparse.Namespace, scorer, n_queries: int) -> MatrixWriter | None:
    """Rank 0's writer of --export-matrix (None without it, or on other ranks); size checked first."""
    if not args.export_matrix:
        return None
    check_matrix_size(n_queries, len(scorer.store), args.force)
    if comm.rank() != 0:
        return None
    attrs = {"mode": scorer.mode, "damping": scorer.damping, "index": str(scorer.index_dir.resolve())}
    return MatrixWriter(args.export_matrix, scorer.store.ids, attrs)
