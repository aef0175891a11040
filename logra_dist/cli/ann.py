"""`logra-dist ann build INDEX`: the per-shard FAISS files `score --ann` searches.

Under a launcher (torchrun, deepspeed, mpirun) each rank builds the files of its whole shards
(`partition.shard_owners`); then one agreed step, so a rank that fails is reported by every rank,
and rank 0 lists what was built.
"""

from __future__ import annotations

import argparse
import time

import torch

from logra_dist import comm
from logra_dist.cli.jobs import say
from logra_dist.engines.launch import init_distributed
from logra_dist.index.ann import DEFAULT_FACTORY, read_record


def run_ann(args: argparse.Namespace) -> None:
    from logra_dist.scoring.ann import build_ann

    if args.sketch_dim is not None and args.sketch_dim < 1:
        raise SystemExit(f"--sketch-dim must be >= 1, got {args.sketch_dim}")
    init_distributed()
    start, error, paths = time.perf_counter(), None, []
    try:
        paths = build_ann(
            args.index,
            factory=args.factory or DEFAULT_FACTORY,
            dim=args.sketch_dim,
            kind=getattr(args, "sketch", "pca"),
            mode=args.mode,
            damping=args.damping,
            seed=args.sketch_seed,
            search_params=args.search_params,
            build_params=args.build_params,
        )
    except Exception as e:  # re-raised below, after the other ranks know
        error = e
    flags = torch.zeros(comm.world_size(), dtype=torch.float64)
    flags[comm.rank()] = float(error is not None)
    failed = [r for r, f in enumerate(comm.all_reduce_sum(flags).tolist()) if f]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"ann build failed on rank(s) {failed}; see the error reported there")
    built = comm.all_reduce_sum(torch.tensor([float(len(paths))], dtype=torch.float64)).item()
    if paths:
        r = read_record(paths[0])
        say(
            f"built {int(built)} ANN file(s) in {time.perf_counter() - start:.1f}s: factory {r.factory}"
            f"{f' ({r.build_params})' if r.build_params else ''}, "
            f"{r.sketch} sketch dim {r.sketch_dim} of D={r.width}, normalization {r.normalization}"
        )
    else:
        say(f"built {int(built)} ANN file(s) in {time.perf_counter() - start:.1f}s")
