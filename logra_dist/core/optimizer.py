"""Optimizer-aware gradients: the Adam second moment as diagonal scalings of both sides.

Adam moves a weight by m / (sqrt(v) + eps), so the gradient it "sees" is G / sqrt(v), not G
(TrackStar; Bergson's Adam normalizer). v (d_out x d_in) is factored in Adafactor's rank-1 form,
v ~ r c^T / sum(r) with r = row sums and c = column sums, so that elementwise

    G / sqrt(v~) = diag(a) G diag(b),   a = sqrt(sum r) / sqrt(r),   b = 1 / sqrt(c).

Then P_out (diag(a) G diag(b)) P_in^T = (P_out diag(a)) G (P_in diag(b))^T: the scaling is a
diagonal of each side, applied to output gradients and activations before projection, and the
Kronecker structure and the cost of capture stay as they are (it folds into P_in / P_out).

Adam's epsilon sits outside the square root and does not factor. It is taken as a floor of the
second moment instead: v + eps^2 is factored (sqrt(v + eps^2) ~ sqrt(v) + eps both where v >> eps^2
and where v << eps^2), which also keeps every r and c positive. v is Adam's bias-corrected
moment, v / (1 - beta2^step), when the checkpoint records the step and beta2 (a constant factor,
but it moves the epsilon floor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerScaling:
    """Row (d_out) and column (d_in) scalings of one layer's gradient: G -> diag(row) G diag(col)."""

    row: torch.Tensor
    col: torch.Tensor


class OptimizerScaling:
    """Per-layer rank-1 Adam scalings, keyed by logged layer name; pure tensors (no file formats:
    the checkpoint readers are in engines/optimizer_state.py)."""

    def __init__(self, layers: Mapping[str, LayerScaling], source: str = ""):
        self.layers = dict(layers)
        self.source = source

    @classmethod
    def from_second_moments(
        cls, moments: Mapping[str, torch.Tensor], eps: float | Mapping[str, float], source: str = ""
    ) -> OptimizerScaling:
        """moments: layer name -> v oriented (d_out, d_in), bias-corrected; eps: Adam's epsilon
        (one, or per layer: parameter groups may differ)."""
        eps_of = (lambda n: eps[n]) if isinstance(eps, Mapping) else (lambda n: eps)
        return cls({name: factor(v, eps_of(name)) for name, v in moments.items()}, source)

    def for_layer(self, name: str) -> LayerScaling:
        if name not in self.layers:
            raise KeyError(
                f"optimizer state {self.source or ''} has no second moment for layer {name!r}; "
                f"it has {sorted(self.layers)[:8]}"
            )
        return self.layers[name]

    def digest(self) -> str:
        """sha256 (24 hex digits) of every layer's factors, in name order: what the index records,
        so that queries are scaled exactly as the training rows were."""
        h = hashlib.sha256()
        for name in sorted(self.layers):
            s = self.layers[name]
            h.update(name.encode() + b"\0")
            for t in (s.row, s.col):
                h.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:24]


def factor(v: torch.Tensor, eps: float) -> LayerScaling:
    """Rank-1 factors of a (d_out, d_in) second moment (with the eps^2 floor) as the two diagonal
    scalings whose outer product is 1 / sqrt(r c^T / sum r)."""
    if v.dim() != 2:
        raise ValueError(f"a layer's second moment must be 2-D (d_out, d_in), got shape {tuple(v.shape)}")
    v = v.detach().to(torch.float64) + float(eps) ** 2
    r, c = v.sum(dim=1), v.sum(dim=0)
    if not (bool((r > 0).all()) and bool((c > 0).all())):
        raise ValueError("the second moment has a zero row or column and eps=0: no scaling exists")
    return LayerScaling(row=r.sum().sqrt() / r.sqrt(), col=c.rsqrt())


def rank1_inverse_sqrt(v: torch.Tensor, eps: float) -> torch.Tensor:
    """The dense (d_out, d_in) matrix 1 / sqrt(r c^T / sum r) (tests and references only)."""
    s = factor(v, eps)
    return torch.outer(s.row, s.col)
