"""Per-layer self-influence g_l^T H_l^-1 g_l of every training row, cached with the index.

RelatIF and cosine divide by it; computing it costs a GEMM per layer per row, so it is done
once per (hessian kind, damping) and stored in `<index>/selfinf.h5` as an (N, L) float32 dataset
in the index's row order. Per layer, so that any layer group's value is a sum of columns.
It lives in the index, or in a user cache folder where the index is read-only (`cacheplace`).

Writing is distributed without gathering rows anywhere: each scoring rank streams the values of
its own rows into a part file while it scores, then rank 0 copies the parts block by block into
a temporary file that replaces `selfinf.h5` atomically (existing keys are carried over). An entry
records what it was computed from (`sources`: the manifest's hash, job key and shards digest
(the shards' content digests) and stats.h5's digest), so a stale cache is never reused, and a
sha256 of its values, so an edited one is detected: either is recomputed (an edited one with
a warning) and replaced; nothing is ever read from an entry that fails either check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import h5py
import numpy as np

from logra_dist.index.format import MANIFEST_FILE, STATS_FILE, IndexFormatError, dataset_sha_streamed
from logra_dist.index.h5io import _GuardedFile, h5_writing
from logra_dist.index.partition import Ranges
from logra_dist.scoring.cacheplace import lock, remove_quietly, user_dir

FILE_NAME = "selfinf.h5"
_COPY_ROWS = 1 << 16


def cache_key(kind: str, damping: float) -> str:
    return f"{kind}_damping_{float(damping)!r}"


def cache_sources(index_dir: Path, manifest_bytes: bytes) -> str:
    """What a cache entry is computed from: the manifest's job key and shards digest (its shards'
    content digests) and stats.h5's digest (its datasets' checksums), all verified on open."""
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError:
        manifest = {}
    stats = ""
    try:
        with h5py.File(Path(index_dir) / STATS_FILE, "r") as f:
            stats = str(f.attrs.get("digest", ""))
    except OSError:
        pass
    parts = [str(manifest.get("job_key", "")), str(manifest.get("shards_digest", "")), stats]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class SelfInfluenceCache:
    """The cache entry for one (hessian kind, damping) of one index."""

    def __init__(
        self, index_dir: Path, kind: str, damping: float, n_rows: int, layout_json: str, cache_dir: Path | None = None
    ):
        self.index_dir = Path(index_dir)
        self.key = cache_key(kind, damping)
        self.n_rows, self.layout_json = n_rows, layout_json
        self.n_layers = len(json.loads(layout_json))
        manifest_bytes = (self.index_dir / MANIFEST_FILE).read_bytes()
        self.manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        self.sources = cache_sources(self.index_dir, manifest_bytes)
        self.user_dir = user_dir(self.index_dir, self.manifest_sha, cache_dir)  # if the index is read-only
        self.dir = self.index_dir  # where the entry is read and written (cacheplace.plan)
        self.part_error: OSError | None = None  # this rank's part could not be written
        self.held: list[int] = []  # locks on this rank's closed part, until the merge
        self._file: h5py.File | None = None

    @property
    def path(self) -> Path:
        return self.dir / FILE_NAME

    def _valid(self, ds: h5py.Dataset) -> bool:
        if not (
            ds.shape == (self.n_rows, self.n_layers)
            and ds.attrs.get("manifest_sha256") == self.manifest_sha
            and ds.attrs.get("sources") == self.sources
            and ds.attrs.get("layout") == self.layout_json
        ):
            return False  # stale: computed from other shards or statistics
        if ds.attrs.get("sha256") != dataset_sha_streamed(ds):  # never the whole (N, L) in memory
            warnings.warn(
                f"{self.path}: entry {self.key!r} fails its checksum (field 'sha256': edited or corrupted); "
                "recomputing it",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        return True

    def available(self, folder: Path | None = None) -> bool:
        """Whether a valid entry exists (checked by every rank; the caller agrees collectively)."""
        path = self.path if folder is None else folder / FILE_NAME
        if not path.exists():
            return False
        try:
            with h5py.File(path, "r") as f:
                return self.key in f and self._valid(f[self.key])
        except OSError:
            return False  # unreadable cache: recomputed and replaced

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (n, L) float32."""
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.key][start:stop]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        while self.held:
            os.close(self.held.pop())

    # -- writing ----------------------------------------------------------------------------
    def part_path(self, token: int, rank: int) -> Path:
        return self.dir / f"{FILE_NAME}.part-{token:016x}-rank-{rank:05d}"

    def part_writer(self, token: int, rank: int) -> PartWriter:
        self.part_error = None
        return PartWriter(self.part_path(token, rank), self.n_layers, self)

    def merge(self, token: int, assignment: list[Ranges]) -> None:
        """Rank 0, after every rank closed its part: build the new selfinf.h5 and swap it in."""
        tmp = self.dir / f"{FILE_NAME}.tmp-{token:016x}"
        held = lock(tmp)  # a dead merge's file is removed by a later run (cacheplace.remove_stale)
        try:
            with h5_writing(tmp) as dst:  # a full disk is an OSError, never an HDF5 crash
                self._carry_over(dst)
                ds = dst.create_dataset(self.key, shape=(self.n_rows, self.n_layers), dtype=np.float32)
                ds.attrs.update({"manifest_sha256": self.manifest_sha, "layout": self.layout_json})
                for rank, ranges in enumerate(assignment):
                    self._copy_part(self.part_path(token, rank), ranges, ds)
                ds.attrs.update({"sources": self.sources, "sha256": dataset_sha_streamed(ds)})
            os.replace(tmp, self.path)
        finally:
            os.close(held)
            remove_quietly(tmp)
            for rank in range(len(assignment)):
                remove_quietly(self.part_path(token, rank))

    def _carry_over(self, dst: h5py.File) -> None:
        if not self.path.exists():
            return
        try:
            with h5py.File(self.path, "r") as src:
                for name in src:
                    if name != self.key and isinstance(src[name], h5py.Dataset) and self._valid_other(src[name]):
                        src.copy(src[name], dst, name=name)
        except OSError:
            pass  # an unreadable old cache is dropped, not fatal

    def _valid_other(self, ds: h5py.Dataset) -> bool:
        return ds.attrs.get("manifest_sha256") == self.manifest_sha and ds.attrs.get("sources") == self.sources

    @staticmethod
    def _copy_part(path: Path, ranges: Ranges, ds: h5py.Dataset) -> None:
        expected = sum(hi - lo for lo, hi in ranges)
        if not path.exists():
            if expected:
                raise IndexFormatError(f"{path}: self-influence part missing ({expected} rows expected)")
            return
        with h5py.File(path, "r", locking=False) as part:  # the part is flock'ed by its job (cacheplace)
            data = part["rows"]
            if data.shape[0] != expected:
                raise IndexFormatError(f"{path}: holds {data.shape[0]} self-influence rows, {expected} expected")
            done = 0
            for lo, hi in ranges:
                for s in range(lo, hi, _COPY_ROWS):
                    e = min(hi, s + _COPY_ROWS)
                    ds[s:e] = data[done : done + e - s]
                    done += e - s


