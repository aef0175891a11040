"""hessian="ekfac": KFAC's eigenbases with the eigenvalues re-fitted on the per-sample rows.

EKFAC (George et al. 2018) keeps the Kronecker eigenbasis Q = V_g (x) V_a of KFAC but replaces
the products of the factors' eigenvalues by the second moments of the per-sample gradients in
that basis, lambda_ij = E[(V_g^T G~ V_a)_ij^2] = diag(Q^T F Q)_ij with F = E[vec G~ vec G~^T].

Where the refit comes from (chosen over a pass over the logged rows at finalize): the eigenbases
exist only after the all-reduce, but LoGra's blocks are small, so the raw projected Fisher F of
each layer ((k_in k_out)^2, exactly what hessian="raw" keeps) is accumulated while logging, from
the full-precision rows, by the same buffered GEMMs. diag(Q^T F Q) is then the refit, exactly:
no second pass, no re-reading of shards, and no loss from a quantized storage codec (a pass
over int8/sign rows would re-fit on lossy rows). It is a sum like every statistic, so the one
finalize all-reduce sums it over ranks. The price is raw's memory for F (0.5 MB per layer at
k=16, 128 MB at k=64) on top of KFAC's factors.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from logra_dist.core.curvature.base import Curvature, Factors
from logra_dist.core.curvature.kfac import KFAC
from logra_dist.core.curvature.raw import Raw
from logra_dist.core.projection import LayerSpec


class EKFAC(KFAC, Raw):
    """Token statistics as KFAC (`observe`), the row Fisher as Raw (`update_rows` and its buffered
    folding, flush, lend); applied as KFAC with `eigenvalues` the refit ones."""

    name = "ekfac"

    def sum_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        return {**KFAC.sum_shapes(self, spec), **Raw.sum_shapes(self, spec)}

    def lend(self) -> tuple[list[np.ndarray], threading.Event]:
        """Raw's lend (views of the Fisher, frozen until released), with KFAC's small token sums
        copied: `observe` adds to those in place while a commit may still be reading."""
        parts, released = Raw.lend(self)
        fisher = [key.endswith("/fisher") for key in self.sums]
        return [p if i < len(fisher) and fisher[i] else p.copy() for i, p in enumerate(parts)], released

    def factors(self) -> Factors:
        layers = KFAC.factors(self)
        samples = max(self.samples, 1.0)
        for s in self.specs:
            f = layers[s.name]
            fisher = self.sums[f"{s.name}/fisher"].double() / samples
            f["evals"] = refit_eigenvalues(fisher, f["grad_evecs"], f["act_evecs"]).clamp_min(0)
        return layers

    def mean_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        return float(factors["evals"].mean())  # = trace(F) / (k_in k_out): the basis is orthonormal

    def eigenvalues(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        return factors["evals"]

    # The finalized side is KFAC's (the MRO would otherwise take Raw's batched self-influence,
    # which reads Raw's "evecs").
    self_influence_runs = Curvature.self_influence_runs
    run_self_influence = Curvature.run_self_influence


def refit_eigenvalues(fisher: torch.Tensor, vg: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
    """(k_out, k_in) diag(Q^T F Q) for Q = V_g (x) V_a, F over row-major vec of (k_out x k_in)
    blocks, without forming Q: the left side of F rotated by two GEMMs (2 w^2 k flops at
    k_in = k_out = k, w = k^2), then only the diagonal of the right side."""
    k_out, k_in = vg.shape[0], va.shape[0]
    w = k_out * k_in
    left = (vg.T @ fisher.reshape(k_out, k_in * w)).reshape(k_out, k_in, w)  # (p, i, bj)
    left = torch.matmul(va.T, left).reshape(k_out, k_in, k_out, k_in)  # (p, q, b, j)
    return torch.einsum("pqbj,jq,bp->pq", left, va, vg)
