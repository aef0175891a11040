"""Thin collectives over torch.distributed that degrade to no-ops in a single process.

Every function here is collective when a process group exists: all ranks must call it, in the
same order. Engines initialize the group (DeepSpeed, torchrun, MPI); this module only uses it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _backend_device() -> torch.device:
    """gloo reduces CPU tensors; nccl needs them on the current GPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(flat: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (one collective call); returns a CPU tensor."""
    if not is_distributed():
        return flat
    buf = flat.to(_backend_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def all_gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Gather (n_r, D) tensors whose row counts differ per rank; returns one tensor per rank."""
    if not is_distributed():
        return [rows]
    device = _backend_device()
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    counts_i = [int(c.item()) for c in counts]
    longest = max(counts_i)
    padded = torch.zeros((longest,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    out = [torch.zeros_like(padded) for _ in counts_i]
    dist.all_gather(out, padded)
    return [o[:c].cpu() for o, c in zip(out, counts_i)]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order (small metadata only: texts, ids)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
