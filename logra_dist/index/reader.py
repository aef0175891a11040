"""Read side of an index: every rank's shard behind one row space, validated when opened."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from logra_dist.config import LoGraConfig
from logra_dist.core.projection import LayerSpec
from logra_dist.index.h5io import attr_value, block_checksums, ids_digest, row_checksums
from logra_dist.index.store import (
    FORMAT_VERSION,
    SHARD_DIR,
    IndexFormatError,
    decode_rows,
    h5_dtype,
    layout_from_json,
    partial_dir,
    partial_path,
)
from logra_dist.tracking import NULL_TRACKER, NullTracker


def read_manifest(path: Path) -> dict:
    if not path.exists():
        raise IndexFormatError(
            f"{path}: missing; {path.parent} is not a finalized LoGra index (if a job "
            "was interrupted, rerun it with --resume)"
        )
    try:
        manifest = json.loads(path.read_text())
        for key in ("config", "layout", "shards", "world_size"):
            manifest[key]
    except (OSError, ValueError, KeyError) as e:
        raise IndexFormatError(f"{path}: unreadable or incomplete manifest ({e!r})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format version {manifest.get('format_version')}, this reader reads {FORMAT_VERSION}"
        )
    return manifest


@dataclass
class ShardInfo:
    path: Path
    rows: int
    offset: int  # first global row of this shard in the store's row space
    block_rows: int = 0
    block_sums: np.ndarray | None = None


class StreamCheck:
    """Checks one shard's rows against its block checksums while a stream reads them in pieces.

    A block is checked when its last row has been seen; `finish()` reads the rows a stream did
    not cover of blocks it only partly read (range ends), so every row served gets checked.
    """

    def __init__(self, info: ShardInfo):
        self.info = info
        self._open: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # block -> (sum, rows seen)

    def _block_rows(self, b: int) -> tuple[int, int]:
        size = self.info.block_rows
        return b * size, min((b + 1) * size, self.info.rows)

    def see(self, lo: int, rows: np.ndarray) -> None:
        """Stored rows lo, lo+1, ... of the shard (local indexes), just read."""
        self.see_sums(lo, row_checksums(rows))

    def see_sums(self, lo: int, sums: np.ndarray) -> None:
        """The row checksums of stored rows lo, lo+1, ... of the shard, just read. Blocks read
        whole in one call are checked at once; the others are summed up piece by piece."""
        if not len(sums):
            return
        size, hi = self.info.block_rows, lo + len(sums)
        b0, b1 = lo // size, (hi - 1) // size
        cuts = np.maximum(np.arange(b0, b1 + 1, dtype=np.int64) * size - lo, 0)
        parts = np.add.reduceat(sums, cuts, dtype=np.uint64)  # each touched block's rows here
        w0 = -(-lo // size)  # blocks [w0, w1) lie whole in [lo, hi)
        w1 = b1 + 1 if hi == self.info.rows or hi % size == 0 else b1
        done = set(range(w0, w1)) - set(self._open)  # a block begun earlier is summed up below
        if w0 < w1:
            bad = np.nonzero(parts[w0 - b0 : w1 - b0] != self.info.block_sums[w0:w1])[0]
            bad = [w0 + int(i) for i in bad if w0 + int(i) in done]
            if bad:
                self._check(bad[0], int(parts[bad[0] - b0]))
        edges = {b0, b1} | (set(range(w0, w1)) & set(self._open))
        for b in sorted(edges - done):
            a, z = max(lo, b * size), min(hi, (b + 1) * size)
            total, seen = self._open.get(b, (0, []))
            if any(a < z1 and a1 < z for a1, z1 in seen):  # read twice: check it whole at finish
                self._open[b] = (total, seen + [(-1, -1)])
                continue
            total = (total + int(parts[b - b0])) % (1 << 64)
            seen = seen + [(a, z)]
            first, last = self._block_rows(b)
            if sum(z1 - a1 for a1, z1 in seen) == last - first:
                self._open.pop(b, None)
                self._check(b, total)
            else:
                self._open[b] = (total, seen)

    @property
    def pending(self) -> bool:
        """Blocks only partly read so far: finish() must read their other rows."""
        return bool(self._open)

    def finish(self, grads: h5py.Dataset) -> None:
        for b, (total, seen) in sorted(self._open.items()):
            first, last = self._block_rows(b)
            if (-1, -1) in seen:
                total, seen = 0, []
            covered = np.zeros(last - first, bool)
            for a, z in seen:
                covered[a - first : z - first] = True
            for gap in np.split(np.nonzero(~covered)[0], np.nonzero(np.diff(np.nonzero(~covered)[0]) > 1)[0] + 1):
                if len(gap):
                    try:
                        rows = grads[first + gap[0] : first + gap[-1] + 1]
                    except OSError as e:
                        raise IndexFormatError(
                            f"{self.info.path}: rows {first + gap[0]}..{first + gap[-1] + 1} "
                            f"unreadable (corrupted?): {e}"
                        ) from e
                    total = (total + int(row_checksums(rows).sum(dtype=np.uint64))) % (1 << 64)
            self._check(b, total)
        self._open = {}

    def _check(self, b: int, total: int) -> None:
        if total != int(self.info.block_sums[b]):
            first, last = self._block_rows(b)
            raise IndexFormatError(
                f"{self.info.path}: rows {first}..{last} fail their checksum: the shard is "
                "corrupted; log those samples again"
            )


class GradientStore:
    """All shards of an index as one (N x D) float32 row space, in shard (rank) order.

    Opening checks, against the manifest, everything that would otherwise silently corrupt
    scores: a shard missing, unreadable (truncated, corrupted), incomplete, written by another
    job (config, layer layout, model, rank, world size, storage dtype), holding other ids than
    the job logged (fingerprint), a shard on disk the manifest does not list, and ids logged
    twice. Reading checks every block of rows against its checksum. Errors name the file.
    """

    tracker: NullTracker = NULL_TRACKER  # `iter_chunks` reports read time and bytes to it

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        manifest_path = self.root / "manifest.json"
        self.manifest = read_manifest(manifest_path)
        m = self.manifest
        try:
            self.config = LoGraConfig.from_dict(m["config"])
        except (TypeError, ValueError) as e:
            raise IndexFormatError(f"{manifest_path}: invalid config: {e}") from e
        self.layout: list[LayerSpec] = layout_from_json(m["layout"])
        self.width = sum(s.width for s in self.layout)
        want = {
            "layout": m["layout"],
            "config_rows": self.config.row_compatibility_key,
            "storage_dtype": self.config.storage_dtype,
            "world_size": m["world_size"],
            "model": json.dumps({k: (m.get("model") or {}).get(k) for k in ("class", "name_or_path")}, sort_keys=True),
        }
        self.storage_dtype = self.config.storage_dtype
        self.shards: list[ShardInfo] = []
        self._files: list[h5py.File] = []
        self._cache: list[tuple[int, np.ndarray] | None] = []
        self._lock = threading.Lock()
        ids, offset = [], 0
        try:
            if not m["shards"]:
                raise IndexFormatError(f"{manifest_path}: lists no shards")
            self._check_no_strays([self.root / e["path"] for e in m["shards"]])
            for entry in m["shards"]:
                path = self.root / entry["path"]
                f = self._open(path)
                self._files.append(f)
                self._cache.append(None)
                shard_ids = self._check_shard(path, f, entry, want)
                ids.append(shard_ids)
                n = len(shard_ids)
                self.shards.append(ShardInfo(path, n, offset, int(f.attrs["block_rows"]), f["block_sums"][:]))
                offset += n
        except BaseException:
            self.close()
            raise
        self.ids = np.concatenate(ids)
        uniq, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][:5].tolist()
            owners = [str(s.path.name) for s, i in zip(self.shards, ids) if np.isin(dup, i).any()]
            self.close()
            raise IndexFormatError(
                f"{self.root}: ids logged more than once across shards, e.g. {dup} (in {owners[:4]})"
            )
        self._row_of_id = None
        self._check_stats(m["layout"])

    def _check_stats(self, layout: str) -> None:
        """stats.h5, when present, must be this index's (read_stats reports a missing one)."""
        path = self.root / "stats.h5"
        if not path.exists():
            return
        try:
            with h5py.File(path, "r") as f:
                got = attr_value(f.attrs.get("layout"))
        except OSError as e:
            self.close()
            raise IndexFormatError(f"{path}: unreadable statistics (truncated or corrupted?): {e}") from e
        if got != layout:
            self.close()
            raise IndexFormatError(f"{path}: statistics of another layer layout than {self.root / 'manifest.json'}")

    def _check_no_strays(self, listed: list[Path]) -> None:
        folder = self.root / SHARD_DIR
        names = {p.name for p in listed}
        strays = sorted(p.name for p in folder.glob("rank-*.h5") if p.name not in names) if folder.is_dir() else []
        if strays:
            raise IndexFormatError(
                f"{folder / strays[0]}: a shard the manifest does not list (from another "
                f"job?); remove it or rebuild the index. Listed: {sorted(names)[:4]}"
            )

    def _check_shard(self, path: Path, f: h5py.File, entry: dict, want: dict) -> np.ndarray:
        """This shard's ids, after checking it belongs to the manifest's job."""
        attrs = {k: attr_value(v) for k, v in f.attrs.items()}
        if attrs.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{path}: format version {attrs.get('format_version')}, this reader reads {FORMAT_VERSION}"
            )
        try:
            got = dict(attrs, config_rows=LoGraConfig.from_json(attrs["config"]).row_compatibility_key)
        except (KeyError, ValueError) as e:
            raise IndexFormatError(f"{path}: missing or invalid config attribute ({e})") from e
        for key, value in {**want, "rank": entry["rank"]}.items():
            if got.get(key) != value:
                raise IndexFormatError(
                    f"{path}: written by another job: its {key} is "
                    f"{str(got.get(key))[:160]!r}, the manifest's is {str(value)[:160]!r}; "
                    "shards of different runs cannot be mixed"
                )
        g, n = f["grads"], int(entry["rows"])
        if g.shape != (n, self.width) or f["ids"].shape != (n,) or attrs.get("rows") != n:
            raise IndexFormatError(
                f"{path}: holds grads {g.shape} and ids {f['ids'].shape}, but the manifest "
                f"records {n} rows of width {self.width}"
            )
        if g.dtype != h5_dtype(self.storage_dtype):
            raise IndexFormatError(f"{path}: grads stored as {g.dtype}, expected {self.storage_dtype}")
        try:
            shard_ids = f["ids"][:]
        except OSError as e:
            raise IndexFormatError(f"{path}: ids unreadable (corrupted?): {e}") from e
        if ids_digest(shard_ids) != entry.get("ids_digest"):
            raise IndexFormatError(
                f"{path}: its ids do not match the fingerprint in the manifest (corrupted, or a shard of another run)"
            )
        block_rows = int(attrs.get("block_rows", 0))
        if block_rows < 1 or f["block_sums"].shape != (-(-n // block_rows),):
            raise IndexFormatError(f"{path}: block checksums missing or of the wrong length")
        return shard_ids

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
            for name in ("grads", "ids", "block_sums"):
                if name not in f:
                    raise IndexFormatError(f"{path}: dataset {name!r} is missing")
            if not bool(f.attrs.get("complete", False)):
                raise IndexFormatError(f"{path}: shard is not marked complete")
        except Exception:
            f.close()
            raise
        return f

    def __len__(self) -> int:
        return len(self.ids)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files, self._cache = [], []

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the global row space as float32, crossing shard boundaries."""
        parts = []
        for k, info in enumerate(self.shards):
            lo, hi = max(start, info.offset), min(stop, info.offset + info.rows)
            if lo < hi:
                parts.append(decode_rows(self._verified(k, lo - info.offset, hi - info.offset), self.storage_dtype))
        if not parts:
            return np.zeros((0, self.width), np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _verified(self, k: int, lo: int, hi: int) -> np.ndarray:
        """Stored rows [lo, hi) of shard k, read in whole checksum blocks and checked. The last
        block read is kept, so consecutive reads that split a block read (and check) it once."""
        info, b, dset = self.shards[k], self.shards[k].block_rows, self._files[k]["grads"]
        first, last = lo // b, (hi - 1) // b
        stop = min((last + 1) * b, info.rows)
        out = np.empty((stop - first * b, self.width), dset.dtype)
        with self._lock:
            cached = self._cache[k]
        done = 0
        if cached is not None and cached[0] == first:
            done = len(cached[1])
            out[:done] = cached[1]
        if first * b + done < stop:
            r0 = first * b + done
            try:
                dset.read_direct(out, np.s_[r0:stop], np.s_[done:])
            except OSError as e:
                raise IndexFormatError(f"{info.path}: rows {r0}..{stop} unreadable (corrupted?): {e}") from e
            b0 = r0 // b
            bad = np.nonzero(block_checksums(out[done:], b) != info.block_sums[b0 : last + 1])[0]
            if len(bad):
                r = (b0 + int(bad[0])) * b
                raise IndexFormatError(
                    f"{info.path}: rows {r}..{min(r + b, info.rows)} fail their checksum: "
                    "the shard is corrupted; log those samples again"
                )
            with self._lock:
                self._cache[k] = (last, out[(last - first) * b :].copy())
        return out[lo - first * b : hi - first * b]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            rows = self.read(start, stop)
            return rows[::step] if step != 1 else rows
        index = np.atleast_1d(np.asarray(key, dtype=np.int64))
        order = np.argsort(index, kind="stable")
        out = np.empty((len(index), self.width), np.float32)
        for pos in order:  # grouped reads would be faster; this path is for inspection, not scoring
            out[pos] = self.read(int(index[pos]), int(index[pos]) + 1)[0]
        return out

    def rows_for_ids(self, ids) -> np.ndarray:
        """Rows of the given sample ids (KeyError naming the first unknown id)."""
        if self._row_of_id is None:
            self._row_of_id = {int(i): r for r, i in enumerate(self.ids)}
        try:
            rows = [self._row_of_id[int(i)] for i in np.atleast_1d(ids)]
        except KeyError as e:
            raise KeyError(f"sample id {e.args[0]} is not in the index {self.root}") from None
        return self[rows]

    def iter_chunks(
        self, chunk_rows: int, start: int = 0, stop: int | None = None, prefetch: bool = True
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, ids, float32 rows) chunks of [start, stop); the next chunk is read in a
        background thread while the caller computes on the current one."""
        stop = len(self) if stop is None else stop
        bounds = [(s, min(s + chunk_rows, stop)) for s in range(start, stop, chunk_rows)]
        tracker = self.tracker
        row_bytes = (
            self.width * np.dtype(np.uint16 if self.storage_dtype == "bfloat16" else self.storage_dtype).itemsize
        )

        def timed_read(lo: int, hi: int) -> np.ndarray:
            t0 = time.perf_counter()
            rows = self.read(lo, hi)
            tracker.add_time("read", time.perf_counter() - t0)
            tracker.count(bytes_read=(hi - lo) * row_bytes)  # bytes as stored on disk
            return rows

        if not prefetch:
            for lo, hi in bounds:
                yield lo, self.ids[lo:hi], timed_read(lo, hi)
            return
        q: queue.Queue = queue.Queue(maxsize=2)
        stop_flag = threading.Event()

        def produce() -> None:
            try:
                for lo, hi in bounds:
                    if stop_flag.is_set():
                        return
                    q.put((lo, self.ids[lo:hi], timed_read(lo, hi)))
                q.put(None)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)

        thread = threading.Thread(target=produce, name="logra-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                with tracker.phase("read-wait"):  # the consumer waiting for the prefetcher
                    item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_flag.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
