"""Damping sweeps: the metric (e.g. LDS) of an index's scores as each layer's damping varies.

Scores are sums over layers, s = sum_l q_l^T (F_l + lambda_l I)^-1 g_l, and so are the
self-influences RelatIF and cosine divide by; so the scores with layer l at damping c and every
other layer at the base are  total(base) - term_l(base) + term_l(c): one preconditioning per
damping value, then per layer a subtraction, never a re-scoring. lambda_l = c x mean eigenvalue
of layer l, as everywhere (reported per layer and value). "best" is the value maximizing the
metric: tuned on whatever queries the metric uses, so say so when it is the test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from logra_dist.config import ConfigError
from logra_dist.core.curvature import CURVATURES
from logra_dist.index.format import read_stats
from logra_dist.index.reader import GradientStore
from logra_dist.scoring.kernels import normalize


@dataclass
class DampingSweep:
    """metric values: `all` (every layer at c) and `layers[name][c]` (that layer at c, the others
    at `base`); `lambdas[c][name]` the damping each layer gets at c; `best` per layer and "all"."""

    base: float
    base_value: float
    all: dict[float, float]
    layers: dict[str, dict[float, float]]
    lambdas: dict[float, dict[str, float]]
    best: dict[str, float] = field(default_factory=dict)


def damping_sweep(
    index_dir: str | Path,
    query_rows: np.ndarray | torch.Tensor,
    dampings: Sequence[float],
    metric: Callable[[np.ndarray], float],
    *,
    mode: str = "dot",
    base: float | None = None,
) -> DampingSweep:
    """Sweep the damping of an index's curvature, all layers at once and one layer at a time.

    query_rows: (Q, D) projected query gradients in the index's layout (`Scorer.queries`).
    metric(scores) -> float, scores (Q, N) with columns in ascending training id order.
    base: the other layers' damping (default: the index's own)."""
    root = Path(index_dir)
    attrs, state = read_stats(root / "stats.h5")
    kind = CURVATURES.get(str(attrs["hessian"]))
    if not kind.needs_statistics:
        raise ConfigError(f"{root}: hessian={attrs['hessian']!r} has no damping to sweep")
    with GradientStore(root) as store:
        layout, order = store.layout, np.argsort(store.ids, kind="stable")
        rows = torch.from_numpy(store[:][order]).double()
    q = torch.as_tensor(np.asarray(query_rows), dtype=torch.float64)
    if q.dim() != 2 or q.shape[1] != rows.shape[1]:
        raise ValueError(f"query_rows {tuple(q.shape)} do not fit the index's width D={rows.shape[1]}")
    base = float(attrs["damping"]) if base is None else float(base)
    values = sorted({float(c) for c in dampings} | {base})
    terms = {c: _layer_terms(kind.from_state(layout, c, state), q, rows) for c in values}
    lambdas = {c: dict(terms[c][3]) for c in values}

    def value(dots, t_self, q_self) -> float:
        return float(metric(normalize(dots.clone(), mode, q_self, t_self).numpy()))

    totals = {c: tuple(t.sum(-1) for t in terms[c][:3]) for c in values}  # sums over layers
    base_total = totals[base]
    sweep = DampingSweep(
        base=base,
        base_value=value(*base_total),
        all={c: value(*totals[c]) for c in values},
        layers={},
        lambdas=lambdas,
    )
    for i, spec in enumerate(layout):
        sweep.layers[spec.name] = {
            c: value(*(b - t[..., i] + tc[..., i] for b, t, tc in zip(base_total, terms[base][:3], terms[c][:3])))
            for c in values
        }
    for name, by_c in [("all", sweep.all), *sweep.layers.items()]:
        finite = {c: v for c, v in by_c.items() if np.isfinite(v)}
        if finite:
            sweep.best[name] = max(finite, key=finite.get)
    return sweep


def _layer_terms(pre, q: torch.Tensor, rows: torch.Tensor):
    """Per layer (last axis): dots (Q, N, L), train self-influence (N, L), query (Q, L), lambdas."""
    qp = pre.apply(q)
    dots, col = [], 0
    for s in pre.specs:
        dots.append(qp[:, col : col + s.width] @ rows[:, col : col + s.width].T)
        col += s.width
    quad = pre.layer_self_influence(torch.float64)
    return torch.stack(dots, -1), quad(rows), quad(q), pre.lambdas
