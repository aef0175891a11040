"""Per-layer projection matrices P_in (k_in x d_in) and P_out (k_out x d_out).

Random projections are derived from (seed, layer name, side) alone, so every rank of every job
regenerates the same matrices with no broadcast, whatever the world size or engine. They are
plain tensors held by the logger, never module parameters or buffers, so no engine partitions,
flattens or wraps them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one logged layer; dims come from module attributes, never `weight.shape`."""

    name: str
    kind: str  # a core.layers.LAYER_TYPES name: "linear", "conv1d", "embedding"
    d_in: int
    d_out: int
    k_in: int
    k_out: int

    @property
    def width(self) -> int:
        """Columns of this layer's block in a projected-gradient row."""
        return self.k_in * self.k_out


def derived_seed(seed: int, name: str, side: str) -> int:
    """A 63-bit seed that depends only on the config seed, the layer name and the side."""
    digest = hashlib.sha256(f"logra/{seed}/{name}/{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_projection(
    k: int, d: int, seed: int, name: str, side: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gaussian (k x d) with N(0, 1/k) entries, generated on the CPU for bitwise reproducibility."""
    gen = torch.Generator(device="cpu").manual_seed(derived_seed(seed, name, side))
    mat = torch.randn(k, d, generator=gen, dtype=torch.float64) / (k**0.5)
    return mat.to(dtype)


def top_eigenvectors(cov: torch.Tensor, k: int) -> torch.Tensor:
    """Rows = the k leading eigenvectors of a symmetric matrix, with a deterministic sign
    (largest-magnitude entry positive) so that every rank and rerun agrees."""
    evals, evecs = torch.linalg.eigh(cov.double())
    top = evecs[:, torch.argsort(evals, descending=True)[:k]].T.contiguous()
    pivot = top.abs().argmax(dim=1)
    signs = torch.sign(top.gather(1, pivot[:, None]))
    signs[signs == 0] = 1
    return top * signs


def build_projections(
    specs: list[LayerSpec],
    init: str,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    covariances: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(P_in, P_out) per layer name. `covariances` maps name -> (A, S) for init="pca"."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs:
        if init == "random":
            p_in = random_projection(spec.k_in, spec.d_in, seed, spec.name, "in")
            p_out = random_projection(spec.k_out, spec.d_out, seed, spec.name, "out")
        elif init == "identity":
            p_in = torch.eye(spec.d_in, dtype=torch.float64)
            p_out = torch.eye(spec.d_out, dtype=torch.float64)
        elif init == "pca":
            if covariances is None or spec.name not in covariances:
                raise ValueError(
                    f"PCA projection for layer {spec.name!r} needs its covariances "
                    "from a statistics pass (Logger.pca_pass)"
                )
            cov_in, cov_out = covariances[spec.name]
            p_in = top_eigenvectors(cov_in, spec.k_in)
            p_out = top_eigenvectors(cov_out, spec.k_out)
        else:
            raise ValueError(f"unknown projection init {init!r}")
        out[spec.name] = (p_in.to(device=device, dtype=dtype), p_out.to(device=device, dtype=dtype))
    return out
