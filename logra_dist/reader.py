"""Read side of an index: every rank's shard behind one row space, validated when opened."""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .config import LoGraConfig
from .projection import LayerSpec
from .store import SHARD_DIR, IndexFormatError, decode_rows, layout_from_json
from .tracking import NULL_TRACKER, NullTracker


@dataclass
class ShardInfo:
    path: Path
    rows: int
    offset: int  # first global row of this shard in the store's row space


class GradientStore:
    """All shards of an index as one (N x D) float32 row space, in shard (rank) order.

    Opening checks what would otherwise silently corrupt scores: shards listed in the manifest
    but missing, incomplete or truncated shards, shards written with another config or layer
    layout, and ids logged twice.
    """

    tracker: NullTracker = NULL_TRACKER  # `iter_chunks` reports read time and bytes to it

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        manifest_path = self.root / "manifest.json"
        if not manifest_path.exists():
            raise IndexFormatError(f"{manifest_path}: missing; {self.root} is not a finalized LoGra index")
        self.manifest = json.loads(manifest_path.read_text())
        self.shards: list[ShardInfo] = []
        self._files: list[h5py.File] = []
        ids, offset = [], 0
        reference: tuple[str, str] | None = None
        for entry in self.manifest["shards"]:
            path = self.root / entry["path"]
            f = self._open(path)
            key = (f.attrs["layout"], json.dumps(LoGraConfig.from_json(f.attrs["config"]).row_compatibility_key))
            if reference is None:
                reference = key
                self.storage_dtype = str(f.attrs["storage_dtype"])
            elif key != reference:
                raise IndexFormatError(f"{path}: written with a different config or layer layout than "
                                  f"{self.shards[0].path}; shards of different runs cannot be mixed")
            n = f["grads"].shape[0]
            if n != entry["rows"] or f["ids"].shape[0] != n:
                raise IndexFormatError(f"{path}: holds {n} rows but the manifest records {entry['rows']}")
            ids.append(f["ids"][:])
            self.shards.append(ShardInfo(path, n, offset))
            self._files.append(f)
            offset += n
        if reference is None:
            raise IndexFormatError(f"{manifest_path}: lists no shards")
        self.layout: list[LayerSpec] = layout_from_json(reference[0])
        self.config = LoGraConfig.from_json(self._files[0].attrs["config"])
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        self.width = sum(s.width for s in self.layout)
        uniq, counts = np.unique(self.ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][:5].tolist()
            raise IndexFormatError(f"{self.root}: ids logged more than once across shards, e.g. {dup}")
        self._row_of_id = None

    @staticmethod
    def _open(path: Path) -> h5py.File:
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            hint = " (an unfinished .partial shard exists: the job did not finalize)" if partial.exists() else ""
            raise IndexFormatError(f"{path}: shard listed in the manifest is missing{hint}")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise IndexFormatError(f"{path}: not a readable HDF5 shard (truncated or corrupted?): {e}") from e
        try:
            for name in ("grads", "ids"):
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
        self._files = []

    def __enter__(self) -> "GradientStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the global row space as float32, crossing shard boundaries."""
        parts = []
        for info, f in zip(self.shards, self._files):
            lo, hi = max(start, info.offset), min(stop, info.offset + info.rows)
            if lo < hi:
                try:
                    parts.append(decode_rows(f["grads"][lo - info.offset:hi - info.offset], self.storage_dtype))
                except OSError as e:
                    raise IndexFormatError(f"{info.path}: rows {lo - info.offset}..{hi - info.offset} unreadable: {e}") from e
        if not parts:
            return np.zeros((0, self.width), np.float32)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

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

    def iter_chunks(self, chunk_rows: int, start: int = 0, stop: int | None = None,
                    prefetch: bool = True) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first row, ids, float32 rows) chunks of [start, stop); the next chunk is read in a
        background thread while the caller computes on the current one."""
        stop = len(self) if stop is None else stop
        bounds = [(s, min(s + chunk_rows, stop)) for s in range(start, stop, chunk_rows)]
        tracker = self.tracker
        row_bytes = self.width * np.dtype(np.uint16 if self.storage_dtype == "bfloat16" else self.storage_dtype).itemsize

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
