"""hessian="raw": the projected empirical Fisher per layer, sum_i vec(G~_i) vec(G~_i)^T.

It is (k_in k_out)^2 numbers per layer (GBs at k=64), so rows are buffered and folded in by GEMMs
over the upper tiles only, and a commit borrows the live sums instead of copying them.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from logra_dist.core.curvature.base import Curvature
from logra_dist.core.projection import LayerSpec

# Rows are buffered and the Fisher updated by one GEMM per layer every this many rows. A
# per-batch update with B rows is a rank-B update of a (k_in k_out)^2 matrix: memory bound (the
# whole matrix is read and written for a few rows); at k=64 (4096 x 4096) a 64-row update is ~5x
# faster per row than a 4-row one on CPU. Costs 64 x D floats of buffer.
FISHER_GEMM_ROWS = 64
# The Fisher is symmetric: layers wider than two tiles update only the tiles on and above the
# diagonal (at k=64, 36 of 64 tiles: ~45% fewer FLOPs and bytes moved per row) and mirror them
# into the lower tiles when the sums are read.
FISHER_TILE = 512


class Raw(Curvature):
    """(F_l + lambda I)^-1 through the eigendecomposition of each layer's full projected Fisher."""

    name = "raw"

    def __init__(self, specs: list[LayerSpec], dtype: torch.dtype = torch.float64, device="cpu", *, sums=True):
        super().__init__(specs, dtype, device, sums=sums)
        self._pending: list[torch.Tensor] = []  # rows not yet in the Fisher sums
        self._pending_rows = 0
        self._lower_stale = False  # tiles below the diagonal not yet mirrored
        self._lent: threading.Event | None = None  # set once a commit no longer reads the sums (lend)
        widths = [s.width for s in self.specs]  # rows buffered while lent: at most the sums' own size
        self._lend_rows = max(FISHER_GEMM_ROWS, sum(w * w for w in widths) // max(1, sum(widths)))

    def sum_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        return {"fisher": (spec.width, spec.width)}

    # -- statistics -----------------------------------------------------------------------------
    def update_rows(self, rows: torch.Tensor) -> None:
        super().update_rows(rows)
        if rows.shape[0] == 0:
            return
        self._pending.append(rows.to(self.dtype))
        self._pending_rows += rows.shape[0]
        if self._pending_rows >= FISHER_GEMM_ROWS and (not self._lent_out() or self._pending_rows >= self._lend_rows):
            self._fold()

    def _lent_out(self) -> bool:
        if self._lent is not None and self._lent.is_set():
            self._lent = None
        return self._lent is not None

    def _fold(self) -> None:
        """Add the buffered rows' outer products to the Fisher sums (upper tiles only), once a
        commit reading them (`lend`) is done."""
        if not self._pending:
            return
        if self._lent is not None:
            self._lent.wait()
            self._lent = None
        rows = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._pending, self._pending_rows = [], 0
        offset = 0
        for s in self.specs:
            fisher = self.sums[f"{s.name}/fisher"]  # float64 after load_flat (a resumed job)
            block = rows[:, offset : offset + s.width].to(fisher.dtype)
            offset += s.width
            tiles = _tiles(s.width)
            if len(tiles) == 1:
                fisher.addmm_(block.T, block)
                continue
            for i, (a0, a1) in enumerate(tiles):
                left = block[:, a0:a1].T
                for b0, b1 in tiles[i:]:
                    fisher[a0:a1, b0:b1].addmm_(left, block[:, b0:b1])
            self._lower_stale = True

    def flush(self) -> None:
        """Fold buffered rows into the Fisher sums and complete them below the diagonal. (Tiles go
        stale only through `_fold`, which waits for a lent snapshot first: never while lent.)"""
        self._fold()
        if not self._lower_stale:
            return
        for s in self.specs:
            fisher, tiles = self.sums[f"{s.name}/fisher"], _tiles(s.width)
            for i, (a0, a1) in enumerate(tiles):
                for b0, b1 in tiles[i + 1 :]:
                    fisher[b0:b1, a0:a1] = fisher[a0:a1, b0:b1].T
        self._lower_stale = False

    def lend(self) -> tuple[list[np.ndarray], threading.Event]:
        """Without copying the Fisher (GBs at k=64; a copy took 0.3-1.7 s of the main thread at
        0.7 GB, the float64 `flat()` 2-3 s and 4x the memory): views of the live sums, unchanged
        until the borrower sets the returned event, as rows arriving meanwhile are only buffered
        (up to the sums' own size, then `update_rows` waits)."""
        released = threading.Event()
        parts = self.snapshot(copy=False)
        self._lent = released
        return parts, released

    def load_flat(self, flat: torch.Tensor) -> None:
        self._pending, self._pending_rows, self._lower_stale = [], 0, False
        super().load_flat(flat)

    # -- preconditioner -------------------------------------------------------------------------
    def factor_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        return {"evals": (spec.width,), "evecs": (spec.width, spec.width)}

    def layer_factors(
        self, spec: LayerSpec, dtype: torch.dtype = torch.float64, device="cpu"
    ) -> dict[str, torch.Tensor]:
        fisher = self.sums[f"{spec.name}/fisher"].to(device=device, dtype=dtype) / max(self.samples, 1.0)
        evals, evecs = torch.linalg.eigh(fisher)
        return {"evals": evals.clamp_min(0), "evecs": evecs}

    def max_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        return float(factors["evals"].max())

    def mean_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        return float(factors["evals"].double().mean())

    def apply_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        f, lam = self.layers[spec.name], self.lambdas[spec.name]
        v = f["evecs"].to(block.dtype)
        inv = (1.0 / (f["evals"] + lam)).to(block.dtype)
        return ((block @ v) * inv) @ v.T

    def whiten_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        return block @ self._scaled(spec, block.dtype)

    def self_influence_runs(self, dtype: torch.dtype) -> list[tuple]:
        """Consecutive layers of equal width form one run: one bmm with the eigenvectors scaled by
        1 / sqrt(e + lambda), prepared once: ||V^T g / sqrt(e + lambda)||^2."""
        runs: list[list[int]] = []  # [first layer, count, first column, width]
        col = 0
        for i, s in enumerate(self.specs):
            if runs and runs[-1][3] == s.width:
                runs[-1][1] += 1
            else:
                runs.append([i, 1, col, s.width])
            col += s.width
        return [
            (i, n, c, w, torch.stack([self._scaled(self.specs[j], dtype) for j in range(i, i + n)]))
            for i, n, c, w in runs
        ]

    def _scaled(self, spec: LayerSpec, dtype: torch.dtype) -> torch.Tensor:
        f = self.layers[spec.name]
        return (f["evecs"].double() / (f["evals"].double() + self.lambdas[spec.name]).sqrt()[None, :]).to(dtype)

    def run_self_influence(self, block: torch.Tensor, run: tuple) -> torch.Tensor:
        """(count, n, w) @ (count, w, w), squared and summed."""
        _, count, _, width, scaled = run
        block = block.reshape(-1, count, width).transpose(0, 1)
        return torch.bmm(block, scaled.to(block.dtype)).square_().sum(2).T


def _tiles(width: int) -> list[tuple[int, int]]:
    """[start, end) ranges of FISHER_TILE columns; one range when the layer is narrow."""
    if width < 2 * FISHER_TILE:
        return [(0, width)]
    return [(a, min(a + FISHER_TILE, width)) for a in range(0, width, FISHER_TILE)]
