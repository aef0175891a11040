"""Curvature in projected space: one registered class per `LoGraConfig.hessian` kind.

Callers obtain a kind with `CURVATURES.get(config.hessian)`; a new kind is one subclass of
`Curvature` in one new module, imported here so that it registers.
"""

from logra_dist.core.curvature.base import CURVATURES, Curvature, LayerSelfInfluence
from logra_dist.core.curvature.ekfac import EKFAC
from logra_dist.core.curvature.identity import Identity
from logra_dist.core.curvature.kfac import KFAC
from logra_dist.core.curvature.raw import Raw

__all__ = ["CURVATURES", "EKFAC", "KFAC", "Curvature", "Identity", "LayerSelfInfluence", "Raw"]
