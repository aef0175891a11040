"""A logging job on a tiny MLP and synthetic data (no transformers import: starts in ~2 s).

    python tests/faults/mlp_worker.py --out DIR [--resume] [--nan-id 13 [4 ...]] ...
    (also under torchrun, or as bare processes with RANK/WORLD_SIZE/MASTER_* set)

It follows the resume protocol of launch/log.py: rank r owns samples r, r+world, ...; with
--resume it skips `logger.done_ids`. Faults come from LOGRA_DIST_FAULT (hooks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), HERE]

import hooks  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import logra_dist as ld  # noqa: E402
from logra_dist import comm  # noqa: E402
from logra_dist.engines.launch import destroy_distributed, exit_process, init_distributed  # noqa: E402


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def config(args) -> ld.LoGraConfig:
    return ld.LoGraConfig(
        k_in=args.k,
        k_out=args.k,
        init=args.init,
        seed=args.seed,
        hessian=args.hessian,
        storage_dtype=args.storage_dtype,
        flush_rows=args.flush_rows,
        include=args.include,
    )


def run(args, net: nn.Module | None = None) -> dict:
    init_distributed()
    X, Y = data(args.n)
    ids = torch.arange(args.n)
    rank, world = comm.rank(), comm.world_size()
    mine = ids if args.no_stride else ids[rank::world]
    mine = mine[mine != args.skip_id]
    logger = ld.attach(
        net if net is not None else model(), config(args), args.out, resume=args.resume, commit_seconds=0
    )  # commit at every flush_rows rows: deterministic commit points
    todo = mine[torch.from_numpy(logger.pending(mine))]
    batches = [todo[s : s + args.batch] for s in range(0, len(todo), args.batch)]
    if logger.needs_pca_pass:
        with logger.pca_pass():
            for b in batches:
                _step(logger, b, X, Y, args.nan_id)
    for b in batches:
        _step(logger, b, X, Y, args.nan_id)
    manifest = logger.finalize()
    logger.close()
    return manifest


def _step(logger, b, X, Y, nan_id) -> None:
    with logger.capture(b):
        losses = nn.functional.cross_entropy(logger.model(X[b]), Y[b], reduction="none")
        scale = torch.where(torch.isin(b, torch.tensor(nan_id)), float("nan"), 1.0)  # NaN losses: their gradients only
        losses = losses * scale
        logger.backward(losses.sum())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n", "--samples", dest="n", type=int, default=40)  # --samples: under the deepspeed runner
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--flush-rows", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--init", default="random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hessian", default="raw")
    p.add_argument("--storage-dtype", default="float32")
    p.add_argument("--nan-id", type=int, nargs="+", default=[-1], help="these samples get a NaN loss")
    p.add_argument("--skip-id", type=int, default=-1, help="leave this sample out of the data")
    p.add_argument("--include", nargs="*", default=[".*"])
    p.add_argument("--no-stride", action="store_true", help="every rank logs every sample (a user bug)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    return p


if __name__ == "__main__":
    hooks.install()
    manifest = run(parser().parse_args())
    if comm.rank() == 0:
        print(
            "MANIFEST",
            json.dumps({"total_rows": manifest["total_rows"], "nonfinite_total": manifest["nonfinite_total"]}),
            flush=True,
        )
    destroy_distributed()
    exit_process(0)
