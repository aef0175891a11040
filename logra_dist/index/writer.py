"""Write side of an index: per-rank HDF5 shards of projected gradients (format: `format.py`).

`ShardWriter` appends rows from a background thread so disk writes overlap the next
batch. While a job runs, a rank's rows live in a partial shard (`shards/rank-NNNNN.partial/`,
append-only raw files plus an atomically replaced commit record: see `partial.py`); at finalize
the committed rows become the HDF5 shard, built as `rank-NNNNN.h5.partial` and renamed to
`rank-NNNNN.h5`, so a reader never sees a half-written shard under its final name. A shard holds
`grads`, `ids`, per-block checksums of `grads` (`block_sums`), its non-finite ids, and its job's
identity (config, layout, model, rank, world size) as attributes. The rank's local statistics
(to re-run an interrupted finalize) sit beside it until the manifest exists: `partial.py`.

Rows are stored by the shard's row codec (`codecs.py`: one fixed-size record per row, named by
the `storage_dtype` attribute). Read side: `reader.GradientStore`. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from logra_dist.core.projection import LayerSpec
from logra_dist.index.codecs import codec_for
from logra_dist.index.format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    IndexFormatError,
    Manifest,
    ShardAttrs,
    another_job,
    job_identity,
    partial_dir,
    partial_path,
    rank_stats_path,
    shard_content_digest,
    shard_path,
)
from logra_dist.index.h5io import attr_value, block_checksums, fsync_path, h5_writing, ids_digest, write_json_atomic
from logra_dist.index.partial import COMMIT, PartialShard, PartialShardError, ResumeState, read_rank_stats
from logra_dist.index.signals import received

# Target bytes per HDF5 chunk of `grads`. HDF5 allocates a shard's last chunk whole, so a shard
# carries up to chunk_rows - 1 rows of padding: 256 KiB keeps that under 3% of a 1024-row shard
# at D = 3840 fp16 (4 MiB chunks: 2.1x for 256 rows), and reads of 1024-row slices stayed within
# measurement noise of 4 MiB chunks (bench/storage.py, bench/README.md).
CHUNK_BYTES = 1 << 18
ABANDON_WAIT_S = 5.0  # after SIGINT/SIGTERM, how long close() waits for a commit being written


def chunk_rows_for(row_bytes: int, flush_rows: int) -> int:
    return max(1, min(flush_rows, CHUNK_BYTES // max(1, row_bytes)))


def write_shard(path: Path, partial: PartialShard, attrs: dict[str, Any], chunk_rows: int) -> str:
    """Build the final HDF5 shard from a partial's committed rows under a temporary name, then
    rename it into place, after its statistics (`rank_stats_path`); the partial is kept until
    then, so a kill here loses nothing. Returns the ids digest."""
    tmp = partial_path(path)
    n, width, record = partial.record.rows, partial.width, partial.record
    ids = partial.committed_ids()
    digest = ids_digest(ids)
    with h5_writing(tmp) as f:
        g = f.create_dataset(
            "grads", shape=(n, width), maxshape=(None, width), dtype=partial.row_dtype, chunks=(chunk_rows, width)
        )
        sums = np.zeros((n + chunk_rows - 1) // chunk_rows, np.uint64)
        step = chunk_rows * max(1, (64 << 20) // max(1, chunk_rows * partial.row_bytes))  # ~64 MiB copies
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            rows = partial.read_rows(lo, hi)
            g[lo:hi] = rows
            sums[lo // chunk_rows : (hi + chunk_rows - 1) // chunk_rows] = block_checksums(rows, chunk_rows)
        f.create_dataset("ids", data=ids, maxshape=(None,), chunks=(max(1, min(max(n, 1), 1 << 16)),))
        f.create_dataset("block_sums", data=sums)
        f.create_dataset("nonfinite_ids", data=record.nonfinite_ids.astype(np.int64))
        f.attrs.update(
            {
                **attrs,
                "format_version": FORMAT_VERSION,
                "rows": n,
                "block_rows": chunk_rows,
                "ids_digest": digest,
                "complete": True,
            }
        )
    partial.publish_stats(rank_stats_path(path))
    os.replace(tmp, path)
    fsync_path(path.parent)
    return digest


class ShardWriter:
    """Appends (rows, ids) to one rank's partial shard from a background thread; `close(True)`
    builds the final HDF5 shard. With resume=True it continues the rank's partial shard (or
    adopts its already complete shard); see `partial.py` for why this survives any kill."""

    write_seconds = 0.0  # time spent handling writes, commits and the close (observability)
    last_commit_seconds = 0.0  # the writer's time for its latest commit (statistics file + fsyncs)
    _commits_put = _commits_done = 0
    _abandon = False  # interrupted: the writer thread drops what is queued and ends

    def __init__(
        self,
        path: Path,
        specs: list[LayerSpec],
        attrs: ShardAttrs,
        flush_rows: int = 1024,
        queue_size: int = 4,
        resume: bool = False,
        asynchronous: bool = True,
    ):
        self.final_path, self.path = path, partial_dir(path)
        self.flush_rows = flush_rows
        self.codec = codec_for(attrs.storage_dtype, specs)
        self.width = sum(s.width for s in specs)
        self.attrs = attrs.to_dict()
        self.bytes_written, self.ids_digest = 0, ""
        self.partial: PartialShard | None = None
        self.complete, self._closed = False, False
        self._thread = None
        self._error: BaseException | None = None
        if path.exists():
            if not resume:
                raise IndexFormatError(
                    f"{path}: a complete shard already exists; refusing to overwrite it "
                    "(choose another --out, delete the index, or pass --resume)"
                )
            self.resume_state, self.ids_digest = self._adopt_complete()
            self.rows_total, self.complete = len(self.resume_state.ids), True
            shutil.rmtree(self.path, ignore_errors=True)  # killed after the rename: leftover partial
            return
        if (self.path / COMMIT).exists() and not resume:
            raise IndexFormatError(
                f"{self.path}: an unfinished shard of an earlier job exists; pass "
                "resume=True (--resume) to continue it, or delete it"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.partial = PartialShard(self.path, self.codec.h5_dtype, self.codec.stored_width(self.width), self.attrs)
        except PartialShardError as e:
            raise IndexFormatError(str(e)) from e
        except OSError as e:
            raise IndexFormatError(f"{self.path}: cannot write the partial shard: {e!r}") from e
        try:
            stats, meta = self.partial.stats() or (None, {})
        except PartialShardError as e:
            raise IndexFormatError(str(e)) from e
        ids, nonfinite = self.partial.committed_ids(), self.partial.record.nonfinite_ids
        self.resume_state = ResumeState(ids, stats, nonfinite, stats_meta=meta)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        if asynchronous:
            self._thread = threading.Thread(target=self._run, name=f"logra-writer-{attrs.rank}", daemon=True)
            self._thread.start()

    def _adopt_complete(self) -> tuple[ResumeState, str]:
        problem = check_shard_attrs(self.final_path, self.attrs)
        if problem:
            raise IndexFormatError(f"{self.final_path}: cannot resume, {problem}")
        with h5py.File(self.final_path, "r") as f:
            state = ResumeState(f["ids"][:], None, f["nonfinite_ids"][:], complete=True)
            digest = str(f.attrs["ids_digest"])
        try:
            state.stats, state.stats_meta = read_rank_stats(self.final_path, len(state.ids)) or (None, {})
        except PartialShardError as e:
            raise IndexFormatError(f"{e}; cannot re-run the finalize (delete the index to log again)") from e
        return state, digest

    # -- producer side (main thread) -------------------------------------------------------
    def append(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        if self.complete:
            raise IndexFormatError(
                f"{self.final_path}: this rank's shard is already complete (resumed "
                "job): skip the ids in Logger.done_ids"
            )
        self._put(("rows", self.codec.encode(rows), ids.detach().cpu().numpy().astype(np.int64)))

    @property
    def commits_pending(self) -> int:
        """Commits queued or being written (the Logger waits for them before taking another)."""
        return self._commits_put - self._commits_done

    def commit(
        self,
        stats: list[np.ndarray] | None,
        nonfinite_ids=(),
        released: threading.Event | None = None,
        meta: dict | None = None,
    ) -> None:
        """Make everything appended so far durable, with the statistics covering exactly it
        (parts left unchanged until `released` is set, once written or failed: `Curvature.lend`)
        and `meta`, how they were made (`partial.write_stats`)."""
        if self.complete:
            return
        self._commits_put += 1
        try:
            self._put(("commit", (stats, np.asarray(nonfinite_ids, np.int64), meta), released))
        except BaseException:
            if released is not None:
                released.set()
            raise

    def close(
        self, complete: bool, stats: list[np.ndarray] | None = None, nonfinite_ids=(), meta: dict | None = None
    ) -> Path:
        """complete=True: commit, build the final shard, return its path (raises if any write
        failed); `stats` may be views of live tensors, as this waits for the writer.
        complete=False: stop writing and keep the partial shard as of its last commit (never
        raises: it runs on error paths); after SIGINT/SIGTERM (`signals.received`) the queued
        rows and commits are dropped instead of written, as a kill would."""
        if self.complete or self._closed:
            return self.final_path if self.complete else self.path
        if not complete:
            self._closed = True
            self._stop()
            return self.path
        self.commit(stats, nonfinite_ids, meta=meta)
        self._put(("stop", None, None))
        self._closed = True
        if self._thread is not None:
            self._thread.join()  # interruptible; the thread never touches HDF5
        self._raise_if_failed()
        # The shard is built here, in the calling thread, so that a signal stops it between two
        # HDF5 calls: a writer thread left holding h5py's lock hangs the interpreter's exit.
        start = time.perf_counter()
        try:
            self._build()
        except Exception as e:
            self._error = e
            self._raise_if_failed()
        finally:
            self.write_seconds += time.perf_counter() - start
            self.partial.close()
        self.complete = True
        return self.final_path

    def _build(self) -> None:
        self.rows_total = self.partial.rows
        chunk = chunk_rows_for(self.codec.bytes_per_row(self.width), self.flush_rows)
        self.ids_digest = write_shard(self.final_path, self.partial, self.attrs, chunk)
        self.partial.remove()

    def _stop(self) -> None:
        if self._thread is None:
            self.partial.close()
            return
        if received():  # interrupted: drop what is queued; a commit being written ends within seconds
            self._abandon = True
            self._thread.join(ABANDON_WAIT_S)  # a commit still running after that is left to the kill-safe record
            return
        self._queue.put(("close", False, None))  # after an error the thread still drains the queue
        self._thread.join()

    def _put(self, item) -> None:
        self._raise_if_failed()
        if self._thread is None:
            try:
                self._timed_handle(item)
            except BaseException as e:
                self._error = e
                if item[0] == "close":
                    self.partial.close()
                raise IndexFormatError(
                    f"{self.path}: write failed: {e!r}; the shard stays resumable from "
                    "its last commit (fix the cause, rerun with --resume)"
                ) from e
            return
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise IndexFormatError(
                f"{self.path}: write failed: {self._error!r}; the shard stays resumable "
                "from its last commit (fix the cause, rerun with --resume)"
            ) from self._error

    # -- consumer side (writer thread) -----------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._abandon:
                    break
                continue
            try:
                if self._error is None and not self._abandon:
                    self._timed_handle(item)
            except BaseException as e:  # surfaced in the main thread at the next call
                self._error = e
            finally:
                if item[0] == "commit" and item[2] is not None:
                    item[2].set()  # even after an error: the caller may wait for it
            if item[0] == "stop":
                return  # the calling thread builds the shard (close)
            if item[0] == "close":
                break
        self.partial.close()

    def _timed_handle(self, item) -> None:
        start = time.perf_counter()
        try:
            self._handle(item)
        finally:
            self.write_seconds += time.perf_counter() - start

    def _handle(self, item) -> None:
        kind, a, b = item
        if kind == "rows":
            self.partial.append(a, b)
            self.bytes_written += a.nbytes + b.nbytes
        elif kind == "commit":
            start = time.perf_counter()
            try:
                self.partial.commit(*a)
                if b is not None:
                    b.set()
            finally:
                self.last_commit_seconds = time.perf_counter() - start
                self._commits_done += 1
        elif kind == "close":
            self.rows_total = self.partial.rows
            self.partial.close()


def write_index(
    out_dir: str | Path,
    specs: list[LayerSpec],
    config_json: str,
    shards: list[Iterable[tuple[Any, Any]]],
    model: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An index from precomputed rows, in one process: for tests, benchmarks and tools. `shards`:
    per rank, an iterable of (ids, rows) blocks. Shards and manifest are exactly what a logging
    job writes (`Manifest.build`, as the Logger's; no statistics: samples_in_statistics 0, no
    engine); no stats.h5 (format.write_stats adds one). Returns the manifest."""
    out_dir = Path(out_dir)
    config = json.loads(config_json)
    rows, digests, contents = [], [], []
    for rank, blocks in enumerate(shards):
        identity = job_identity(model, metadata)
        attrs = ShardAttrs.for_job(
            specs, config_json, config["storage_dtype"], rank, len(shards), model, identity=identity
        )
        w = ShardWriter(shard_path(out_dir, rank), specs, attrs, flush_rows=config["flush_rows"], asynchronous=False)
        for ids, block in blocks:
            w.append(torch.as_tensor(np.asarray(block)), torch.as_tensor(np.asarray(ids), dtype=torch.int64))
        w.close(complete=True)
        rows.append(w.rows_total)
        digests.append(w.ids_digest)
        contents.append(shard_content_digest(shard_path(out_dir, rank)))
    manifest = Manifest.build(
        config=config,
        specs=specs,
        rows_per_rank=rows,
        digests=digests,
        model=model,
        metadata=metadata,
        content_digests=contents,
    ).to_dict()
    write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    return manifest


def check_shard_attrs(path: Path, want: dict[str, Any]) -> str | None:
    """Why the complete shard at `path` does not belong to the job described by `want` (None if
    it does). Used when resuming; the reader checks shards against the manifest the same way."""
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            names = set(f.keys())
    except OSError as e:
        return f"not a readable HDF5 shard (truncated or corrupted?): {e}"
    if not attrs.get("complete", False) or not {"grads", "ids", "nonfinite_ids"} <= names:
        return "the shard is incomplete"
    problem = another_job({k: attr_value(v) for k, v in attrs.items()}, want, "in the shard")
    return f"it was {problem}" if problem else None
