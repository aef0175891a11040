"""A rank's unfinished shard: append-only raw files plus an atomically replaced commit record.

Why not append to the HDF5 shard directly: HDF5 keeps its metadata (dataset extents, chunk
index) in a cache that is written at flush/close, so a process killed while it writes can leave
a file HDF5 cannot open, and every row in it is lost. Here nothing that was committed is ever
rewritten:

    shards/rank-00003.partial/grads.bin   rows, appended (raw bytes, storage dtype)
    shards/rank-00003.partial/ids.bin     their sample ids, appended (int64 little endian)
    shards/rank-00003.partial/commit.npz  rows committed + the statistics covering exactly them

`commit()` flushes and fsyncs the two data files, then writes the record to a temporary file,
fsyncs it and renames it over the old one (`os.replace`, atomic on POSIX). A kill at any point
leaves either the old record or the new one, and the data files hold at least as many rows as
the record says; rows past it are cut off when the shard is reopened (and logged again). The
record is read with `allow_pickle=False`: a partial from elsewhere is only parsed.
"""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .h5io import fsync_path

GRADS, IDS, COMMIT = "grads.bin", "ids.bin", "commit.npz"


class PartialShardError(ValueError):
    """A partial shard that cannot be resumed; the message names the file and the problem."""


@dataclass
class CommitRecord:
    """What a resumed rank restarts from: rows kept, their statistics, ids found non-finite."""

    rows: int
    meta: dict  # layout, config, storage dtype, rank, world size, model: must match to resume
    stats: np.ndarray | None = None  # the rank's local statistics (Accumulator.flat) over `rows`
    nonfinite_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def write_record(path: Path, record: CommitRecord) -> None:
    """Write `commit.npz` atomically: a reader sees the old record or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    meta = np.frombuffer(json.dumps(record.meta, sort_keys=True).encode(), np.uint8)
    arrays = {"rows": np.array(record.rows, np.int64), "meta": meta,
              "nonfinite_ids": np.asarray(record.nonfinite_ids, np.int64)}
    if record.stats is not None:
        arrays["stats"] = np.asarray(record.stats, np.float64)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_record(path: Path) -> CommitRecord:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            stats = z["stats"] if "stats" in z.files else None
            return CommitRecord(int(z["rows"]), meta, stats, z["nonfinite_ids"].astype(np.int64))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise PartialShardError(f"{path}: unreadable commit record ({e}); delete {path.parent} to "
                                "log this rank again from the start") from e


class PartialShard:
    """Append-only writer over one rank's partial directory (single thread: the shard writer)."""

    def __init__(self, directory: Path, row_dtype: np.dtype, width: int, meta: dict):
        self.dir, self.row_dtype, self.width = directory, np.dtype(row_dtype), width
        self.row_bytes = self.row_dtype.itemsize * width
        meta = {**meta, "row_dtype": self.row_dtype.str, "width": width}
        if (directory / COMMIT).exists():
            self.record = read_record(directory / COMMIT)
            self._check(meta)
            self._truncate(self.record.rows)
        else:  # fresh, or killed before its first record: nothing in it counts
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            for name in (GRADS, IDS):
                (directory / name).touch()
            self.record = CommitRecord(0, meta)
            write_record(directory / COMMIT, self.record)
        self.rows = self.record.rows
        self._grads = open(directory / GRADS, "ab")
        self._ids = open(directory / IDS, "ab")

    def _check(self, meta: dict) -> None:
        for key, want in meta.items():
            got = self.record.meta.get(key)
            if got != want:
                raise PartialShardError(f"{self.dir}: cannot resume, it was written with another {key} "
                                        f"({_short(got)} != {_short(want)}); resume with the original "
                                        f"settings, or delete {self.dir.parent} to start over")

    def _truncate(self, rows: int) -> None:
        """Cut rows written after the last commit (they are logged again)."""
        for name, size in ((GRADS, rows * self.row_bytes), (IDS, rows * 8)):
            path = self.dir / name
            have = path.stat().st_size if path.exists() else -1
            if have < size:
                raise PartialShardError(f"{path}: holds {max(have, 0)} bytes but the commit record "
                                        f"covers {size} ({rows} rows): the partial shard was damaged; "
                                        f"delete {self.dir} to log this rank again")
            os.truncate(path, size)

    def committed_ids(self) -> np.ndarray:
        return np.fromfile(self.dir / IDS, dtype="<i8", count=self.record.rows)

    def append(self, rows: np.ndarray, ids: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.row_dtype)
        if rows.shape != (len(ids), self.width):
            raise ValueError(f"{self.dir}: rows of shape {rows.shape} for {len(ids)} ids and width {self.width}")
        if len(ids):
            self._grads.write(rows.data)
            self._ids.write(np.ascontiguousarray(ids, dtype="<i8").data)
            self.rows += len(ids)

    def commit(self, stats: np.ndarray | None, nonfinite_ids: np.ndarray) -> None:
        """Make every appended row durable together with the statistics covering exactly them."""
        for f in (self._grads, self._ids):
            f.flush()
            os.fsync(f.fileno())
        self.record = CommitRecord(self.rows, self.record.meta, stats, np.asarray(nonfinite_ids, np.int64))
        write_record(self.dir / COMMIT, self.record)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Committed rows [start, stop) as stored (for building the final shard)."""
        count = (stop - start) * self.width
        out = np.fromfile(self.dir / GRADS, dtype=self.row_dtype, count=count, offset=start * self.row_bytes)
        if out.size != count:
            raise PartialShardError(f"{self.dir / GRADS}: rows {start}..{stop} are missing")
        return out.reshape(stop - start, self.width)

    def close(self) -> None:
        for f in (self._grads, self._ids):
            if not f.closed:
                f.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."
