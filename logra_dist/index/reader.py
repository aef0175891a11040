"""Read side of an index: every rank's shard behind one row space, validated when opened.

Rows are read through the one verified reader (`stream.ChunkStream`, the scorer's), whatever
the access: ranges, single rows, ids, chunks. Ids are read on demand (`ids.py`): a store holds
O(rows / 65536) facts per shard, never every id of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from logra_dist.config import LoGraConfig
from logra_dist.core.projection import LayerSpec
from logra_dist.index.codecs import codec_for
from logra_dist.index.format import (
    MANIFEST_FILE,
    SHARD_DIR,
    STATS_FILE,
    IndexFormatError,
    ShardAttrs,
    content_digest,
    layout_from_json,
    partial_dir,
    partial_path,
    read_manifest,
    version_problem,
)
from logra_dist.index.h5io import attr_value
from logra_dist.index.ids import IdFacts, duplicate_ids, positions_of, read_ids, scan_ids
from logra_dist.index.stream import ChunkStream
from logra_dist.index.verify import ShardInfo
from logra_dist.tracking import NULL_TRACKER, NullTracker

# Rows per chunk when `read` and `rows_for_ids` stream a range (the scorer picks its own).
READ_CHUNK_ROWS = 1 << 14


class GradientStore:
    """All shards of an index as one (N x D) float32 row space, in shard (rank) order.

    Opening checks, against the manifest, everything that would otherwise silently corrupt
    scores: a shard missing, unreadable (truncated, corrupted), incomplete, written by another
    job (config, layer layout, model, rank, world size, storage dtype), holding other ids than
    the job logged (fingerprint), a shard on disk the manifest does not list, and ids logged
    twice. Reading checks every block of rows against its checksum. Errors name the file.
    """

    tracker: NullTracker = NULL_TRACKER  # `iter_chunks` (and the scorer's stream) report read time and bytes to it

    def __init__(self, out_dir: str | Path, problems: list[str] | None = None):
        """problems=None: raise the first problem found; a list: append every problem to it and
        go on with what can still be checked (`index_problems`, what `inspect` reports)."""
        self.root = Path(out_dir)
        self._problems = problems
        manifest_path = self.root / MANIFEST_FILE
        self.manifest = read_manifest(manifest_path)
        m = self.manifest
        try:
            self.config = LoGraConfig.from_dict(m["config"])
        except (TypeError, ValueError) as e:
            raise IndexFormatError(f"{manifest_path}: invalid config: {e}") from e
        self.layout: list[LayerSpec] = layout_from_json(m["layout"])
        self.width = sum(s.width for s in self.layout)
        self.storage_dtype = self.config.storage_dtype
        self.codec = codec_for(self.storage_dtype, self.layout)
        self.shards: list[ShardInfo] = []
        self.id_facts: list[IdFacts] = []  # per shard, aligned with `shards`
        self.nonfinite_counts: list[int] = []  # per shard: samples left out (non-finite), aligned too
        offset = 0
        if not m["shards"]:
            raise IndexFormatError(f"{manifest_path}: lists no shards")
        self._check_no_strays([self.root / e["path"] for e in m["shards"]])
        for entry in m["shards"]:
            path = self.root / entry["path"]
            try:
                with self._open(path) as f:
                    facts = self._check_shard(path, f, entry)
                    n = facts.rows
                    self.shards.append(ShardInfo(path, n, offset, int(f.attrs["block_rows"]), f["block_sums"][:]))
                    nonfinite = int(f["nonfinite_ids"].shape[0])
            except IndexFormatError as e:
                self._report(e)
                continue
            self.id_facts.append(facts)
            self.nonfinite_counts.append(nonfinite)
            offset += n
        self.rows = offset
        dup, owners = duplicate_ids([(s.path, f) for s, f in zip(self.shards, self.id_facts)])
        if dup:
            self._report(
                IndexFormatError(f"{self.root}: ids logged more than once across shards, e.g. {dup} (in {owners[:4]})")
            )
        if len(self.nonfinite_counts) == len(m["shards"]) and sum(self.nonfinite_counts) != m["nonfinite_total"]:
            self._report(
                IndexFormatError(
                    f"{manifest_path}: nonfinite_total is {m['nonfinite_total']} but the shards' "
                    f"'nonfinite_ids' datasets hold {sum(self.nonfinite_counts)} ids; the manifest was altered"
                )
            )
        try:
            self._check_stats(m["layout"])
        except IndexFormatError as e:
            self._report(e)

    def _report(self, error: IndexFormatError) -> None:
        if self._problems is None:
            raise error
        self._problems.append(str(error))

    def _check_stats(self, layout: str) -> None:
        """stats.h5, when present, must be this index's: same layout, job key and shards (the
        digest of the shards it was computed from); read_stats checks its datasets' checksums."""
        path = self.root / STATS_FILE
        if not path.exists():
            return
        try:
            with h5py.File(path, "r") as f:
                got = {k: attr_value(f.attrs.get(k)) for k in ("layout", "job_key", "shards_digest")}
        except OSError as e:
            raise IndexFormatError(f"{path}: unreadable statistics (truncated or corrupted?): {e}") from e
        if got["layout"] != layout:
            raise IndexFormatError(f"{path}: statistics of another layer layout than {self.root / MANIFEST_FILE}")
        for key in ("job_key", "shards_digest"):
            if got[key] != self.manifest.get(key):
                raise IndexFormatError(
                    f"{path}: statistics of another job or other shards: its {key} is {got[key]!r}, "
                    f"{self.root / MANIFEST_FILE} records {self.manifest.get(key)!r}; re-finalize this index "
                    "(rerun the job with --resume) instead of copying stats.h5 from another"
                )

    def _check_no_strays(self, listed: list[Path]) -> None:
        folder = self.root / SHARD_DIR
        names = {p.name for p in listed}
        strays = sorted(p.name for p in folder.glob("rank-*.h5") if p.name not in names) if folder.is_dir() else []
        for stray in strays:
            self._report(
                IndexFormatError(
                    f"{folder / stray}: a shard the manifest does not list (from another "
                    f"job?); remove it or rebuild the index. Listed: {sorted(names)[:4]}"
                )
            )

    def _check_shard(self, path: Path, f: h5py.File, entry: dict) -> IdFacts:
        """The facts of this shard's ids (one bounded pass), after checking it belongs to the
        manifest's job."""
        attrs = {k: attr_value(v) for k, v in f.attrs.items()}
        problem = version_problem(attrs.get("format_version"))
        if problem:
            raise IndexFormatError(f"{path}: {problem}")
        try:
            config_rows = LoGraConfig.from_json(attrs["config"]).row_compatibility_key
        except (KeyError, ValueError) as e:
            raise IndexFormatError(f"{path}: missing or invalid config attribute ({e})") from e
        for key, value in ShardAttrs.from_manifest(self.manifest, entry["rank"]).to_dict().items():
            got = attrs.get(key)
            if key == "config":  # rows of configs that differ only in how they were logged compare
                key, got, value = "config_rows", config_rows, self.config.row_compatibility_key
            if got != value:
                raise IndexFormatError(
                    f"{path}: written by another job: its {key} is "
                    f"{str(got)[:160]!r}, the manifest's is {str(value)[:160]!r}; "
                    "shards of different runs cannot be mixed"
                )
        g, n = f["grads"], int(entry["rows"])
        if g.shape != (n, self.codec.stored_width(self.width)) or f["ids"].shape != (n,) or attrs.get("rows") != n:
            raise IndexFormatError(
                f"{path}: holds grads {g.shape} and ids {f['ids'].shape}, but the manifest "
                f"records {n} rows of width {self.width}"
            )
        if g.dtype != self.codec.h5_dtype:
            raise IndexFormatError(f"{path}: grads stored as {g.dtype}, expected {self.storage_dtype}")
        want = entry.get("nonfinite_count")  # None only in a version 3 manifest (upgrade_manifest)
        have = f["nonfinite_ids"]
        if (want is None and self.manifest["format_version"] != 3) or (want is not None and have.shape != (want,)):
            raise IndexFormatError(
                f"{path}: holds {have.shape[0]} non-finite ids, but the manifest's field 'nonfinite_count' "
                f"records {want}; the manifest or the shard was altered"
            )
        facts = scan_ids(path, f["ids"])
        if facts.digest != entry.get("ids_digest"):
            raise IndexFormatError(
                f"{path}: its ids do not match the fingerprint in the manifest (corrupted, or a shard of another run)"
            )
        block_rows = int(attrs.get("block_rows", 0))
        if block_rows < 1 or f["block_sums"].shape != (-(-n // block_rows),):
            raise IndexFormatError(f"{path}: block checksums missing or of the wrong length")
        got = content_digest(f["block_sums"][:], facts.digest, attrs.get("job_key", ""))
        if got != entry.get("content_digest"):
            raise IndexFormatError(
                f"{path}: its content digest {got!r} (block checksums, ids, job key) does not match the "
                f"manifest's field 'content_digest' {entry.get('content_digest')!r}: a shard of another "
                "job or altered; shards of different runs cannot be mixed"
            )
        return facts

    @staticmethod
    def _open(path: Path) -> h5py.File:
        if not path.exists():
            unfinished = [p.name for p in (partial_dir(path), partial_path(path)) if p.exists()]
            hint = (
                f" (unfinished {unfinished} exist: the job did not finalize; rerun it with --resume)"
                if unfinished
                else ""
            )
            raise IndexFormatError(f"{path}: shard listed in the manifest is missing{hint}")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise IndexFormatError(f"{path}: not a readable HDF5 shard (truncated or corrupted?): {e}") from e
        try:
            for name in ("grads", "ids", "block_sums", "nonfinite_ids"):
                if name not in f:
                    raise IndexFormatError(f"{path}: dataset {name!r} is missing")
            if not bool(f.attrs.get("complete", False)):
                raise IndexFormatError(f"{path}: shard is not marked complete")
        except Exception:
            f.close()
            raise
        return f

    def __len__(self) -> int:
        return self.rows

    @property
    def ids(self) -> np.ndarray:
        """Every id in row order, read now: O(N) memory, for small indexes and tests. Scale-aware
        callers use `ids_range`, `ids_at` and `rows_for_ids`."""
        return self.ids_range(0, len(self))

    def ids_range(self, lo: int, hi: int) -> np.ndarray:
        """Ids of global rows [lo, hi), read from their shards."""
        lo, hi = max(0, lo), min(len(self), hi)
        parts = [np.zeros(0, np.int64)]
        for info, facts in zip(self.shards, self.id_facts):
            a, b = max(lo, info.offset), min(hi, info.offset + info.rows)
            if a < b:
                parts.append(read_ids(info.path, facts, a - info.offset, b - info.offset))
        return np.concatenate(parts)

    @property
    def nonfinite_total(self) -> int:
        """Samples left out of the index for a non-finite gradient (every shard's count)."""
        return sum(self.nonfinite_counts)

    def nonfinite_ids(self, limit: int | None = None) -> np.ndarray:
        """Ids of the samples left out for a non-finite gradient, shard by shard in rank order,
        read from the shards now (the manifest holds only their counts); the first `limit` ones
        if given (reads no further than it needs)."""
        parts, left = [np.zeros(0, np.int64)], limit
        for info, count in zip(self.shards, self.nonfinite_counts):
            if left is not None and left <= 0:
                break
            if count:
                parts.append(read_nonfinite_ids(info.path, left))
                left = None if left is None else left - len(parts[-1])
        return np.concatenate(parts)

    def ids_at(self, positions) -> np.ndarray:
        """Ids of the given global rows (any order): runs of nearby rows are read as one range."""
        positions = np.asarray(positions, np.int64)
        out = np.empty(len(positions), np.int64)
        if not len(positions):
            return out
        order = np.argsort(positions, kind="stable")
        wanted = positions[order]
        bounds = np.array([s.offset + s.rows for s in self.shards], np.int64)
        # a new run where the gap exceeds a page of ids or a shard boundary lies between
        shard = np.searchsorted(bounds, wanted, "right")
        cut = (np.diff(wanted) > 512) | (shard[1:] != shard[:-1])
        starts = np.r_[0, np.nonzero(cut)[0] + 1]
        ends = np.r_[starts[1:], len(wanted)]
        for a, b in zip(starts.tolist(), ends.tolist()):
            lo = int(wanted[a])
            out[order[a:b]] = self.ids_range(lo, int(wanted[b - 1]) + 1)[wanted[a:b] - lo]
        return out

    def close(self) -> None:
        """Nothing to release: shards are opened per read (by the stream) and closed after."""

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the global row space as float32, crossing shard boundaries."""
        start, stop = max(0, start), min(len(self), stop)
        out = np.empty((max(0, stop - start), self.width), np.float32)

        def put(lo: int, rows: np.ndarray) -> None:
            out[lo - start : lo - start + len(rows)] = rows

        self._read_into([(start, stop)] if start < stop else [], put)
        return out

    def _read_into(self, ranges: list[tuple[int, int]], put) -> None:
        """Stream `ranges` (not counted by the tracker: these are not the scorer's reads); call
        put(first row, float32 rows) per chunk (rows valid during the call only)."""
        for lo, _, rows, _ in ChunkStream(self, ranges, READ_CHUNK_ROWS, buffers=2, tracker=NULL_TRACKER):
            put(lo, rows.numpy())

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step < 0:
                return self[np.arange(start, stop, step)]
            rows = self.read(start, stop)
            return rows[::step] if step != 1 else rows
        index = np.atleast_1d(np.asarray(key, dtype=np.int64))
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            bad = index[(index < 0) | (index >= len(self))][0]
            raise IndexError(f"row {bad} is out of range for {self.root} ({len(self)} rows)")
        return self._gather(index)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Rows at the given global positions, read in one stream over covering ranges: rows
        closer than a checksum block apart share a range (its rows are read to check it anyway)."""
        out = np.empty((len(index), self.width), np.float32)
        if not len(index):
            return out
        order = np.argsort(index, kind="stable")
        wanted = index[order]
        gap = max([s.block_rows for s in self.shards] + [1])
        cut = np.nonzero(np.diff(wanted) > gap)[0] + 1
        ranges = [(int(g[0]), int(g[-1]) + 1) for g in np.split(wanted, cut)]

        def put(lo: int, rows: np.ndarray) -> None:
            a, b = np.searchsorted(wanted, [lo, lo + len(rows)])
            out[order[a:b]] = rows[wanted[a:b] - lo]

        self._read_into(ranges, put)
        return out

    def rows_for_ids(self, ids) -> np.ndarray:
        """Rows of the given sample ids (KeyError naming the first unknown id)."""
        return self._gather(self.positions_of_ids(ids))

    def positions_of_ids(self, ids) -> np.ndarray:
        """Global row positions of the given sample ids, shard by shard (sorted ids, searchsorted:
        no table of all ids); KeyError naming the first unknown id."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        wanted, back = np.unique(ids, return_inverse=True)
        found = np.full(len(wanted), -1, np.int64)
        for info, facts in zip(self.shards, self.id_facts):
            if not len(wanted) or facts.rows == 0 or wanted[-1] < facts.lo or wanted[0] > facts.hi:
                continue
            at = positions_of(info.path, facts, wanted)
            hit = at >= 0
            found[hit] = at[hit] + info.offset
        rows = found[back.reshape(-1)]
        if (rows < 0).any():
            raise KeyError(f"sample id {int(ids[np.argmax(rows < 0)])} is not in the index {self.root}")
        return rows

    def iter_chunks(
        self, chunk_rows: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, ids, float32 rows) chunks of [start, stop), read ahead by the stream's
        thread while the caller computes on the current one. Unlike the stream's, these rows are
        the caller's to keep (copied out of its buffers); read time and bytes go to `tracker`."""
        stop = len(self) if stop is None else stop
        for lo, ids, rows, _ in ChunkStream(self, [(start, stop)] if start < stop else [], chunk_rows):
            yield lo, ids, rows.numpy().copy()


def read_nonfinite_ids(path: Path, limit: int | None = None) -> np.ndarray:
    """The ids a shard left out for a non-finite gradient (its `nonfinite_ids` dataset, in the
    order they were met), the first `limit` if given."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            dset = f["nonfinite_ids"]
            return dset[: dset.shape[0] if limit is None else min(limit, dset.shape[0])].astype(np.int64)
    except (OSError, KeyError) as e:
        raise IndexFormatError(f"{path}: dataset 'nonfinite_ids' unreadable ({e})") from e


def index_problems(out_dir: str | Path) -> list[str]:
    """Every problem for which `GradientStore(out_dir)` refuses the index (it raises the first),
    each naming its file; [] for an index it opens. A manifest it cannot read is one problem."""
    problems: list[str] = []
    try:
        GradientStore(out_dir, problems)
    except (ValueError, KeyError) as e:  # IndexFormatError, or a manifest naming an unknown codec
        problems.append(str(e))
    return problems
