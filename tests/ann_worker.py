"""torchrun worker for the ANN tests (gloo, real processes).

    torchrun --nproc_per_node 2 tests/ann_worker.py build ROOT   # `logra-dist ann build` on 2 ranks
    torchrun --nproc_per_node 3 tests/ann_worker.py score ROOT   # ANN scoring on 3 ranks
`score(root)` also runs in one process (world size 1). Every rank saves its result to
ROOT/results/W<world>.rank<r>.npz.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from ann import queries

import logra_dist as ld
from logra_dist import comm
from logra_dist.engines.launch import destroy_distributed, exit_process

K, CANDIDATES, N_QUERIES, WIDTH = 10, 40, 13, 512


def score(root: Path) -> None:
    q = queries(N_QUERIES, WIDTH, seed=3)
    mine = np.arange(N_QUERIES)[comm.rank() :: comm.world_size()]  # queries split over ranks
    sc = ld.Scorer(None, root / "index", mode="relatif", block_bytes=1 << 20)
    sc.add_query_gradients(q[mine], mine)
    res = sc.topk(K, ann=True, candidates=CANDIDATES)
    out = root / "results"
    out.mkdir(parents=True, exist_ok=True)
    np.savez(
        out / f"W{comm.world_size()}.rank{comm.rank()}.npz",
        scores=res.scores,
        train_ids=res.train_ids,
        query_ids=res.query_ids,
        candidates=res.info["ann_candidates"],
    )
    sc.close()


def main() -> None:
    phase, root = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if phase == "build":
            from logra_dist.cli.main import main as cli

            cli(["ann", "build", str(root / "index"), "--factory", "HNSW16", "--sketch-dim", "128"])
        elif phase == "score":
            score(root)
        else:
            raise SystemExit(f"unknown phase {phase!r}")
        comm.barrier()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after a gloo group (pytorch#190489: SIGABRT at exit)
