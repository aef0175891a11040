"""Curvature in projected space: local accumulation, ONE delayed all-reduce, eigendecomposition.

Every statistic is a sum (of outer products) plus counts, so ranks accumulate locally during the
epoch and `Accumulator.flat()` packs all of them into one float64 buffer for a single
all-reduce at finalize. The result is a `Preconditioner`: per layer (F + lambda I)^-1 with
lambda = damping x mean eigenvalue of that layer's matrix.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from logra_dist.core.capture import TokenStatistics
from logra_dist.core.projection import LayerSpec

# hessian="raw": rows are buffered and the Fisher updated by one GEMM per layer every this many
# rows. A per-batch update with B rows is a rank-B update of a (k_in k_out)^2 matrix: memory
# bound (the whole matrix is read and written for a few rows); at k=64 (4096 x 4096) a 64-row
# update is ~5x faster per row than a 4-row one on CPU. Costs 64 x D floats of buffer.
FISHER_GEMM_ROWS = 64
# The Fisher is symmetric: layers wider than two tiles update only the tiles on and above the
# diagonal (at k=64, 36 of 64 tiles: ~45% fewer FLOPs and bytes moved per row) and mirror them
# into the lower tiles when the sums are read.
FISHER_TILE = 512


class Accumulator(TokenStatistics):
    """Per-rank sums. hessian="raw": sum_i vec(G~_i) vec(G~_i)^T per layer; "kfac": token sums
    of projected activation and gradient outer products; "none": counts only."""

    def __init__(self, specs: list[LayerSpec], hessian: str, dtype: torch.dtype, device="cpu"):
        self.specs, self.hessian, self.dtype, self.device = specs, hessian, dtype, device
        self.sums: dict[str, torch.Tensor] = {}
        for s in specs:
            if hessian == "raw":
                self.sums[f"{s.name}/fisher"] = torch.zeros(s.width, s.width, dtype=dtype, device=device)
            elif hessian == "kfac":
                self.sums[f"{s.name}/act"] = torch.zeros(s.k_in, s.k_in, dtype=dtype, device=device)
                self.sums[f"{s.name}/grad"] = torch.zeros(s.k_out, s.k_out, dtype=dtype, device=device)
        self.tokens = {s.name: 0.0 for s in specs}
        self.samples = 0.0
        self._pending: list[torch.Tensor] = []  # raw: rows not yet in the Fisher sums
        self._pending_rows = 0
        self._lower_stale = False  # raw: tiles below the diagonal not yet mirrored
        self._lent: threading.Event | None = None  # set once a commit no longer reads the sums (lend)
        widths = [s.width for s in specs]  # rows buffered while lent: at most the sums' own size
        self._lend_rows = max(FISHER_GEMM_ROWS, sum(w * w for w in widths) // max(1, sum(widths)))

    def observe(self, name: str, acts: torch.Tensor, grads: torch.Tensor, tokens: float = 0.0) -> None:
        if self.hessian == "kfac":  # sums may be float64 after load_flat (a resumed job)
            act, grad = self.sums[f"{name}/act"], self.sums[f"{name}/grad"]
            acts = acts if acts.dtype == act.dtype else acts.to(act.dtype)
            grads = grads if grads.dtype == grad.dtype else grads.to(grad.dtype)
            act.addmm_(acts.T, acts)
            grad.addmm_(grads.T, grads)
        self.tokens[name] += float(tokens)

    def update_rows(self, rows: torch.Tensor) -> None:
        """Add a batch of finite per-sample rows (B, D) in layout order."""
        self.samples += rows.shape[0]
        if self.hessian != "raw" or rows.shape[0] == 0:
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
        """Fold buffered rows into the Fisher sums and complete them below the diagonal. Every
        reader of `sums` (flat, snapshot, covariances, preconditioner) calls it first. (Tiles go
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

    def flat(self) -> torch.Tensor:
        """Every sum and count in one float64 vector (the only all-reduce of a logging job)."""
        self.flush()
        counts = torch.tensor([self.samples] + [self.tokens[s.name] for s in self.specs], dtype=torch.float64)
        parts = [t.reshape(-1).to(device="cpu", dtype=torch.float64) for t in self.sums.values()]
        return torch.cat(parts + [counts])

    def snapshot(self, copy: bool = True) -> list[np.ndarray]:
        """Every sum in its own dtype, then the counts (float64): the float64 concatenation of
        the parts is `flat()`, in half the bytes for float32 sums. copy=False: views of the live
        sums (valid until the next update)."""
        self.flush()
        parts = [t.detach().to("cpu").numpy() for t in self.sums.values()]
        if copy:
            parts = [p.copy() for p in parts]
        return parts + [np.array([self.samples] + [self.tokens[s.name] for s in self.specs], np.float64)]

    def lend(self) -> tuple[list[np.ndarray], threading.Event]:
        """`snapshot()` for a commit written by another thread, without copying the raw Fisher
        (GBs at k=64; a copy took 0.3-1.7 s of the main thread at 0.7 GB, the float64 `flat()`
        2-3 s and 4x the memory): views of the live sums, unchanged until the borrower sets the
        returned event, as rows arriving meanwhile are only buffered (up to the sums' own size,
        then `update_rows` waits). KFAC factors change every batch but are small: copied."""
        released = threading.Event()
        if self.hessian != "raw":
            released.set()
            return self.snapshot(), released
        parts = self.snapshot(copy=False)
        self._lent = released
        return parts, released

    def load_snapshot(self, parts: list[np.ndarray]) -> None:
        """Restore a `snapshot()` (or a one-part float64 `flat()`, as older shards stored it)."""
        self.load_flat(torch.cat([torch.from_numpy(np.asarray(p)).reshape(-1).to(torch.float64) for p in parts]))

    def load_flat(self, flat: torch.Tensor) -> None:
        self._pending, self._pending_rows, self._lower_stale = [], 0, False
        offset = 0
        for key, t in self.sums.items():
            n = t.numel()
            self.sums[key] = flat[offset : offset + n].reshape(t.shape).to(dtype=torch.float64)
            offset += n
        counts = flat[offset:].tolist()
        self.samples = counts[0]
        self.tokens = {s.name: c for s, c in zip(self.specs, counts[1:])}

    def covariances(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """KFAC factors per layer: A = sum x x^T / tokens, S = sum g g^T / samples."""
        self.flush()
        out = {}
        for s in self.specs:
            tokens = max(self.tokens[s.name], 1.0)
            samples = max(self.samples, 1.0)
            out[s.name] = (self.sums[f"{s.name}/act"].double() / tokens, self.sums[f"{s.name}/grad"].double() / samples)
        return out

    def preconditioner(self, damping: float) -> Preconditioner:
        self.flush()
        layers = {}
        samples = max(self.samples, 1.0)
        for s in self.specs:
            if self.hessian == "raw":
                evals, evecs = torch.linalg.eigh(self.sums[f"{s.name}/fisher"].double() / samples)
                layers[s.name] = {"evals": evals.clamp_min(0), "evecs": evecs}
            elif self.hessian == "kfac":
                a, g = self.covariances()[s.name]
                ea, va = torch.linalg.eigh(a)
                eg, vg = torch.linalg.eigh(g)
                layers[s.name] = {
                    "act_evals": ea.clamp_min(0),
                    "act_evecs": va,
                    "grad_evals": eg.clamp_min(0),
                    "grad_evecs": vg,
                }
        return Preconditioner(self.specs, self.hessian, damping, layers)


def _tiles(width: int) -> list[tuple[int, int]]:
    """[start, end) ranges of FISHER_TILE columns; one range when the layer is narrow."""
    if width < 2 * FISHER_TILE:
        return [(0, width)]
    return [(a, min(a + FISHER_TILE, width)) for a in range(0, width, FISHER_TILE)]


def _mean_eigenvalue(kind: str, f: dict[str, torch.Tensor]) -> float:
    if kind == "raw":
        return float(f["evals"].mean())
    return float(f["act_evals"].mean() * f["grad_evals"].mean())  # mean of the Kronecker product's


@dataclass
class Preconditioner:
    """Applies (F_l + lambda_l I)^-1 to each layer's block of projected-gradient rows."""

    specs: list[LayerSpec]
    kind: str
    damping: float
    layers: dict[str, dict[str, torch.Tensor]]

    def __post_init__(self) -> None:
        self.lambdas = {
            s.name: (self.damping * _mean_eigenvalue(self.kind, self.layers[s.name]) if self.kind != "none" else 0.0)
            for s in self.specs
        }
        for s in self.specs:
            if self.kind != "none" and self.lambdas[s.name] <= 0:
                raise ValueError(
                    f"layer {s.name!r}: damping {self.damping} x mean eigenvalue gives "
                    f"lambda={self.lambdas[s.name]}; the matrix is singular without damping "
                    "(no samples, or all gradients zero)"
                )

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, D): each layer block multiplied by its damped inverse."""
        if self.kind == "none":
            return rows
        out, offset = torch.empty_like(rows), 0
        for s in self.specs:
            block = rows[:, offset : offset + s.width]
            f, lam = self.layers[s.name], self.lambdas[s.name]
            if self.kind == "raw":
                v = f["evecs"].to(rows.dtype)
                inv = (1.0 / (f["evals"] + lam)).to(rows.dtype)
                res = ((block @ v) * inv) @ v.T
            else:
                va, vg = f["act_evecs"].to(rows.dtype), f["grad_evecs"].to(rows.dtype)
                denom = (f["grad_evals"][:, None] * f["act_evals"][None, :] + lam).to(rows.dtype)
                g = block.reshape(-1, s.k_out, s.k_in)
                rot = vg.T @ g @ va
                res = (vg @ (rot / denom) @ va.T).reshape(-1, s.width)
            out[:, offset : offset + s.width] = res
            offset += s.width
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Flat name -> array mapping for HDF5 (`layer/field`)."""
        return {f"{name}/{k}": v.cpu().numpy() for name, f in self.layers.items() for k, v in f.items()}

    @classmethod
    def from_state(
        cls, specs: list[LayerSpec], kind: str, damping: float, state: dict[str, np.ndarray]
    ) -> Preconditioner:
        layers: dict[str, dict[str, torch.Tensor]] = {s.name: {} for s in specs}
        for key, arr in state.items():
            name, field = key.rsplit("/", 1)
            if name in layers:
                layers[name][field] = torch.from_numpy(np.asarray(arr))
        return cls(specs, kind, damping, layers)
