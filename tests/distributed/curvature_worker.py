"""Logs a tiny classifier with hessian="ekfac" and fisher="exact" on this rank's share of the
ids (every rank, or one process for the reference): `python curvature_worker.py OUT`."""

from __future__ import annotations

import sys

import torch
from torch import nn

import logra_dist as ld
from logra_dist import comm
from logra_dist.core.fisher import FisherTargets
from logra_dist.engines.launch import destroy_distributed, exit_process, init_distributed

N, BATCH, CLASSES = 21, 4, 3


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, CLASSES)).double()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(N, 5, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (N,), generator=gen)


def config() -> ld.LoGraConfig:
    return ld.LoGraConfig(
        k_in=3, k_out=2, hessian="ekfac", fisher="exact", compute_dtype="float64", storage_dtype="float32", flush_rows=3
    )


def log(out: str, rank: int = 0, world: int = 1) -> None:
    model, X, Y = problem()
    cfg = config()
    targets = FisherTargets.for_config(cfg, CLASSES)
    logger = ld.attach(model, cfg, out)
    bounds = [0, N] if world == 1 else [0, 13, N]  # two ranks: uneven shares (4 and 2 batches)
    mine = torch.arange(bounds[rank], bounds[rank + 1])
    for s in range(0, len(mine), BATCH):
        ids = mine[s : s + BATCH]
        with logger.statistics_pass(), logger.capture(targets.expand(ids)):
            logger.backward(targets.loss(logger.model(targets.expand(X[ids]))))
        with logger.capture(ids):
            logger.backward(nn.functional.cross_entropy(logger.model(X[ids]), Y[ids], reduction="sum"))
    logger.finalize()
    logger.close()


if __name__ == "__main__":
    init_distributed()
    log(sys.argv[1], comm.rank(), comm.world_size())
    destroy_distributed()
    exit_process(0)  # no interpreter teardown after a gloo group (pytorch#190489: SIGABRT at exit)
