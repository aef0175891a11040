"""A rank's unfinished shard: append-only raw files plus an atomically replaced commit record.

Why not append to the HDF5 shard directly: HDF5 keeps its metadata (dataset extents, chunk
index) in a cache that is written at flush/close, so a process killed while it writes can leave
a file HDF5 cannot open, and every row in it is lost. Here nothing that was committed is ever
rewritten:

    shards/rank-00003.partial/grads.bin   rows, appended (raw bytes, storage dtype)
    shards/rank-00003.partial/ids.bin     their sample ids, appended (int64 little endian)
    shards/rank-00003.partial/stats-00000007.npz  the statistics over exactly the committed rows
    shards/rank-00003.partial/commit.npz  rows committed, the name of their statistics file

`commit()` flushes and fsyncs the two data files, writes the statistics to a new file (a fresh
name: the one the current record names is never touched), then writes the record to a temporary
file, fsyncs it and renames it over the old one (`os.replace`, atomic on POSIX), and only then
deletes the previous statistics file. A kill at any point leaves either the old record or the
new one, each with its statistics file, and the data files hold at least as many rows as the
record says; rows past it are cut off when the shard is reopened (and logged again), statistics
files it does not name are deleted. Files are read with `allow_pickle=False`: a partial from
elsewhere is only parsed. The statistics are kept out of the small record so that reading a
record (attach, inspect) never reads them, and so that finalize can hard-link the last ones
beside the shard instead of copying them (`writer.write_shard`).

At finalize the last statistics go beside the complete shard as `rank-00003.stats.npz` (renamed
into place before the shard): the finalize's one all-reduce needs every rank's statistics, so an
interrupted finalize is re-run from them. Once `manifest.json` exists every rank deletes its own:
a finished index holds per-sample data and the global `stats.h5` only.

`PartialRows` reads a partial's committed rows (read-only: `inspect` looks at a live job through
it); `PartialShard`, the writer's side, extends it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logra_dist.index.codecs import RowCodec, codec_for
from logra_dist.index.format import another_job, layout_from_json, rank_stats_path
from logra_dist.index.h5io import fsync_path

GRADS, IDS, COMMIT = "grads.bin", "ids.bin", "commit.npz"
_STATS_FILE = re.compile(r"^stats-\d+\.npz(\.tmp)?$")


class PartialShardError(ValueError):
    """A partial shard that cannot be resumed; the message names the file and the problem."""


@dataclass
class CommitRecord:
    """What a resumed rank restarts from: rows kept, their statistics, ids found non-finite."""

    rows: int
    meta: dict  # layout, config, storage dtype, rank, world size, model: must match to resume
    stats_file: str | None = None  # file in the partial with the statistics over `rows` (write_stats)
    nonfinite_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seq: int = 0  # commits so far: numbers the next statistics file

    @property
    def has_stats(self) -> bool:
        return self.stats_file is not None


def write_record(path: Path, record: CommitRecord) -> None:
    """Write `commit.npz` atomically: a reader sees the old record or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    meta = np.frombuffer(json.dumps(record.meta, sort_keys=True).encode(), np.uint8)
    arrays = {
        "rows": np.array(record.rows, np.int64),
        "meta": meta,
        "seq": np.array(record.seq, np.int64),
        "nonfinite_ids": np.asarray(record.nonfinite_ids, np.int64),
    }
    if record.stats_file is not None:
        arrays["stats_file"] = np.array(record.stats_file)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_record(path: Path) -> CommitRecord:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "stats" in z.files:  # pre-release records held the statistics inline: not resumable
                raise ValueError("a record of a pre-release version (statistics inline)")
            meta = json.loads(z["meta"].tobytes().decode())
            stats_file = str(z["stats_file"][()]) if "stats_file" in z.files else None
            if stats_file is not None and not _STATS_FILE.match(stats_file):
                raise ValueError(f"bad statistics file name {stats_file!r}")
            return CommitRecord(
                int(z["rows"]),
                meta,
                stats_file,
                z["nonfinite_ids"].astype(np.int64),
                int(z["seq"]),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise PartialShardError(
            f"{path}: unreadable commit record ({e}); delete {path.parent} to log this rank again from the start"
        ) from e


def write_stats(path: Path, parts: list[np.ndarray], rows: int, meta: dict | None = None) -> None:
    """Statistics (`Curvature.snapshot` parts) over `rows` rows, durable under `path` once this
    returns (temporary name, fsync, rename; the caller fsyncs the folder). Written part by part
    in the parts' own dtypes: no float64 copy of the whole. `meta`: how they were made (JSON,
    e.g. the Logger's "fisher_estimator"), kept with them so a resumed job adds only its kind."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        arrays = {f"part_{i}": p for i, p in enumerate(parts)}
        np.savez(f, rows=np.array(rows, np.int64), meta=np.array(json.dumps(meta or {})), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_stats(path: Path) -> tuple[int, list[np.ndarray], dict]:
    """(rows covered, parts, meta) of a `write_stats` file (meta {} in files written before it)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            count = sum(1 for name in z.files if name.startswith("part_"))
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            return int(z["rows"]), [z[f"part_{i}"] for i in range(count)], meta
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise PartialShardError(f"{path}: unreadable statistics ({e})") from e


def read_rank_stats(shard: Path, rows: int) -> tuple[list[np.ndarray], dict] | None:
    """(parts, meta) of the statistics beside the complete shard `shard` of `rows` rows (None:
    there are none)."""
    path = rank_stats_path(shard)
    if not path.exists():
        return None
    covered, parts, meta = read_stats(path)
    if covered != rows:
        raise PartialShardError(
            f"{path}: statistics over {covered} rows, but {shard.name} holds {rows}: they belong to different jobs"
        )
    return parts, meta


def _link_or_copy(src: Path, dst: Path) -> None:
    """`src` under the name `dst`, atomically and durably: a hard link (no copy of up to GBs;
    the partial holding `src` is deleted later) or, where links fail, a copy."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        fsync_path(tmp)
    os.replace(tmp, dst)
    fsync_path(dst.parent)


@dataclass
class ResumeState:
    """What an earlier, interrupted run of this rank left: its committed ids, the statistics over
    exactly them (`Curvature.snapshot` parts) and how they were made (`write_stats` meta), its
    non-finite ids, whether its shard is complete."""

    ids: np.ndarray
    stats: list[np.ndarray] | None
    nonfinite_ids: np.ndarray
    complete: bool = False
    stats_meta: dict = field(default_factory=dict)


class PartialRows:
    """The committed rows of a partial shard, read-only: rows and ids as of its commit record
    (a live job's too: rows past the record are ignored). `open` reads the record."""

    def __init__(self, directory: Path, record: CommitRecord, row_dtype: np.dtype, width: int):
        self.dir, self.record, self.row_dtype, self.width = directory, record, np.dtype(row_dtype), width
        self.row_bytes = self.row_dtype.itemsize * width

    @classmethod
    def open(cls, directory: Path) -> PartialRows:
        """PartialShardError for an unreadable record, FileNotFoundError for none (being created)."""
        record = read_record(directory / COMMIT)
        return cls(directory, record, np.dtype(record.meta.get("row_dtype", "<f2")), int(record.meta.get("width", 0)))

    @property
    def rows_on_disk(self) -> int:
        path = self.dir / GRADS
        return path.stat().st_size // max(1, self.row_bytes) if path.exists() else 0

    @property
    def committed(self) -> int:
        """Rows that count: those of the record (fewer if the data file was damaged)."""
        return min(self.record.rows, self.rows_on_disk)

    def committed_ids(self) -> np.ndarray:
        return np.fromfile(self.dir / IDS, dtype="<i8", count=self.committed)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Committed rows [start, stop) as stored (for building the final shard)."""
        count = (stop - start) * self.width
        out = np.fromfile(self.dir / GRADS, dtype=self.row_dtype, count=count, offset=start * self.row_bytes)
        if out.size != count:
            raise PartialShardError(f"{self.dir / GRADS}: rows {start}..{stop} are missing")
        return out.reshape(stop - start, self.width)

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Stored rows at the given positions (each < `committed`)."""
        grads = np.memmap(self.dir / GRADS, dtype=self.row_dtype, mode="r", shape=(self.committed, self.width))
        return np.array(grads[positions])

    @property
    def codec(self) -> RowCodec:
        """The codec the rows were stored with (ConfigError if the record names an unknown one)."""
        meta = self.record.meta
        return codec_for(str(meta.get("storage_dtype")), layout_from_json(meta["layout"]) if "layout" in meta else [])

    def decoded_at(self, positions: np.ndarray) -> np.ndarray:
        """float32 rows at the given committed positions."""
        return self.codec.decode(self.rows_at(positions)).numpy()


class PartialShard(PartialRows):
    """Append-only writer over one rank's partial directory (single thread: the shard writer)."""

    def __init__(self, directory: Path, row_dtype: np.dtype, width: int, meta: dict):
        super().__init__(directory, CommitRecord(0, {}), row_dtype, width)
        meta = {**meta, "row_dtype": self.row_dtype.str, "width": width}
        if (directory / COMMIT).exists():
            self.record = read_record(directory / COMMIT)
            self._check(meta)
            self._truncate(self.record.rows)
            self._drop_stray_stats()
        else:  # fresh, or killed before its first record: nothing in it counts
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            for name in (GRADS, IDS):
                (directory / name).touch()
            self.record = CommitRecord(0, meta)
            write_record(directory / COMMIT, self.record)
        self.rows = self.record.rows
        self._grads = open(directory / GRADS, "ab")  # noqa: SIM115 (closed in close())
        self._ids = open(directory / IDS, "ab")  # noqa: SIM115 (closed in close())

    def _check(self, meta: dict) -> None:
        problem = another_job(self.record.meta, meta, "in the interrupted job")
        if problem:
            raise PartialShardError(
                f"{self.dir}: cannot resume, it was {problem}; resume with the original "
                f"settings, or delete {self.dir.parent} to start over"
            )

    def _truncate(self, rows: int) -> None:
        """Cut rows written after the last commit (they are logged again)."""
        for name, size in ((GRADS, rows * self.row_bytes), (IDS, rows * 8)):
            path = self.dir / name
            have = path.stat().st_size if path.exists() else -1
            if have < size:
                raise PartialShardError(
                    f"{path}: holds {max(have, 0)} bytes but the commit record "
                    f"covers {size} ({rows} rows): the partial shard was damaged; "
                    f"delete {self.dir} to log this rank again"
                )
            os.truncate(path, size)

    def _drop_stray_stats(self) -> None:
        """Statistics files the record does not name: written by a commit killed before its record."""
        for name in os.listdir(self.dir):
            if _STATS_FILE.match(name) and name != self.record.stats_file:
                (self.dir / name).unlink()

    @property
    def stats_path(self) -> Path | None:
        return None if self.record.stats_file is None else self.dir / self.record.stats_file

    def stats(self) -> tuple[list[np.ndarray], dict] | None:
        """(parts, meta) of the committed statistics (`Curvature.snapshot` parts, `write_stats`
        meta), None if none were committed."""
        if self.stats_path is None:
            return None
        rows, parts, meta = read_stats(self.stats_path)
        if rows != self.record.rows:
            raise PartialShardError(
                f"{self.stats_path}: statistics over {rows} rows, the commit record says "
                f"{self.record.rows}; delete {self.dir} to log this rank again"
            )
        return parts, meta

    def publish_stats(self, dst: Path) -> None:
        """The committed statistics under `dst` (`rank_stats_path`), durable; none: no file."""
        if self.stats_path is not None:
            _link_or_copy(self.stats_path, dst)
        else:
            dst.unlink(missing_ok=True)

    def append(self, rows: np.ndarray, ids: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.row_dtype)
        if rows.shape != (len(ids), self.width):
            raise ValueError(f"{self.dir}: rows of shape {rows.shape} for {len(ids)} ids and width {self.width}")
        if len(ids):
            self._grads.write(rows.data)
            self._ids.write(np.ascontiguousarray(ids, dtype="<i8").data)
            self.rows += len(ids)

    def commit(self, stats: list[np.ndarray] | None, nonfinite_ids: np.ndarray, meta: dict | None = None) -> None:
        """Make every appended row durable together with the statistics covering exactly them
        (and `meta`, how they were made)."""
        for f in (self._grads, self._ids):
            f.flush()
            os.fsync(f.fileno())
        seq, old = self.record.seq + 1, self.stats_path
        name = None
        if stats is not None:
            name = f"stats-{seq:08d}.npz"
            write_stats(self.dir / name, stats, self.rows, meta)
        self.record = CommitRecord(self.rows, self.record.meta, name, np.asarray(nonfinite_ids, np.int64), seq)
        write_record(self.dir / COMMIT, self.record)  # fsyncs the folder: the new statistics file too
        if old is not None and old.name != name:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        for f in (self._grads, self._ids):
            if not f.closed:
                f.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
