"""hessian="none": no curvature, plain gradient dot products (H = I, lambda = 0)."""

from __future__ import annotations

import torch

from logra_dist.core.curvature.base import Curvature
from logra_dist.core.projection import LayerSpec


class Identity(Curvature):
    """Keeps counts only; applying it returns the rows themselves."""

    name = "none"
    needs_statistics = False

    def _lambdas(self) -> dict[str, float]:
        return {s.name: 0.0 for s in self.specs}

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def apply_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        return block

    def whiten_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        return block

    def layer_quadratic_form(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        return (block * block).sum(1)
