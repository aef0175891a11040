"""The curvature interface: one class per kind, registered by name in CURVATURES.

A kind has two sides. While logging, an instance holds per-rank sums and counts: every statistic
is a sum, so ranks accumulate locally (`snapshot()`/`flat()` pack them for commits and resume)
and finalize sums each layer's onto one rank (`layer_sums`, core/curvature/finalize.py), which
decomposes it (`layer_factors`). `preconditioner(damping)` finalizes serially into a new
instance of the same kind holding per layer the eigendecomposition of F_l (`layers`, the fields
of `stats.h5`) and lambda_l = damping x mean eigenvalue of F_l, and applies (F_l + lambda_l I)^-1.
The scorer rebuilds that side from `stats.h5` with `from_state`.
"""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
import torch

from logra_dist.core.capture import TokenStatistics
from logra_dist.core.projection import LayerSpec
from logra_dist.registry import Registry

CURVATURES: Registry[Curvature] = Registry("curvature kind")

Factors = dict[str, dict[str, torch.Tensor]]  # layer -> field ("evals", "act_evecs", ...) -> tensor


class Curvature(TokenStatistics):
    """Per-rank statistics of one curvature kind over an index's layers, or (finalized) its damped
    inverse. Subclasses set `name` and register themselves; see raw.py, kfac.py, identity.py."""

    name: ClassVar[str]
    uses_token_statistics: ClassVar[bool] = False  # captured tokens must reach `observe` (KFAC)
    needs_statistics: ClassVar[bool] = True  # estimated from samples (False: the identity)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CURVATURES.register(cls)

    def __init__(self, specs: list[LayerSpec], dtype: torch.dtype = torch.float64, device="cpu", *, sums=True):
        """Empty statistics (sums=False: none allocated, for a finalized preconditioner)."""
        self.specs, self.dtype, self.device = list(specs), dtype, device
        self.sums: dict[str, torch.Tensor] = {}
        if sums:
            for s in self.specs:
                for field, shape in self.sum_shapes(s).items():
                    self.sums[f"{s.name}/{field}"] = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = {s.name: 0.0 for s in self.specs}
        self.samples = 0.0
        self.damping = 0.0
        self.layers: Factors = {}
        self.lambdas: dict[str, float] = {}

    # -- statistics (per rank) ------------------------------------------------------------------
    def sum_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        """The sums this kind keeps for a layer, in `flat()` order (none: counts only)."""
        return {}

    def observe(self, name: str, acts: torch.Tensor, grads: torch.Tensor, tokens: float = 0.0) -> None:
        """Projected per-token activations (n, k_in) and gradients (n, k_out) of a layer."""
        self.tokens[name] += float(tokens)

    def update_rows(self, rows: torch.Tensor) -> None:
        """Add a batch of finite per-sample rows (B, D) in layout order."""
        self.samples += rows.shape[0]

    def flush(self) -> None:
        """Bring `sums` up to date; every reader of them calls it first (raw buffers rows)."""

    def _counts(self) -> list[float]:
        return [self.samples] + [self.tokens[s.name] for s in self.specs]

    def counts(self) -> torch.Tensor:
        """The counts (samples, then tokens per layer) as float64: finalize sums them with the
        job's other small figures, apart from the sums (`layer_sums`)."""
        return torch.tensor(self._counts(), dtype=torch.float64)

    def load_counts(self, counts: torch.Tensor | list[float]) -> None:
        counts = [float(c) for c in counts]
        self.samples = counts[0]
        self.tokens = {s.name: c for s, c in zip(self.specs, counts[1:])}

    def layer_sums(self, spec: LayerSpec) -> list[torch.Tensor]:
        """The live sums of one layer, in `sum_shapes` order (finalize reduces them in place)."""
        return [self.sums[f"{spec.name}/{field}"] for field in self.sum_shapes(spec)]

    def flat(self) -> torch.Tensor:
        """Every sum and count in one float64 vector (the only all-reduce of a logging job)."""
        self.flush()
        counts = torch.tensor(self._counts(), dtype=torch.float64)
        parts = [t.reshape(-1).to(device="cpu", dtype=torch.float64) for t in self.sums.values()]
        return torch.cat(parts + [counts])

    def load_flat(self, flat: torch.Tensor) -> None:
        offset = 0
        for key, t in self.sums.items():
            n = t.numel()
            self.sums[key] = flat[offset : offset + n].reshape(t.shape).to(dtype=torch.float64)
            offset += n
        self.load_counts(flat[offset:].tolist())

    def snapshot(self, copy: bool = True) -> list[np.ndarray]:
        """Every sum in its own dtype, then the counts (float64): the float64 concatenation of
        the parts is `flat()`, in half the bytes for float32 sums. copy=False: views of the live
        sums (valid until the next update)."""
        self.flush()
        parts = [t.detach().to("cpu").numpy() for t in self.sums.values()]
        if copy:
            parts = [p.copy() for p in parts]
        return parts + [np.array(self._counts(), np.float64)]

    def lend(self) -> tuple[list[np.ndarray], threading.Event]:
        """`snapshot()` for a commit written by another thread, which sets the event once it no
        longer reads the parts. Small sums are copied, so the event is set already."""
        released = threading.Event()
        released.set()
        return self.snapshot(), released

    def load_snapshot(self, parts: list[np.ndarray]) -> None:
        """Restore a `snapshot()` (or a one-part float64 `flat()`, as older shards stored it)."""
        self.load_flat(torch.cat([torch.from_numpy(np.asarray(p)).reshape(-1).to(torch.float64) for p in parts]))

    # -- finalize: eigendecompositions and damping ---------------------------------------------
    # A kind with statistics implements the per-layer trio below; `factors()` (serial, float64)
    # and the distributed finalize (core/curvature/finalize.py: layer i on rank i mod world,
    # float32 where accurate) both build on it.
    def factor_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        """The fields `layer_factors` returns for a layer, with their shapes (in that order)."""
        return {}

    def layer_factors(
        self, spec: LayerSpec, dtype: torch.dtype = torch.float64, device="cpu"
    ) -> dict[str, torch.Tensor]:
        """One layer's eigendecomposition of the (summed) statistics, computed in `dtype` on
        `device`; only that layer's sums need to be complete."""
        raise NotImplementedError

    def max_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        """The largest eigenvalue of a layer's matrix (its condition number bounds float32's error)."""
        raise NotImplementedError

    def factors(self) -> Factors:
        """Per layer the eigendecomposition of the (all-reduced) statistics, in float64."""
        self.flush()
        if not self.needs_statistics:
            return {}
        return {s.name: self.layer_factors(s) for s in self.specs}

    def mean_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        raise NotImplementedError

    def preconditioner(self, damping: float) -> Curvature:
        """The finalized side: a new instance of this kind; these statistics stay as they are."""
        self.flush()
        return self.from_factors(self.specs, damping, self.factors())

    @classmethod
    def from_factors(cls, specs: list[LayerSpec], damping: float = 0.0, layers: Factors | None = None) -> Curvature:
        pre = cls(specs, sums=False)
        pre.damping, pre.layers = damping, dict(layers or {})
        pre.lambdas = pre._lambdas()
        return pre

    def _lambdas(self) -> dict[str, float]:
        lambdas = {s.name: self.damping * self.mean_eigenvalue(self.layers[s.name]) for s in self.specs}
        for s in self.specs:
            if lambdas[s.name] <= 0:
                raise ValueError(
                    f"layer {s.name!r}: damping {self.damping} x mean eigenvalue gives "
                    f"lambda={lambdas[s.name]}; the matrix is singular without damping "
                    "(no samples, or all gradients zero)"
                )
        return lambdas

    def state(self) -> dict[str, np.ndarray]:
        """Flat name -> array mapping for HDF5 (`layer/field`)."""
        return {f"{name}/{k}": v.cpu().numpy() for name, f in self.layers.items() for k, v in f.items()}

    @classmethod
    def from_state(cls, specs: list[LayerSpec], damping: float, state: dict[str, np.ndarray]) -> Curvature:
        layers: Factors = {s.name: {} for s in specs}
        for key, arr in state.items():
            name, field = key.rsplit("/", 1)
            if name in layers:
                layers[name][field] = torch.from_numpy(np.asarray(arr))
        return cls.from_factors(specs, damping, layers)

    # -- applying the damped inverse ------------------------------------------------------------
    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, D): each layer block multiplied by its damped inverse."""
        return self._per_layer(rows, self.apply_layer)

    def _per_layer(self, rows: torch.Tensor, fn) -> torch.Tensor:
        """(n, D) -> (n, D): fn(spec, block) on each layer's block of columns."""
        out, offset = torch.empty_like(rows), 0
        for s in self.specs:
            out[:, offset : offset + s.width] = fn(s, rows[:, offset : offset + s.width])
            offset += s.width
        return out

    def apply_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def whiten(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, D): per layer W_l^T g_l with W_l W_l^T = H_l^-1 (the eigenbasis scaled by
        1 / sqrt(e + lambda)), so whiten(q) . whiten(g) = q^T H^-1 g and |whiten(g)|^2 = g^T H^-1 g:
        the space where a random sketch keeps scores (ANN, scoring/ann.py)."""
        return self._per_layer(rows, self.whiten_layer)

    def whiten_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_self_influence(self, dtype: torch.dtype = torch.float32) -> LayerSelfInfluence:
        """(n, D) rows -> (n, L) g_l^T H_l^-1 g_l, with what it needs prepared once in `dtype`."""
        return LayerSelfInfluence(self, dtype)

    def self_influence_runs(self, dtype: torch.dtype) -> list[tuple]:
        """(first layer, count, first column, width, prepared operand): layers evaluated together."""
        runs, col = [], 0
        for i, s in enumerate(self.specs):
            runs.append((i, 1, col, s.width, None))
            col += s.width
        return runs

    def run_self_influence(self, block: torch.Tensor, run: tuple) -> torch.Tensor:
        """(n, count x width) columns of one run -> (n, count)."""
        return self.layer_quadratic_form(self.specs[run[0]], block)[:, None]

    def layer_quadratic_form(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        """(n,) g^T H_l^-1 g of one layer's block."""
        raise NotImplementedError


class LayerSelfInfluence:
    """(n, L) per-layer g_l^T H_l^-1 g_l of rows, in the eigenbasis (half the cost of applying
    H^-1 and taking a dot); `runs` are evaluated one product each (see `self_influence_runs`)."""

    def __init__(self, curvature: Curvature, dtype: torch.dtype = torch.float32):
        self.curvature, self.dtype = curvature, dtype
        self.runs = curvature.self_influence_runs(dtype)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(rows.shape[0], len(self.curvature.specs), dtype=rows.dtype)
        for run in self.runs:
            first, count, col, width = run[:4]
            out[:, first : first + count] = self.curvature.run_self_influence(rows[:, col : col + count * width], run)
        return out
