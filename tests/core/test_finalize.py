"""The float32 eigendecomposition of finalize against float64 (core/curvature/finalize.py).

Fisher-like matrices (rows with a power-law spectrum in a random basis, as projected gradients
have) of widths 64-768, damping 1e-3..1: the preconditioned products (F + lambda I)^-1 g from
`decompose_layer` stay within the stated bound of float64's, and a layer whose bound exceeds
FLOAT32_MAX_ERROR is decomposed in float64.
"""

from __future__ import annotations

import pytest
import torch

from logra_dist.core.curvature import KFAC, Raw
from logra_dist.core.curvature.finalize import FLOAT32_MAX_ERROR, decompose_layer, float32_error_bound
from logra_dist.core.projection import LayerSpec


def _raw(width: int, n: int, decay: float, seed: int) -> tuple[Raw, LayerSpec, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = int(width**0.5)
    spec = LayerSpec("layer", "linear", 100, 100, k, width // k)
    basis = torch.linalg.qr(torch.randn(spec.width, spec.width, generator=g, dtype=torch.float64))[0]
    scale = torch.arange(1, spec.width + 1, dtype=torch.float64) ** (-decay / 2)
    rows = (torch.randn(n, spec.width, generator=g, dtype=torch.float64) * scale) @ basis
    raw = Raw([spec], torch.float32)
    raw.update_rows(rows.float())
    raw.flush()
    return raw, spec, rows


def _relative_error(raw: Raw, spec: LayerSpec, factors: dict, damping: float, g: torch.Tensor) -> tuple[float, float]:
    exact = raw.layer_factors(spec, torch.float64)
    lam = damping * raw.mean_eigenvalue(exact)
    want = ((g @ exact["evecs"]) / (exact["evals"] + lam)) @ exact["evecs"].T
    v, e = factors["evecs"].double(), factors["evals"].double()
    got = ((g @ v) / (e + damping * e.mean())) @ v.T
    kappa = (raw.max_eigenvalue(exact) + lam) / lam
    return float(((got - want).norm(dim=1) / want.norm(dim=1)).max()), kappa


@pytest.mark.parametrize("width,n,decay", [(64, 500, 0.5), (256, 1000, 1.0), (768, 300, 1.5)])
@pytest.mark.parametrize("damping", [1.0, 0.1, 0.01, 0.001])
def test_float32_eigh_within_bound_of_float64(width, n, decay, damping):
    raw, spec, rows = _raw(width, n, decay, seed=width)
    g = rows[:32] + 0.1 * torch.randn(32, spec.width, dtype=torch.float64)  # gradients like the logged ones
    f32 = raw.layer_factors(spec, torch.float32)
    err, kappa = _relative_error(raw, spec, f32, damping, g)
    assert err <= float32_error_bound(kappa), (err, kappa, float32_error_bound(kappa))
    factors, dtype = decompose_layer(raw, spec, damping)
    assert dtype == (torch.float32 if float32_error_bound(kappa) <= FLOAT32_MAX_ERROR else torch.float64)
    err, _ = _relative_error(raw, spec, factors, damping, g)
    assert err <= max(FLOAT32_MAX_ERROR, 1e-10), (err, dtype)  # whichever precision it chose: accurate


def test_both_precisions_are_exercised():
    """The cases above reach both sides of FLOAT32_MAX_ERROR (else the choice is untested)."""
    raw, spec, _ = _raw(768, 300, 1.5, seed=768)
    assert decompose_layer(raw, spec, 1.0)[1] == torch.float32
    assert decompose_layer(raw, spec, 0.001)[1] == torch.float64


def test_singular_layer_is_named():
    spec = LayerSpec("blocks.0.mlp", "linear", 8, 8, 2, 2)
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.mlp'.*singular"):
        decompose_layer(Raw([spec]), spec, 1.0)


def test_kfac_layer_factors_equal_serial_factors():
    spec = LayerSpec("l", "linear", 8, 8, 3, 4)
    kfac = KFAC([spec], torch.float32)
    g = torch.Generator().manual_seed(0)
    kfac.observe("l", torch.randn(50, 3, generator=g), torch.randn(50, 4, generator=g), tokens=50)
    kfac.update_rows(torch.zeros(10, 12))
    factors, dtype = decompose_layer(kfac, spec, 1.0)
    assert dtype == torch.float32
    serial = kfac.factors()["l"]
    for side in ("act", "grad"):
        v, e = factors[f"{side}_evecs"].double(), factors[f"{side}_evals"].double()
        vs, es = serial[f"{side}_evecs"], serial[f"{side}_evals"]
        torch.testing.assert_close((v * e) @ v.T, (vs * es) @ vs.T, rtol=1e-5, atol=1e-6)
