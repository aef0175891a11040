"""A shard's rows and the block checksums every row read is verified against.

`StreamCheck` verifies rows read in pieces at any boundaries (the one row reader: `stream.py`);
`ShardInfo` is what it needs of a shard. Shared by the reader and the stream, below both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from logra_dist.index.format import IndexFormatError
from logra_dist.index.h5io import row_checksums


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
