"""Low-level file safety for the index: fsync, atomic JSON, HDF5 written through an error guard,
checksums.

Nothing here knows LoGra; `format`, `writer` and `reader` build on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (after a rename, so the new name survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON under `path`, durably: a temporary name, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    fsync_path(tmp)
    os.replace(tmp, path)


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes through. An I/O error (disk full, file size limit) is recorded and
    hidden from HDF5, which can crash when it closes a file whose write failed (HDF5 2.0); it is
    raised once HDF5 is done with the file (`h5_writing`)."""

    def __init__(self, path: Path):
        super().__init__()
        self._f, self.error = open(path, "w+b", buffering=0), None  # noqa: SIM115 (closed in close())

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += self._f.write(view[done:])
                return len(view)
            except OSError as e:
                self.error = e
        self._f.seek(len(view), 1)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as e:
                self.error = e
        return self._f.tell() if size is None else size

    def close(self) -> None:
        if not self._f.closed:
            if self.error is None:
                os.fsync(self._f.fileno())
            self._f.close()
        super().close()


@contextmanager
def h5_writing(tmp: Path) -> Iterator[h5py.File]:
    """A new HDF5 file at `tmp`, durable (fsynced) when the block ends; an I/O error during
    the block is raised at its end. The caller renames `tmp` into place only after that."""
    guard = _GuardedFile(tmp)
    try:
        with h5py.File(guard, "w") as f:
            yield f
    finally:
        guard.close()
    if guard.error is not None:
        raise guard.error


def row_checksums(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint64 per stored row: the sum (mod 2^64) of its bytes read as little-endian 64-bit words,
    the tail zero-padded. Any change of one bit changes it; it runs at memory speed (a CRC, or
    HDF5's fletcher32 filter, halves the read rate here). Contiguous rows of whole words are
    summed in place, into `out` if given (the scorer's stream: no copy, no allocation)."""
    n = len(rows)
    if out is None:
        out = np.empty(n, np.uint64)
    if n == 0:
        return out
    raw = np.ascontiguousarray(rows).reshape(n, -1).view(np.uint8)
    if raw.shape[1] % 8:
        padded = np.zeros((n, raw.shape[1] + 8 - raw.shape[1] % 8), np.uint8)
        padded[:, : raw.shape[1]] = raw
        raw = padded
    return np.add.reduce(raw.view("<u8"), axis=1, dtype=np.uint64, out=out)


def block_checksums(rows: np.ndarray, block_rows: int) -> np.ndarray:
    """One uint64 per block of `block_rows` rows: the sum of its rows' checksums. Being a sum, a
    block read in pieces (by a stream, at any boundaries) can be checked from the pieces."""
    sums = row_checksums(rows)
    if len(sums) == 0:
        return sums
    return np.add.reduceat(sums, np.arange(0, len(sums), block_rows)).astype(np.uint64)


def ids_digest(ids: np.ndarray) -> str:
    """96-bit fingerprint of a shard's ids, recorded in the manifest and checked on open."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()[:24]


def attr_value(value):
    return value.item() if isinstance(value, np.generic) else value
