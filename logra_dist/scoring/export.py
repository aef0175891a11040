"""Exports for small cases: the full score matrix and training self-influence, as HDF5 files.

The score matrix (`score --export-matrix FILE.h5`) is queries x training rows float32; the CLI
refuses it above MATRIX_LIMIT_BYTES unless --force, since every rank holds a chunk's full matrix
(`Scorer.scores`). Self-influence (`logra-dist selfinf INDEX --out FILE.h5`) is the (N, L)
per-layer g^T H^-1 g of every training row (`Scorer.train_self_influence`) and its row sums.
Only rank 0 writes; files appear atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

MATRIX_LIMIT_BYTES = 2 << 30  # 2 GiB of float32 scores: beyond it, --force


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_matrix_size(n_queries: int, n_rows: int, force: bool) -> None:
    need = 4 * n_queries * n_rows
    if need > MATRIX_LIMIT_BYTES and not force:
        raise ValueError(
            f"--export-matrix: {n_queries} queries x {n_rows} training rows is {_size(need)} of float32 scores "
            f"(limit {_size(MATRIX_LIMIT_BYTES)}: a query chunk's matrix is held on every rank); use fewer "
            "queries, --topk/--bottomk instead, or --force"
        )


class MatrixWriter:
    """FILE.h5: scores (n_q, N) float32 grown one query chunk at a time, query_ids (n_q,) and
    train_ids (N,) (the columns, in index store order); attrs mode, damping, index."""

    def __init__(self, path: str | Path, train_ids: np.ndarray, attrs: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.f = h5py.File(self.tmp, "w")
        n = len(train_ids)
        self.f.create_dataset("train_ids", data=np.asarray(train_ids, np.int64))
        self.f.create_dataset(
            "scores", (0, n), np.float32, maxshape=(None, n), chunks=(max(1, (1 << 18) // max(1, n)), n)
        )
        self.f.create_dataset("query_ids", (0,), np.int64, maxshape=(None,), chunks=(4096,))
        for key, value in attrs.items():
            self.f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)

    def append(self, query_ids: np.ndarray, scores: np.ndarray) -> None:
        lo, n = self.f["query_ids"].shape[0], len(query_ids)
        for key, value in (("scores", scores), ("query_ids", np.asarray(query_ids, np.int64))):
            self.f[key].resize(lo + n, axis=0)
            self.f[key][lo:] = value

    def close(self) -> Path:
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def write_self_influence(
    path: str | Path, train_ids: np.ndarray, per_layer: np.ndarray, layers: list[str], attrs: dict
) -> Path:
    """FILE.h5: train_ids (N,), self_influence (N,) = per_layer.sum(1), per_layer (N, L); attrs
    layers (JSON names, the columns of per_layer), hessian, damping, index."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("train_ids", data=np.asarray(train_ids, np.int64))
        f.create_dataset("self_influence", data=per_layer.astype(np.float64).sum(1).astype(np.float32))
        f.create_dataset("per_layer", data=np.asarray(per_layer, np.float32))
        f.attrs["layers"] = json.dumps(layers)
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value)
    os.replace(tmp, path)
    return path
