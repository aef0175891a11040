"""Thin collectives over torch.distributed that degrade to no-ops in a single process.

Every function here is collective when a process group exists: all ranks must call it, in the
same order. Engines initialize the group (DeepSpeed, torchrun, MPI); this module only uses it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# Finalize sums the statistics in float64 buckets of this many bytes: the reduction's peak extra
# memory is one bucket whatever the statistics' size (a raw Fisher at k=64 is GBs), and at 64 MiB
# a gloo collective is near its bandwidth (an all-reduce of 64 MiB: ~48 ms on 2 ranks here).
REDUCE_BUCKET_BYTES = 64 << 20
# While rank 0 works alone (`rank0_alone`) it rewrites its status file every RANK0_HEARTBEAT_S;
# a waiting rank gives up once the file is older than RANK0_STALE_S (rank 0 killed or hung).
RANK0_HEARTBEAT_S = 1.0
RANK0_STALE_S = float(os.environ.get("LOGRA_DIST_RANK0_STALE_S") or 120.0)


def reduce_sum_into(tensors: list[torch.Tensor], dst: int, bucket_bytes: int | None = None) -> int:
    """Sum contiguous `tensors` over ranks into rank `dst`'s own tensors, in place (other ranks'
    stay as they were), packed into float64 buckets of `bucket_bytes` (REDUCE_BUCKET_BYTES): small tensors share a
    bucket, large ones span several. Returns the number of collective calls."""
    if not is_distributed() or not tensors:
        return 0
    cap = max(1, (REDUCE_BUCKET_BYTES if bucket_bytes is None else bucket_bytes) // 8)
    total = sum(t.numel() for t in tensors)
    bucket = torch.empty(min(cap, total), dtype=torch.float64, device=_backend_device())
    pieces: list[tuple[torch.Tensor, int]] = []  # (flat view of a tensor, its offset in the bucket)
    used, calls = 0, 0

    def flush() -> None:
        dist.reduce(bucket[:used], dst=dst, op=dist.ReduceOp.SUM)
        if rank() == dst:
            for piece, at in pieces:
                piece.copy_(bucket[at : at + piece.numel()])
        pieces.clear()

    for t in tensors:
        flat, start = t.view(-1), 0
        while start < flat.numel():
            n = min(cap - used, flat.numel() - start)
            view = flat[start : start + n]
            bucket[used : used + n].copy_(view)
            pieces.append((view, used))
            used, start = used + n, start + n
            if used == cap:
                flush()
                used, calls = 0, calls + 1
    if used:
        flush()
        calls += 1
    return calls


class Transfer:
    """A send or receive in flight (`isend_tensor`, `irecv_tensor`): `wait()` returns the tensor
    (on the CPU); the buffer stays alive until then. Any number of calls, from any thread, wait
    for it once (a second wait on gloo's recv work would wait for another message)."""

    def __init__(self, work: Any, buf: torch.Tensor):
        self._work, self._buf, self._lock, self._done = work, buf, threading.Lock(), False

    def wait(self) -> torch.Tensor:
        with self._lock:
            if not self._done:
                self._work.wait()
                self._done = True
        return self._buf.cpu()


def isend_tensor(t: torch.Tensor, dst: int) -> Transfer:
    buf = t.contiguous().to(_backend_device())
    return Transfer(dist.isend(buf, dst), buf)


def irecv_tensor(shape: tuple[int, ...], dtype: torch.dtype, src: int) -> Transfer:
    buf = torch.empty(shape, dtype=dtype, device=_backend_device())
    return Transfer(dist.irecv(buf, src), buf)


def rank0_alone(work: Callable[[], Any], status: Path, key: str, poll_s: float = 0.01) -> Any:
    """Run `work` on rank 0 while the other ranks wait for it without sitting in a collective.

    A gloo barrier aborts a waiting rank once the group's timeout passes (30 min by default),
    however healthy rank 0 is; so rank 0 writes its outcome ("<key> ok" or "<key> error: ...")
    to `status` (on the index's shared file system), rewriting "<key> running" there every
    RANK0_HEARTBEAT_S meanwhile, and the others poll that file (every 10 ms, then every tenth
    of the time waited so far, at most 1 s: growing the pause 1.5x a look let 0.3-0.5 s go by
    after a 1 s stats.h5 write). A failure on rank 0 is raised on every rank; a heartbeat older than RANK0_STALE_S
    (rank 0 killed or hung) too. Then one barrier, short: everyone is there. Rank 0 must remove
    a stale `status` before the last collective preceding this call (`key` names the job too)."""
    if not is_distributed():
        return work()
    if rank() == 0:
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(status, f"{key} running", stop), daemon=True)
        beat.start()
        try:
            out = work()
        except BaseException as e:
            stop.set()
            beat.join()
            _write_status(status, f"{key} error: {type(e).__name__}: {e}")
            raise
        stop.set()
        beat.join()
        _write_status(status, f"{key} ok")
        dist.barrier()
        status.unlink(missing_ok=True)
        return out
    pause, since = poll_s, time.time()
    while True:
        try:  # no exists() first: rank 0 removes the previous call's file when that call ends
            text, age = status.read_text(), time.time() - status.stat().st_mtime
        except FileNotFoundError:
            text, age = "", time.time() - since
        if text.startswith(f"{key} ok"):
            break
        if text.startswith(f"{key} error"):
            raise RuntimeError(f"rank 0 failed while this rank waited for it: {text[len(key) + 1 :]}")
        if age > RANK0_STALE_S:
            raise TimeoutError(
                f"rank 0 gave no sign of life in {status} for {age:.0f} s (killed or hung?); "
                "the shards are complete: rerun the same command with --resume to finish the index"
            )
        time.sleep(pause)
        pause = min(1.0, max(poll_s, 0.1 * (time.time() - since)))  # rank 0's end seen within ~10% of the wait
    dist.barrier()
    return None


def _heartbeat(path: Path, text: str, stop: threading.Event) -> None:
    while True:
        _write_status(path, text)
        if stop.wait(RANK0_HEARTBEAT_S):
            return


def _write_status(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
