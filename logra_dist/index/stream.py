"""The one row reader: training rows at memory speed, raw reads into reused buffers, in a thread.

Every read of a finalized index goes through `ChunkStream`: the scorer's stream, and
`GradientStore.read` / `[]` / `rows_for_ids` / `iter_chunks`. It keeps a small ring of float32
buffers filled by a background thread. A shard's rows are unfiltered HDF5 chunks of whole rows,
so they lie in the file as plain bytes (in a few runs of consecutive chunks): the thread reads
them with `os.preadv` (no HDF5 call, no lock held while the GEMM runs) in cache-sized pieces, and
checksums and decodes each piece to float32 (the shard's row codec, `codecs.py`) while it is hot
in cache, so the stored bytes cross memory once. A shard laid out any other way (filters,
another byte order) is read through HDF5 instead. Rows are only valid until the next iteration:
score them, do not keep them. `side(start, stop)` reads companion data of the same rows (the
self-influence cache) in the same thread: h5py serializes all HDF5 calls behind one lock, so a
small read in the main thread would wait for the current large read to finish.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch

from logra_dist.index.codecs import RowCodec
from logra_dist.index.format import IndexFormatError
from logra_dist.index.h5io import row_checksums
from logra_dist.index.partition import Ranges
from logra_dist.index.verify import ShardInfo, StreamCheck
from logra_dist.tracking import NullTracker

PIECE_BYTES = 512 << 10  # read + checksum + widen unit: stays in a core's L2 cache
IO_PIECE_BYTES = 4 << 20  # read + checksum unit when rows are kept as stored (fewer calls)
# Records of at least this many bytes that are not whole 64-bit words (int8 rows: D + 4 L bytes)
# are read one iovec per row into zero-padded rows of whole words, so the checksum sums them in
# place; packed back to back they would need a padded copy of every piece (h5io.row_checksums).
PADDED_ROW_MIN_BYTES = 256
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


class RowSpace(Protocol):
    """What the stream reads: shards behind one row space (`reader.GradientStore`)."""

    root: Path
    width: int
    codec: RowCodec
    shards: list[ShardInfo]
    tracker: NullTracker

    def ids_range(self, lo: int, hi: int) -> np.ndarray: ...


_KNOWN_RUNS: weakref.WeakKeyDictionary[RowSpace, dict] = weakref.WeakKeyDictionary()


def plain_runs(dset: h5py.Dataset, itemsize: int) -> np.ndarray | None:
    """(runs, 2) [first row, byte offset] of the file ranges holding `dset`'s rows (or, 1-D, its
    elements) as plain
    little-endian bytes in row order, or None when they are not stored that way (filters, a
    chunk shape cutting rows, unallocated chunks, another byte order)."""
    dcpl, ftype = dset.id.get_create_plist(), dset.id.get_type()
    if (
        dset.ndim not in (1, 2)
        or not hasattr(dset.id, "chunk_iter")
        or dcpl.get_nfilters()
        or ftype.get_size() != itemsize
        or sys.byteorder != "little"
        or ftype.get_order() != h5py.h5t.ORDER_LE
        or not hasattr(os, "preadv")
    ):
        return None
    n, width = dset.shape if dset.ndim == 2 else (dset.shape[0], 1)
    if n == 0:
        return np.zeros((0, 2), np.int64)
    if dset.chunks is None:
        offset = dset.id.get_offset()
        return None if offset is None else np.array([[0, offset]], np.int64)
    rows = dset.chunks[0]
    if dset.chunks[1:] != dset.shape[1:] or dset.id.get_num_chunks() != -(-n // rows):
        return None
    found: list[tuple[int, int, int]] = []
    dset.id.chunk_iter(lambda c: found.append((c.chunk_offset[0], c.byte_offset, c.size)))
    found.sort()
    size = rows * width * itemsize
    starts, offsets, sizes = (np.array(v, np.int64) for v in zip(*found))
    if (starts != np.arange(len(found)) * rows).any() or (sizes != size).any():
        return None
    new_run = np.r_[True, offsets[1:] != offsets[:-1] + size]
    return np.stack([starts[new_run], offsets[new_run]], 1)


class _Source:
    """One shard's rows, read with preadv where they are plain bytes, else through h5py.
    `known` caches plain_runs per shard path for the store's lifetime (the shards are final)."""

    def __init__(self, info: ShardInfo, itemsize: int, row_bytes: int, known: dict[str, np.ndarray | None]):
        self.info, self.row_bytes, self.fd, self._file = info, row_bytes, None, None
        try:
            key = str(info.path)
            if key not in known:
                known[key] = plain_runs(self.dset, itemsize)
            self.runs = known[key]
            if self.runs is not None:  # plain lists: bisect and int arithmetic per read, no numpy calls
                self.run_rows, self.run_bytes = self.runs[:, 0].tolist(), self.runs[:, 1].tolist()
                self.fd = os.open(info.path, os.O_RDONLY)
        except BaseException:
            self.close()
            raise

    @property
    def dset(self) -> h5py.Dataset:
        """The shard's grads through HDF5, opened on first use (fallback reads, range ends)."""
        if self._file is None:
            try:
                self._file = h5py.File(self.info.path, "r")
            except OSError as e:
                raise IndexFormatError(
                    f"{self.info.path}: not a readable HDF5 shard (truncated or corrupted?): {e}"
                ) from e
        return self._file["grads"]

    def _located(self, row: int) -> tuple[int, float]:
        """(file offset of stored row `row`, first row after its run of contiguous chunks; inf
        for the last run)."""
        r = bisect_right(self.run_rows, row) - 1
        end = math.inf if r + 1 == len(self.run_rows) else self.run_rows[r + 1]
        return self.run_bytes[r] + (row - self.run_rows[r]) * self.row_bytes, end

    def read(self, lo: int, hi: int, dst: np.ndarray, view: memoryview) -> None:
        """Stored rows [lo, hi) of the shard into dst (C-contiguous, hi - lo rows; `view`: its bytes)."""
        try:
            if self.runs is None:
                self.dset.read_direct(dst, np.s_[lo:hi], np.s_[0 : hi - lo])
                return
            rb, done, want = self.row_bytes, 0, (hi - lo) * self.row_bytes
            while done < want:  # one preadv per run of chunks crossed; more only on short reads
                row, within = divmod(done, rb)
                pos, run_end = self._located(lo + row)
                stop = min(want, (run_end - lo) * rb)
                pos += within
                got = os.preadv(self.fd, [view[done:stop]], pos)
                if got == 0:
                    raise OSError(f"end of file at byte {pos} (truncated?)")
                done += got
        except OSError as e:
            raise IndexFormatError(f"{self.info.path}: rows {lo}..{hi} unreadable: {e}") from e

    def read_rows(self, lo: int, hi: int, dst: np.ndarray, rows: list[memoryview]) -> None:
        """Stored rows [lo, hi) of the shard, row i into rows[i] (row_bytes each: the rows of a
        padded piece; `dst`: the same rows as an array, for the HDF5 fallback): one preadv per
        run of chunks crossed (at most IOV_MAX rows each); more only on short reads."""
        try:
            if self.runs is None:
                dst[: hi - lo] = self.dset[lo:hi]
                return
            rb, i, n = self.row_bytes, 0, hi - lo
            while i < n:
                pos, run_end = self._located(lo + i)
                end = min(n, run_end - lo, i + IOV_MAX)
                full, part = divmod(os.preadv(self.fd, rows[i:end], pos), rb)
                if full == 0 and part == 0:
                    raise OSError(f"end of file at byte {pos} (truncated?)")
                i += full
                while part:  # a short read ended inside row i: finish that row
                    got = os.preadv(self.fd, [rows[i][part:]], pos + full * rb + part)
                    if got == 0:
                        raise OSError(f"end of file at byte {pos + full * rb + part} (truncated?)")
                    part = (part + got) % rb
                    i += part == 0
        except OSError as e:
            raise IndexFormatError(f"{self.info.path}: rows {lo}..{hi} unreadable: {e}") from e

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        if self._file is not None:
            self._file.close()


