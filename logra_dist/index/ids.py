"""A shard's sample ids, read on demand: no rank holds every id of the corpus.

Opening a store makes one bounded pass over each shard's ids (`scan_ids`: chunks of ID_CHUNK,
hashed as they go) and keeps only per-shard facts (`IdFacts`: digest, min, max, whether they
strictly increase, the first id of every chunk, a strided sample): O(rows / ID_CHUNK) per shard.
Ids are then read where needed: ranges for the stream (`read_ids`, os.pread on the dataset's
plain bytes, no HDF5 lock), positions of given ids (`positions_of`: per shard, vectorized
searchsorted; a sorted shard reads only the chunks that can hold them). The duplicate check
across shards (`duplicate_ids`) never concatenates the corpus's ids: shards that strictly
increase over disjoint ranges cannot share an id (a fact of the scan, O(shards)); otherwise the
id space is cut at quantiles of the samples into windows of about ID_WINDOW ids each, checked one
at a time (sorted shards by a sequential cursor: one pass; unsorted shards rescanned per window).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from logra_dist.index.format import IndexFormatError

ID_CHUNK = 1 << 16  # ids per read (512 KiB)
ID_WINDOW = 1 << 22  # ids held at once by the duplicate check (32 MiB, plus its sort)
SAMPLES_PER_SHARD = 1024  # strided sample kept per shard: the windows' quantiles


@dataclass
class IdFacts:
    """What one bounded pass over a shard's ids proves (`scan_ids`)."""

    digest: str
    rows: int
    lo: int = 0  # min id (rows > 0)
    hi: int = -1  # max id
    increasing: bool = True  # strictly: no id twice within the shard
    fence: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # first id of each ID_CHUNK
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # strided sample of ids
    runs: np.ndarray | None = None  # [first id, byte offset] of the dataset's plain bytes; None: via h5py


def plain_id_runs(dset: h5py.Dataset) -> np.ndarray | None:
    """(runs, 2) [first element, byte offset] where `ids` lies as plain little-endian int64
    bytes in order (contiguous, or unfiltered chunks), else None (then read through h5py)."""
    from logra_dist.index.stream import plain_runs  # the stream's own layout probe

    if dset.dtype != np.dtype("<i8"):
        return None
    return plain_runs(dset, 8)


