"""On-disk index: per-rank HDF5 shards of projected gradients, `stats.h5`, `manifest.json`.

Write side: `ShardWriter` appends rows from a background thread so disk writes overlap the next
batch. A shard lives under a temporary name (`rank-NNNNN.h5.partial`) until the job finalizes,
then is renamed, so a reader never sees a half-written shard under its final name. Every flush
records how many rows are committed together with the statistics that cover exactly those rows,
which is what makes a killed job resumable without loss or duplication.

Read side: `GradientStore` opens every shard of an index, checks that they agree, and serves rows
as float32 by slice, by id, or as prefetched chunks. HDF5 has no bfloat16: bf16 rows are stored
as their uint16 bit pattern with a `storage_dtype` attribute saying so. Nothing is pickled.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from .projection import LayerSpec

SHARD_DIR = "shards"
FORMAT_VERSION = 1
# Target bytes per HDF5 chunk of `grads`. HDF5 allocates a shard's last chunk whole, so a shard
# carries up to chunk_rows - 1 rows of padding: 256 KiB keeps that under 3% of a 1024-row shard
# at D = 3840 fp16 (4 MiB chunks: 2.1x for 256 rows), and reads of 1024-row slices stayed within
# measurement noise of 4 MiB chunks (bench/storage.py, bench/README.md).
CHUNK_BYTES = 1 << 18


class IndexFormatError(ValueError):
    """A problem with an index on disk; the message names the file and what is wrong."""


def shard_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"rank-{rank:05d}.h5"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def layout_to_json(specs: list[LayerSpec]) -> str:
    offset, rows = 0, []
    for s in specs:
        rows.append({"name": s.name, "kind": s.kind, "d_in": s.d_in, "d_out": s.d_out,
                     "k_in": s.k_in, "k_out": s.k_out, "offset": offset})
        offset += s.width
    return json.dumps(rows)


def layout_from_json(text: str) -> list[LayerSpec]:
    return [LayerSpec(r["name"], r["kind"], r["d_in"], r["d_out"], r["k_in"], r["k_out"]) for r in json.loads(text)]


def encode_rows(rows: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """Torch rows -> the numpy array stored on disk (bf16 as its uint16 bit pattern)."""
    rows = rows.detach().cpu()
    if storage_dtype == "bfloat16":
        return rows.to(torch.bfloat16).view(torch.uint16).numpy()
    return rows.to(getattr(torch, storage_dtype)).numpy()


def decode_rows(arr: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Stored array -> float32."""
    if storage_dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def _h5_dtype(storage_dtype: str) -> np.dtype:
    return np.dtype(np.uint16) if storage_dtype == "bfloat16" else np.dtype(storage_dtype)


@dataclass
class ResumeState:
    """What a previous, interrupted run of this rank left: its committed ids and statistics."""

    ids: np.ndarray
    stats_flat: np.ndarray | None


