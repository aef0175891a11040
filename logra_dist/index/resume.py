"""What an interrupted logging job left on disk, and whether this job may continue it.

Every rank inspects its own files (`rank_state`), then all-reduces one small vector
(`agree_on_state`) so that all ranks start, resume or refuse together: a rank that refused alone
would leave the others waiting at the next collective. A resume needs the same world size, config, layer layout, storage
dtype and model: rank r must own exactly the samples it owned before (rank striding) and its
committed rows must be comparable with the new ones. init="pca" jobs also keep their projections
(`pca_projections.npz`), since a PCA pass over the remaining samples would give other ones.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist import comm
from logra_dist.index.format import (
    MANIFEST_FILE,
    SHARD_DIR,
    IndexFormatError,
    another_job,
    layout_from_json,
    partial_dir,
    rank_stats_path,
    shard_path,
)
from logra_dist.index.h5io import fsync_path
from logra_dist.index.partial import COMMIT, PartialShardError, read_record
from logra_dist.index.writer import check_shard_attrs

_RANK_FILE = re.compile(r"^rank-(\d+)\.(h5|partial)$")


def rank_state(path: Path, want: dict[str, Any]) -> tuple[str, str | None]:
    """("none" | "partial" | "complete", why it does not belong to this job, or None) for the
    files one rank left under the final shard name `path`."""
    if path.exists():
        problem = check_shard_attrs(path, want)
        return "complete", (f"{path}: {problem}" if problem else None)
    record_path = partial_dir(path) / COMMIT
    if not record_path.exists():
        return "none", None
    try:
        meta = read_record(record_path).meta
    except PartialShardError as e:
        return "partial", str(e)
    problem = another_job(meta, want, "in the interrupted job")
    if problem:
        return "partial", (
            f"{record_path.parent}: {problem}; so it cannot be resumed: rerun with the original "
            f"settings, or delete {path.parent.parent} to start over"
        )
    return "partial", None


def has_rank_stats(path: Path) -> bool:
    """Whether the complete shard at `path` still has the local statistics that re-running its
    finalize needs (deleted once the manifest is written)."""
    return rank_stats_path(path).exists()


def agree_on_state(out_dir: Path, rank: int, w: int, want: dict[str, Any], resume: bool) -> tuple[bool, bool]:
    """Collective: every rank learns what every rank left in out_dir, so that all of them start,
    resume or refuse together. Returns (this job continues an earlier one, that one was finalized:
    every shard complete and manifest.json written, so its per-rank statistics may be gone)."""
    mine = shard_path(out_dir, rank)
    kind, problem = rank_state(mine, want)
    flags = torch.zeros(3 * w + 1, dtype=torch.float64)
    flags[rank] = {"none": 0, "partial": 1, "complete": 2}[kind]
    flags[w + rank] = problem is not None
    flags[2 * w + rank] = kind == "complete" and not has_rank_stats(mine)
    flags[-1] = rank == 0 and (out_dir / MANIFEST_FILE).exists()
    flags = comm.all_reduce_sum(flags)
    kinds, problems = flags[:w].long().tolist(), [r for r in range(w) if flags[w + r] > 0]
    no_stats = [r for r in range(w) if flags[2 * w + r] > 0]
    finished = resume and all(k == 2 for k in kinds) and bool(flags[-1] > 0)
    shards = out_dir / SHARD_DIR
    extra = [r for r in ranks_on_disk(out_dir) if r >= w]
    if extra:
        raise IndexFormatError(
            f"{shards}: holds shards of rank(s) {extra[:8]}, written by a job with more "
            f"than {w} ranks; resume with the world size of that job, or use an empty directory"
        )
    started = [r for r in range(w) if kinds[r]]
    if started and not resume:
        done = [r for r in range(w) if kinds[r] == 2]
        first = (
            f"{shard_path(out_dir, done[0])}: a complete shard already exists; refusing to overwrite it"
            if done
            else f"{partial_dir(shard_path(out_dir, started[0]))}: an unfinished shard of an earlier job exists"
        )
        raise IndexFormatError(
            f"{first} (rank(s) {started[:8]} have shards, {done[:8]} complete); pass "
            "resume=True (--resume) to continue that job, or use an empty directory"
        )
    if problems:
        raise IndexFormatError(
            problem
            if problem is not None
            else f"{shards}: cannot resume, rank(s) {problems[:8]} found shards of another "
            "job (their error names the file)"
        )
    if no_stats and not finished:
        first = shard_path(out_dir, no_stats[0])
        raise IndexFormatError(
            f"{first}: cannot re-run the finalize: the statistics of this complete shard "
            f"({rank_stats_path(first).name}; rank(s) {no_stats[:8]}) are deleted once a "
            f"manifest is written, and {out_dir / MANIFEST_FILE} is gone or other shards "
            "are missing; delete the index to log again"
        )
    return bool(started), finished


def ranks_on_disk(out_dir: str | Path) -> list[int]:
    """Ranks that have a shard or a partial shard under `out_dir/shards`."""
    folder = Path(out_dir) / SHARD_DIR
    found = {int(m.group(1)) for m in map(_RANK_FILE.match, os.listdir(folder)) if m} if folder.is_dir() else set()
    return sorted(found)


def pca_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / SHARD_DIR / "pca_projections.npz"


def write_pca(path: Path, layout_json: str, projections: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The PCA projections of a running job, so a resumed job logs with the same ones."""
    arrays = {"layout": np.array(layout_json)}
    for i, s in enumerate(layout_from_json(layout_json)):
        p_in, p_out = projections[s.name]
        arrays[f"p_in_{i}"], arrays[f"p_out_{i}"] = p_in.cpu().double().numpy(), p_out.cpu().double().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    fsync_path(tmp)
    os.replace(tmp, path)


def read_pca(path: Path, layout_json: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not path.exists():
        raise IndexFormatError(
            f"{path}: missing, so this init='pca' job cannot resume with the projections "
            "it logged with (killed during its PCA pass?); delete the index and start over"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["layout"][()]) != layout_json:
                raise IndexFormatError(f"{path}: PCA projections of another layer layout")
            return {
                s.name: (torch.from_numpy(z[f"p_in_{i}"]), torch.from_numpy(z[f"p_out_{i}"]))
                for i, s in enumerate(layout_from_json(layout_json))
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, IndexFormatError):
            raise
        raise IndexFormatError(f"{path}: unreadable PCA projections ({e})") from e