def scan_ids(path: Path, dset: h5py.Dataset) -> IdFacts:
    """The digest (`h5io.ids_digest` of the whole array, computed chunk by chunk) and the facts."""
    n = int(dset.shape[0])
    h = hashlib.sha256()
    facts = IdFacts("", n, runs=plain_id_runs(dset))
    stride = max(1, n // SAMPLES_PER_SHARD)
    fence, sample, prev = [], [], None
    for a in range(0, n, ID_CHUNK):
        try:
            ids = np.ascontiguousarray(dset[a : min(n, a + ID_CHUNK)], dtype="<i8")
        except OSError as e:
            raise IndexFormatError(f"{path}: ids unreadable (corrupted?): {e}") from e
        h.update(ids.data)  # no copy
        facts.lo = int(ids.min()) if a == 0 else min(facts.lo, int(ids.min()))
        facts.hi = max(facts.hi, int(ids.max())) if a else int(ids.max())
        if facts.increasing:
            facts.increasing = bool((ids[1:] > ids[:-1]).all()) and (prev is None or int(ids[0]) > prev)
        prev = int(ids[-1])
        fence.append(int(ids[0]))
        sample.append(ids[(-a) % stride :: stride])
    facts.digest = h.hexdigest()[:24]
    facts.fence = np.asarray(fence, np.int64)
    facts.sample = np.concatenate(sample) if sample else np.zeros(0, np.int64)
    return facts


def read_ids(path: Path, facts: IdFacts, lo: int, hi: int) -> np.ndarray:
    """Ids [lo, hi) of one shard (positions within the shard)."""
    out = np.empty(max(0, hi - lo), np.int64)
    if hi <= lo:
        return out
    try:
        if facts.runs is None:
            with h5py.File(path, "r") as f:
                f["ids"].read_direct(out, np.s_[lo:hi])
            return out
        starts, offsets = facts.runs[:, 0], facts.runs[:, 1]
        view, done = memoryview(out.view(np.uint8)), 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while lo + done // 8 < hi:
                at = lo + done // 8
                r = int(np.searchsorted(starts, at, side="right")) - 1
                end = hi if r + 1 == len(starts) else min(hi, int(starts[r + 1]))
                got = os.preadv(fd, [view[done : (end - lo) * 8]], int(offsets[r]) + (at - int(starts[r])) * 8)
                if got == 0:
                    raise OSError(f"end of file reading ids {at}..{end} (truncated?)")
                done += got
        finally:
            os.close(fd)
    except OSError as e:
        raise IndexFormatError(f"{path}: ids {lo}..{hi} unreadable (corrupted?): {e}") from e
    return out


def positions_of(path: Path, facts: IdFacts, wanted: np.ndarray) -> np.ndarray:
    """Shard positions of the sorted unique ids `wanted` (-1 where absent), in their order.
    A strictly increasing shard reads only the chunks whose id range can hold them; any other
    is scanned chunk by chunk (memory O(ID_CHUNK + len(wanted)))."""
    out = np.full(len(wanted), -1, np.int64)
    if not len(wanted) or not facts.rows:
        return out
    if facts.increasing:
        chunks = np.unique(np.clip(np.searchsorted(facts.fence, wanted, side="right") - 1, 0, None))
    else:
        chunks = np.arange(len(facts.fence))
    for c in chunks.tolist():
        a = c * ID_CHUNK
        ids = read_ids(path, facts, a, min(facts.rows, a + ID_CHUNK))
        at = np.searchsorted(wanted, ids)
        hit = at < len(wanted)
        hit[hit] = wanted[at[hit]] == ids[hit]
        out[at[hit]] = a + np.nonzero(hit)[0]
    return out


class _Cursor:
    """Sequential reader of a strictly increasing shard's ids, window by window."""

    def __init__(self, path: Path, facts: IdFacts):
        self.path, self.facts, self.pos, self.buf = path, facts, 0, np.zeros(0, np.int64)

    def below(self, edge: int) -> np.ndarray:
        parts = []
        while True:
            if not len(self.buf):
                if self.pos >= self.facts.rows:
                    break
                self.buf = read_ids(self.path, self.facts, self.pos, min(self.facts.rows, self.pos + ID_CHUNK))
                self.pos += len(self.buf)
            k = int(np.searchsorted(self.buf, edge))
            parts.append(self.buf[:k])
            self.buf = self.buf[k:]
            if len(self.buf):
                break
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _windows(shards: list[tuple[Path, IdFacts]]) -> np.ndarray:
    """Window edges (ascending, last = max id + 1) at weighted quantiles of the shards' samples."""
    total = sum(f.rows for _, f in shards)
    top = max(f.hi for _, f in shards) + 1
    count = -(-total // ID_WINDOW)
    if count <= 1:
        return np.array([top], np.int64)
    values = np.concatenate([f.sample for _, f in shards])
    weights = np.concatenate([np.full(len(f.sample), f.rows / max(1, len(f.sample))) for _, f in shards])
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    cuts = np.searchsorted(cum, np.arange(1, count) * total / count)
    edges = np.unique(values[order][np.clip(cuts, 0, len(values) - 1)])
    return np.append(edges[edges < top], top)


def duplicate_ids(shards: list[tuple[Path, IdFacts]], limit: int = 5) -> tuple[list[int], list[str]]:
    """(up to `limit` ids held more than once, within or across shards; the files holding them)."""
    shards = [(p, f) for p, f in shards if f.rows]
    if all(f.increasing for _, f in shards):
        spans = sorted((f.lo, f.hi) for _, f in shards)
        if all(b[0] > a[1] for a, b in itertools.pairwise(spans)):
            return [], []  # strictly increasing within, disjoint between: no id twice
    if not shards:
        return [], []
    cursors = [_Cursor(p, f) if f.increasing else None for p, f in shards]
    start = min(f.lo for _, f in shards)
    for edge in _windows(shards).tolist():
        parts = []
        for (path, facts), cursor in zip(shards, cursors):
            if cursor is not None:
                parts.append(cursor.below(edge))
            elif facts.lo < edge and facts.hi >= start:
                got = [
                    ids[(ids >= start) & (ids < edge)]
                    for a in range(0, facts.rows, ID_CHUNK)
                    for ids in [read_ids(path, facts, a, min(facts.rows, a + ID_CHUNK))]
                ]
                parts.append(np.concatenate(got))
            else:
                parts.append(np.zeros(0, np.int64))
        window = np.sort(np.concatenate(parts))
        dup = np.unique(window[1:][window[1:] == window[:-1]])[:limit]
        if len(dup):
            owners = [p.name for (p, _), ids in zip(shards, parts) if np.isin(dup, ids).any()]
            return dup.tolist(), owners
        start = edge
    return [], []