class ChunkStream:
    """(start, ids, float32 rows, side data or None) chunks over the given row ranges (ascending,
    disjoint) of a store. decode=False yields the rows as stored instead (numpy records of the
    codec's `h5_dtype`; bfloat16 as its uint16 bits), still checked against the checksums: for
    copying them, or for timing the I/O alone. `tracker`: where read time and bytes go (default
    the store's)."""

    def __init__(
        self,
        store: RowSpace,
        ranges: Ranges,
        chunk_rows: int,
        buffers: int = 3,
        side: Callable[[int, int], Any] | None = None,
        decode: bool = True,
        tracker: NullTracker | None = None,
    ):
        self.store, self.chunk_rows, self.side, self.decode = store, chunk_rows, side, decode
        self.tracker = store.tracker if tracker is None else tracker
        self.bounds = [(s, min(s + chunk_rows, hi)) for lo, hi in ranges for s in range(lo, hi, chunk_rows)]
        self.n_buffers = max(2, buffers)
        self.codec = store.codec
        self.stage_dtype = self.codec.h5_dtype  # as stored: bf16 as its uint16 bits
        self.stored_width = self.codec.stored_width(store.width)
        self.row_bytes = self.codec.bytes_per_row(store.width)
        self.piece_rows = max(1, PIECE_BYTES // max(1, self.row_bytes))  # read, checked, decoded
        self.io_rows = max(1, IO_PIECE_BYTES // max(1, self.row_bytes))  # read and checked in place
        # decoded pieces whose records are not whole words: read into zero-padded rows (PADDED_ROW_MIN_BYTES)
        self.padded = (
            decode and not self.codec.passthrough and self.row_bytes % 8 != 0 and self.row_bytes >= PADDED_ROW_MIN_BYTES
        )

    def _read(self, files: list[_Source], lo: int, hi: int, dest: tuple[np.ndarray | None, torch.Tensor]) -> None:
        """Rows [lo, hi) of the global row space into dest (stored rows, float32 rows), crossing
        shard boundaries, each checked against its shard's block checksums (verify.StreamCheck,
        one per iteration). Pieces to decode pass through a small buffer, hot in cache."""
        stage, out = dest
        rows = out.numpy() if self.codec.passthrough else stage
        if rows is not None:
            piece_rows, target = self.io_rows, (rows, memoryview(rows.reshape(-1).view(np.uint8)))
        else:
            piece_rows, target = self.piece_rows, self._piece
        sums, rb, decode = self._sums[: hi - lo], self.row_bytes, self.codec.decode
        for src, check in zip(files, self._checks):
            a, b = max(lo, src.info.offset), min(hi, src.info.offset + src.info.rows)
            for p in range(a, b, piece_rows):
                q = min(b, p + piece_rows)
                if self.padded:  # rows padded to whole words: checksummed in place, decoded from the view
                    piece = self._piece[0][: q - p]
                    src.read_rows(p - src.info.offset, q - src.info.offset, piece, self._row_views)
                    row_checksums(self._padded[: q - p], out=sums[p - lo : q - lo])
                    decode(piece, out[p - lo : q - lo])
                    continue
                start = p - lo if rows is not None else 0
                piece = target[0][start : start + q - p]
                src.read(p - src.info.offset, q - src.info.offset, piece, target[1][start * rb : (start + q - p) * rb])
                row_checksums(piece, out=sums[p - lo : q - lo])
                if rows is None:
                    decode(piece, out[p - lo : q - lo])
            if a < b:
                check.see_sums(a - src.info.offset, sums[a - lo : b - lo])

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, Any, Any]]:
        if not self.bounds:
            return
        width, rows = self.store.width, min(self.chunk_rows, max(hi - lo for lo, hi in self.bounds))
        free: queue.Queue = queue.Queue()
        passthrough = self.codec.passthrough
        keep_stored = not self.decode and not passthrough
        for _ in range(min(self.n_buffers, len(self.bounds))):
            free.put(
                (
                    np.empty((rows, self.stored_width), self.stage_dtype) if keep_stored else None,
                    torch.empty(rows, width) if self.decode or passthrough else None,
                )
            )
        if self.padded:  # each row its own run of bytes, zeros after it up to a whole word
            self._padded = np.zeros((self.piece_rows, -(-self.row_bytes // 8) * 8), np.uint8)
            stage = self._padded[:, : self.row_bytes]
            self._row_views = [memoryview(row) for row in stage]
            self._piece = (stage.view(self.stage_dtype), None)
        else:
            piece = np.empty((self.piece_rows, self.stored_width), self.stage_dtype)
            self._piece = (piece, memoryview(piece.reshape(-1).view(np.uint8)))
        self._sums = np.empty(rows, np.uint64)
        first, last = self.bounds[0][0], self.bounds[-1][1]
        shards = [s for s in self.store.shards if s.offset < last and s.offset + s.rows > first]
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        tracker = self.tracker

        def produce() -> None:
            files: list[_Source] = []
            try:
                known = _KNOWN_RUNS.setdefault(self.store, {})
                for s in shards:
                    files.append(_Source(s, self.stage_dtype.itemsize, self.row_bytes, known))
                self._checks = [StreamCheck(s) for s in shards]
                for lo, hi in self.bounds:
                    item = None
                    while item is None and not stop.is_set():
                        with contextlib.suppress(queue.Empty):
                            item = free.get(timeout=0.1)
                    if stop.is_set():
                        return
                    t0 = time.perf_counter()
                    self._read(files, lo, hi, item)
                    tracker.add_time("read", time.perf_counter() - t0)
                    tracker.count(bytes_read=(hi - lo) * self.row_bytes)  # bytes as stored on disk
                    ids = self.store.ids_range(lo, hi)  # read here too: no id is held for the whole store
                    ready.put((lo, hi, item, ids, None if self.side is None else self.side(lo, hi)))
                for check, src in zip(self._checks, files):  # blocks the ranges only partly covered
                    if check.pending:
                        check.finish(src.dset)
                ready.put(None)
            except BaseException as e:  # re-raised in the consumer
                ready.put(e)
            finally:
                for src in files:
                    src.close()

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
                lo, hi, item, ids, side = got
                stage, out = item
                rows = out[: hi - lo] if self.decode else (stage if stage is not None else out.numpy())[: hi - lo]
                yield lo, ids, rows, side
                free.put(item)
        finally:
            stop.set()
            thread.join()


def gather_stored(store: RowSpace, shard: int, positions: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Stored rows of one shard at sorted local `positions`, each checked against its own
    checksum `expected` (row_checksums of the stored row, e.g. recorded by `ann build` from a
    verified read): the ANN re-rank reads only its candidates, not their whole checksum blocks.
    Plain bytes are read with one `preadv` per row straight into the output (the chunk runs are
    the store's cached ones): scattered rows have no batched read call short of io_uring, and
    per row this is 5x faster than gathering through memory maps of the chunk runs (6400 rows
    of 1040 bytes from a 5 GB shard: 0.012 s against 0.06 s warm, bench/README.md "Scale").
    Any other layout through one HDF5 point selection (`_Source` opens the file once for both)."""
    info = store.shards[shard]
    dtype, stored_width = store.codec.h5_dtype, store.codec.stored_width(store.width)
    out = np.empty((len(positions), stored_width), dtype)
    if not len(positions):
        return out
    try:
        src = _Source(info, dtype.itemsize, out.strides[0], _KNOWN_RUNS.setdefault(store, {}))
        try:
            if src.runs is None:
                out[:] = src.dset[positions]
            else:
                run_of = np.searchsorted(src.runs[:, 0], positions, side="right") - 1
                offsets = (src.runs[run_of, 1] + (positions - src.runs[run_of, 0]) * out.strides[0]).tolist()
                got = [os.preadv(src.fd, [row], at) for row, at in zip(out, offsets)]
                if min(got) < out.strides[0]:
                    raise ValueError(f"a row at byte {offsets[got.index(min(got))]} is cut short")
        finally:
            src.close()
    except IndexFormatError:
        raise
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"{info.path}: rows unreadable (truncated or corrupted?): {e}") from e
    bad = np.nonzero(row_checksums(out) != expected)[0]
    if len(bad):
        raise IndexFormatError(
            f"{info.path}: row {int(positions[bad[0]])} fails its checksum ({len(bad)} of the "
            f"{len(positions)} rows read): the shard is corrupted or changed since `ann build`"
        )
    return out