class ShardWriter:
    """Appends (rows, ids) to one rank's shard from a background thread."""

    def __init__(self, path: Path, specs: list[LayerSpec], config_json: str, storage_dtype: str,
                 rank: int, world_size: int, flush_rows: int = 1024, queue_size: int = 4,
                 resume: bool = False, asynchronous: bool = True):
        self.final_path, self.path = path, partial_path(path)
        self.storage_dtype, self.flush_rows = storage_dtype, flush_rows
        self.width = sum(s.width for s in specs)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resume_state = ResumeState(np.zeros(0, np.int64), None)
        if path.exists():
            raise IndexFormatError(f"{path}: a complete shard already exists; refusing to overwrite it "
                              "(choose another --out or delete the index)")
        if resume and self.path.exists():
            self.file = h5py.File(self.path, "r+")
            self._check_resumable(specs, config_json)
        else:
            self.file = h5py.File(self.path, "w")
            self._create(specs, config_json, rank, world_size)
        self.rows_committed = int(self.file.attrs["rows_committed"])
        self.bytes_written = 0
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = None
        if asynchronous:
            self._thread = threading.Thread(target=self._run, name=f"logra-writer-{rank}", daemon=True)
            self._thread.start()

    def _create(self, specs, config_json, rank, world_size) -> None:
        f = self.file
        row_bytes = max(1, self.width * _h5_dtype(self.storage_dtype).itemsize)
        chunk = (max(1, min(self.flush_rows, CHUNK_BYTES // row_bytes)), self.width)
        f.create_dataset("grads", shape=(0, self.width), maxshape=(None, self.width),
                         dtype=_h5_dtype(self.storage_dtype), chunks=chunk)
        f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(max(chunk[0], 1024),))
        f.attrs.update({"format_version": FORMAT_VERSION, "layout": layout_to_json(specs),
                        "config": config_json, "storage_dtype": self.storage_dtype, "rank": rank,
                        "world_size": world_size, "complete": False, "rows_committed": 0})
        f.flush()

    def _check_resumable(self, specs, config_json) -> None:
        f = self.file
        if f.attrs.get("layout") != layout_to_json(specs) or f.attrs.get("config") != config_json:
            raise IndexFormatError(f"{self.path}: cannot resume, the partial shard was written with another "
                              "config or layer layout")
        n = int(f.attrs["rows_committed"])
        f["grads"].resize(n, axis=0)  # discard rows written after the last commit point
        f["ids"].resize(n, axis=0)
        stats = f["partial_stats"][()] if "partial_stats" in f else None
        self.resume_state = ResumeState(f["ids"][:], stats)

    # -- producer side (main thread) -------------------------------------------------------
    def append(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        self._put(("rows", encode_rows(rows, self.storage_dtype), ids.detach().cpu().numpy().astype(np.int64)))

    def commit(self, stats_flat: np.ndarray | None) -> None:
        """Write everything appended so far, with the statistics that cover exactly those rows."""
        self._put(("commit", stats_flat, None))

    def close(self, complete: bool) -> Path:
        """Drain, mark complete if asked, and (if complete) rename to the final name."""
        self._put(("close", complete, None))
        if self._thread is not None:
            self._thread.join()
        self._raise_if_failed()
        if complete:
            os.replace(self.path, self.final_path)
            return self.final_path
        return self.path

    def _put(self, item) -> None:
        self._raise_if_failed()
        if self._thread is None:
            self._handle(item)
            return
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise IndexFormatError(f"{self.path}: background write failed: {self._error!r}") from self._error

    # -- consumer side (writer thread) -----------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if self._error is None:
                    self._handle(item)
            except BaseException as e:  # surfaced in the main thread at the next call
                self._error = e
            if item[0] == "close":
                return

    def _handle(self, item) -> None:
        kind, a, b = item
        if kind == "rows":
            self._buffer.append((a, b))
            if sum(len(ids) for _, ids in self._buffer) >= self.flush_rows:
                self._write_buffer()
        elif kind == "commit":
            self._write_buffer()
            if a is not None:
                if "partial_stats" in self.file:
                    del self.file["partial_stats"]
                self.file.create_dataset("partial_stats", data=a)
            self.file.attrs["rows_committed"] = self.file["ids"].shape[0]
            self.file.flush()
        elif kind == "close":
            self._write_buffer()
            self.rows_total = int(self.file["ids"].shape[0])
            try:
                if a:
                    self.file.attrs["rows_committed"] = self.file["ids"].shape[0]
                    if "partial_stats" in self.file:
                        del self.file["partial_stats"]
                    self.file.attrs["complete"] = True
            finally:
                self.file.close()

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        rows = np.concatenate([r for r, _ in self._buffer])
        ids = np.concatenate([i for _, i in self._buffer])
        self._buffer = []
        g, i = self.file["grads"], self.file["ids"]
        n = g.shape[0]
        g.resize(n + len(ids), axis=0)
        i.resize(n + len(ids), axis=0)
        g[n:] = rows
        i[n:] = ids
        self.bytes_written += rows.nbytes + ids.nbytes


# ---------------------------------------------------------------------------------------------
# manifest and statistics


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def write_stats(path: Path, kind: str, damping: float, state: dict[str, np.ndarray],
                attrs: dict[str, Any]) -> None:
    """stats.h5: one group per layer holding the eigendecomposition (and PCA projections)."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"hessian": kind, "damping": damping, **attrs})
        for key, arr in state.items():
            f.create_dataset(key, data=arr)
    os.replace(tmp, path)


def read_stats(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not path.exists():
        raise IndexFormatError(f"{path}: missing; the index was not finalized (Logger.finalize)")
    state: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                state[name] = obj[()]

        f.visititems(visit)
    return attrs, state
