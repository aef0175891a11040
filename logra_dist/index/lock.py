"""One writer per index: the locks a logging job holds for its whole life.

Every rank locks its shard (`locks/rank-NNNNN.lock`), rank 0 also the index
(`locks/index.lock`: the finalize writes stats.h5 and manifest.json, and a `--resume` of a finished
index would re-run it), before anything is read, cut or written. A second job on the same index
is refused at once with the holder named; a killed job's lock is free (the kernel drops it) and
is taken over. The lock files sit in their own folder: not inside the partial directory, which
finalize deletes while the lock must still be held, and not in shards/, where a killed job's
lock file would sit among its shards. Ranks agree on failure
through one small all-reduce, so that no rank goes on alone while another refused.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from logra_dist import comm
from logra_dist.index.format import IndexFormatError, index_lock_path, shard_lock_path
from logra_dist.index.lockfile import LockFile, LockHeld, alive_here, describe, is_held, read_holder


class IndexLockedError(IndexFormatError):
    """Another job holds a lock of this index; the message names it (host, pid, start)."""


_FIX = "wait for it to finish or stop it (then rerun with --resume), or use another --out"


def _judge_previous(lock: LockFile) -> str | None:
    """A lock taken, but its file names a holder: a dead job's (fine), a live one on this host
    (the file system did not honour its lock: refuse), or one on another host (warn)."""
    old = lock.previous
    if not old or (old.get("pid") == os.getpid() and alive_here(old)):
        return None
    state = alive_here(old)
    if state:
        return (
            f"{lock.path}: recorded as held by a live job, {describe(old)}, yet its lock is free: "
            "this file system does not honour flock (docs/reliability.md); stop that job or delete "
            f"{lock.path} if it is not writing here"
        )
    if state is None:
        warnings.warn(
            f"{lock.path}: took over the lock of {describe(old)}; if that job still runs, this file "
            "system does not share locks across hosts and gives no protection (docs/reliability.md)",
            RuntimeWarning,
            stacklevel=3,
        )
    return None


class JobLocks:
    """This rank's locks (its shard's; rank 0: the index's too), held until `release()`."""

    def __init__(self, locks: list[LockFile]):
        self.locks = locks

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks = []


def _take(path: Path, what: str, locks: list[LockFile]) -> str | None:
    try:
        lock = LockFile.acquire(path, what)
    except LockHeld as e:
        return f"{path}: locked by another job: a job is running: {e}; {_FIX}"
    except OSError as e:
        return f"{e.strerror or e}; on such a file system run one job per index yourself (docs/reliability.md)"
    locks.append(lock)
    return _judge_previous(lock)


def lock_job(out_dir: str | Path, rank: int, world: int) -> JobLocks:
    """Collective: take this rank's locks; all ranks raise together if any rank could not."""
    out_dir = Path(out_dir)
    wanted = ([(index_lock_path(out_dir), "the index (finalize)")] if rank == 0 else []) + [
        (shard_lock_path(out_dir, rank), f"rank {rank}'s shard")
    ]
    locks: list[LockFile] = []
    problem = None
    for path, what in wanted:
        problem = _take(path, what, locks)
        if problem:
            break
    flags = torch.zeros(world, dtype=torch.float64)
    flags[rank] = problem is not None
    failed = [r for r, f in enumerate(comm.all_reduce_sum(flags).tolist()) if f > 0]
    if not failed:
        return JobLocks(locks)
    JobLocks(locks).release()
    if problem:
        raise IndexLockedError(f"rank {rank}: {problem}")
    first = failed[0]
    path = index_lock_path(out_dir) if first == 0 and is_held(index_lock_path(out_dir)) else None
    path = path or shard_lock_path(out_dir, first)
    raise IndexLockedError(
        f"{out_dir}: rank(s) {failed[:8]} could not lock the index: {path} is held by "
        f"{describe(read_holder(path))}; {_FIX}"
    )
