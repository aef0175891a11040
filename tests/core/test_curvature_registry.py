"""Curvature kinds are found by name in one registry, which agrees with the names a config accepts."""

import pytest
import torch

from logra_dist.config import HESSIANS, ConfigError, LoGraConfig
from logra_dist.core.curvature import CURVATURES, EKFAC, KFAC, Curvature, Identity, Raw
from logra_dist.core.projection import LayerSpec


def test_registered_kinds_are_the_config_choices():
    assert sorted(CURVATURES.names()) == sorted(HESSIANS)
    assert [CURVATURES.get(h) for h in ("raw", "kfac", "ekfac", "none")] == [Raw, KFAC, EKFAC, Identity]
    for h in HESSIANS:
        assert issubclass(CURVATURES.get(LoGraConfig(hessian=h).hessian), Curvature)


def test_unknown_kind_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match="unknown curvature kind 'shampoo'") as err:
        CURVATURES.get("shampoo")
    for h in HESSIANS:
        assert repr(h) in str(err.value)


def test_identity_is_plain_dot_products_and_estimated_kinds_need_damping():
    specs = [LayerSpec("a", "linear", 4, 4, 2, 3)]
    rows = torch.randn(5, 6, dtype=torch.float64)
    pre = Identity(specs).preconditioner(0.5)
    assert pre.apply(rows) is rows and pre.lambdas == {"a": 0.0} and pre.state() == {}
    with pytest.raises(ValueError, match="singular without damping"):
        Raw(specs).preconditioner(1.0)  # no samples: all eigenvalues zero
    with pytest.raises(ValueError, match="lambda="):
        KFAC(specs).preconditioner(0.0)