class PartWriter:
    """One rank's self-influence rows, appended in the order the rank streams its ranges. Writes
    are batched (`flush_rows`): every HDF5 call waits for h5py's global lock, which the row
    reader thread holds during its large reads. A failed write (disk full) is recorded in
    `cache.part_error` and removes the part: the scores need the values, not the file. The part
    is flock'ed until closed, so no other job takes it for a dead one's."""

    flush_rows = 1 << 17

    def __init__(self, path: Path, n_layers: int, cache: SelfInfluenceCache | None = None):
        self.path, self._cache = path, cache
        self.file = None
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._lock: int | None = None
        try:
            self._lock = lock(path)
            self._guard = _GuardedFile(path)  # HDF5 never sees a failed write (it can crash on close)
            self.file = h5py.File(self._guard, "w")
            self.data = self.file.create_dataset(
                "rows",
                shape=(0, n_layers),
                maxshape=(None, n_layers),
                dtype=np.float32,
                chunks=(4096, max(1, n_layers)),
            )
        except OSError as e:
            self._fail(e)

    def _fail(self, error: OSError) -> None:
        if self._cache is not None and self._cache.part_error is None:
            self._cache.part_error = error
        self._pending, self._pending_rows = [], 0
        self._close_file()
        remove_quietly(self.path)
        if self._cache is None:
            raise error

    @property
    def failed(self) -> bool:
        return self.file is None

    def append(self, values: np.ndarray) -> None:
        if self.failed:
            return
        self._pending.append(np.array(values, dtype=np.float32))
        self._pending_rows += len(values)
        if self._pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        values = np.concatenate(self._pending)
        self._pending, self._pending_rows = [], 0
        try:
            n = self.data.shape[0]
            self.data.resize(n + len(values), axis=0)
            self.data[n:] = values
        except OSError as e:
            self._fail(e)
            return
        if self._guard.error is not None:
            self._fail(self._guard.error)

    def _close_file(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        guard = getattr(self, "_guard", None)
        if guard is not None and not guard.closed:
            guard.close()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def close(self) -> None:
        if self.failed:
            self._close_file()
            return
        self._flush()
        if self.failed:
            return
        self.file.close()
        self.file = None
        error = self._guard.error
        self._guard.close()
        if error is not None:
            self._fail(error)
            return
        if self._cache is not None:  # held until the merge is done (SelfInfluenceCache.close)
            self._cache.held.append(self._lock)
        else:
            os.close(self._lock)
        self._lock = None
