"""Streaming training rows for scoring at memory speed: raw reads into reused buffers, in a thread.

`GradientStore.iter_chunks` returns fresh float32 arrays decoded by numpy; for scoring that is
the bottleneck (float16 -> float32 through numpy runs at ~0.3 GB/s here, and every fresh 60 MB
array page-faults). This reader keeps a small ring of buffers: a background thread reads the
stored dtype straight into a staging array (`read_direct`, no allocation), widens it into a
float32 tensor with torch (vectorized), and hands it over; the consumer's previous buffer goes
back to the ring when it asks for the next chunk. Rows are therefore only valid until the next
iteration: score them, do not keep them. `side(start, stop)` reads companion data of the same
rows (the self-influence cache) in the same thread: h5py serializes all HDF5 calls behind one
lock, so a small read in the main thread would wait for the current large read to finish.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

import h5py
import numpy as np
import torch

from .partition import Ranges
from .reader import GradientStore, StreamCheck
from .config import STORAGE_DTYPES
from .store import IndexFormatError, h5_dtype


class ChunkStream:
    """(start, ids, float32 rows, side data or None) chunks over the given row ranges of a store."""

    def __init__(self, store: GradientStore, ranges: Ranges, chunk_rows: int, buffers: int = 3,
                 side: Callable[[int, int], Any] | None = None):
        self.store, self.chunk_rows, self.side = store, chunk_rows, side
        self.bounds = [(s, min(s + chunk_rows, hi)) for lo, hi in ranges for s in range(lo, hi, chunk_rows)]
        self.n_buffers = max(2, buffers)
        self.storage = store.storage_dtype
        if self.storage not in STORAGE_DTYPES:
            raise IndexFormatError(f"{store.root}: unknown storage dtype {self.storage!r}")
        self.stage_dtype = h5_dtype(self.storage)  # as stored: bf16 as its uint16 bits

    def _read(self, files: list[h5py.File], lo: int, hi: int, stage: np.ndarray) -> None:
        """Rows [lo, hi) of the global row space into stage[:hi - lo], crossing shard boundaries,
        each checked against its shard's block checksums (reader.StreamCheck, one per iteration)."""
        for info, f, check in zip(self.store.shards, files, self._checks):
            a, b = max(lo, info.offset), min(hi, info.offset + info.rows)
            if a < b:
                try:
                    f["grads"].read_direct(stage, np.s_[a - info.offset:b - info.offset], np.s_[a - lo:b - lo])
                except OSError as e:
                    raise IndexFormatError(f"{info.path}: rows {a - info.offset}..{b - info.offset} unreadable: {e}") from e
                check.see(a - info.offset, stage[a - lo:b - lo])

    def _widen(self, stage: np.ndarray, out: torch.Tensor, n: int) -> None:
        src = torch.from_numpy(stage[:n])
        if self.storage == "bfloat16":
            src = src.view(torch.bfloat16)
        out[:n].copy_(src)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, torch.Tensor, Any]]:
        if not self.bounds:
            return
        width, rows = self.store.width, min(self.chunk_rows, max(hi - lo for lo, hi in self.bounds))
        free: queue.Queue = queue.Queue()
        for _ in range(self.n_buffers):
            free.put((np.empty((rows, width), self.stage_dtype), torch.empty(rows, width)))
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        tracker = self.store.tracker
        row_bytes = width * self.stage_dtype.itemsize

        def produce() -> None:
            files = [h5py.File(s.path, "r") for s in self.store.shards]
            self._checks = [StreamCheck(s) for s in self.store.shards]
            try:
                for lo, hi in self.bounds:
                    item = None
                    while item is None and not stop.is_set():
                        try:
                            item = free.get(timeout=0.1)
                        except queue.Empty:
                            pass
                    if stop.is_set():
                        return
                    stage, out = item
                    t0 = time.perf_counter()
                    if self.storage == "float32":
                        self._read(files, lo, hi, out.numpy())
                    else:
                        self._read(files, lo, hi, stage)
                        self._widen(stage, out, hi - lo)
                    tracker.add_time("read", time.perf_counter() - t0)
                    tracker.count(bytes_read=(hi - lo) * row_bytes)  # bytes as stored on disk
                    ready.put((lo, hi, item, None if self.side is None else self.side(lo, hi)))
                for check, f in zip(self._checks, files):  # blocks the ranges only partly covered
                    check.finish(f["grads"])
                ready.put(None)
            except BaseException as e:  # re-raised in the consumer
                ready.put(e)
            finally:
                for f in files:
                    f.close()

        thread = threading.Thread(target=produce, name="logra-score-stream", daemon=True)
        thread.start()
        try:
            while True:
                with tracker.phase("read-wait"):  # the consumer waiting for the reader thread
                    got = ready.get()
                if got is None:
                    return
                if isinstance(got, BaseException):
                    raise got
                lo, hi, item, side = got
                yield lo, self.store.ids[lo:hi], item[1][:hi - lo], side
                free.put(item)
        finally:
            stop.set()
            thread.join()
