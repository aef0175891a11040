"""Where the self-influence cache is written, and what happens when it cannot be.

A published index is usually read-only, and disks fill up; neither may fail a scoring job, as the
cache only saves time. The entry goes into the index when every rank can write there, else into
a user cache directory (`--cache-dir`, default `$LOGRA_DIST_HOME/selfinf`) under a folder per
index (`index_digest`: the index's real path and manifest hash, so two indexes never share an
entry); where neither is writable, or a write fails midway (disk full), the values are computed
for this run only, with a one-line note. Part files are removed on every failure path; those of
a dead job are removed by the next run (`remove_stale`: unlocked and older than a minute).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import warnings
from pathlib import Path

import torch

from logra_dist import comm
from logra_dist.config import default_cache_dir

STALE_AFTER_S = 60.0  # a part file unlocked for this long belongs to no live job
_LEFTOVERS = ("selfinf.h5.part-*", "selfinf.h5.tmp-*", ".selfinf-probe-*")


def index_digest(index_dir: Path, manifest_sha: str) -> str:
    return hashlib.sha256(f"{Path(index_dir).resolve()}\0{manifest_sha}".encode()).hexdigest()[:24]


def user_dir(index_dir: Path, manifest_sha: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The index's folder in the user cache: `<cache_dir or $LOGRA_DIST_HOME/selfinf>/<digest>`."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir() / "selfinf"
    return root / index_digest(index_dir, manifest_sha)


def writable(folder: Path) -> bool:
    """Whether a file can be created and written in `folder` (made if missing)."""
    probe = folder / f".selfinf-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
        return True
    except OSError:
        return False
    finally:
        remove_quietly(probe)


def remove_quietly(path: Path) -> None:
    """Cleanup on failure paths: never raises, so it cannot hide the error being reported."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def lock(path: Path) -> int:
    """Create `path` and hold an exclusive flock on it while its job lives (the kernel releases
    it when the process dies, whatever killed it); returns the descriptor to close."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    with contextlib.suppress(OSError):  # a filesystem without locks: the age rule alone protects it
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale(folder: Path, now: float | None = None) -> list[Path]:
    """Remove the part, temporary and probe files of dead jobs: not locked by a live process and
    not modified for STALE_AFTER_S. Returns what was removed."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time() if now is None else now
    for pattern in _LEFTOVERS:
        for path in folder.glob(pattern):
            try:
                if now - path.stat().st_mtime < STALE_AFTER_S:
                    continue
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            except OSError:
                continue
            else:
                remove_quietly(path)
                removed.append(path)
            finally:
                os.close(fd)
    return removed


def note(message: str) -> None:
    """One line on rank 0: the scores are right, only the cache is missing."""
    if comm.rank() == 0:
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def plan(cache, enabled: bool, world: int) -> tuple[str, int]:
    """Collective: ('read' | 'write' | 'compute', token); sets `cache.dir` to the agreed folder."""
    places = [cache.index_dir, cache.user_dir]
    if enabled and comm.rank() == 0:
        for folder in places:
            remove_stale(folder)
    here = [float(cache.available(d)) for d in places]
    can_index = enabled and writable(cache.index_dir)
    here += [float(can_index), float(enabled and not can_index and writable(cache.user_dir))]
    found = [int(v) == world for v in comm.all_reduce_sum(torch.tensor(here, dtype=torch.float64)).tolist()]
    for folder, ok in zip(places + places, found):
        if ok:
            cache.dir = folder
            break
    if found[0] or found[1]:
        return "read", 0
    if not enabled:
        return "compute", 0
    if not (found[2] or found[3]):
        note(
            f"self-influence not cached: neither {cache.index_dir} nor {cache.user_dir} is writable on every "
            "rank; computed for this run only (pass --cache-dir DIR to keep it, --no-cache to skip)"
        )
        return "compute", 0
    token = torch.tensor([[int.from_bytes(os.urandom(8), "little") >> 2]], dtype=torch.int64)  # unique per job
    return "write", int(comm.all_gather_rows(token)[0].item())


def finish(cache, token: int, assignment, agreed) -> bool:
    """Collective, after every rank closed its part: rank 0 merges them if every part was written
    (a failed write or merge is a note, not an error). Returns whether the entry now exists."""
    rank, world = comm.rank(), comm.world_size()
    parts_ok = comm.all_reduce_sum(torch.tensor([float(cache.part_error is None)], dtype=torch.float64)).item()

    def merge() -> bool:
        if rank != 0:
            return True
        if parts_ok < world:
            note(f"self-influence not cached: a rank could not write its part ({cache.part_error!r} here)")
            return False
        try:
            cache.merge(token, assignment)
            return True
        except OSError as e:
            note(f"self-influence not cached: cannot write {cache.path} ({e!r}); computed for this run only")
            return False

    merged = agreed(merge, "writing the self-influence cache")
    merged = comm.all_reduce_sum(torch.tensor([float(merged and rank == 0)], dtype=torch.float64)).item() == 1
    if not merged:
        remove_quietly(cache.part_path(token, rank))
    return merged
