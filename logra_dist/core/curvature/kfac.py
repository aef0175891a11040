"""hessian="kfac": per layer F ~ S (x) A, two small factors from per-token projected activations
and gradients; its inverse is applied in the factors' eigenbases, never formed."""

from __future__ import annotations

import torch

from logra_dist.core.curvature.base import Curvature
from logra_dist.core.projection import LayerSpec


class KFAC(Curvature):
    """Token sums of projected activation (A) and gradient (S) outer products per layer. The
    eigenvalues of S (x) A are the products of the factors' ones, so (F + lambda I)^-1 is a
    rotation into both eigenbases, a division, and the rotation back."""

    name = "kfac"
    uses_token_statistics = True

    def sum_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        return {"act": (spec.k_in, spec.k_in), "grad": (spec.k_out, spec.k_out)}

    def observe(self, name: str, acts: torch.Tensor, grads: torch.Tensor, tokens: float = 0.0) -> None:
        act, grad = self.sums[f"{name}/act"], self.sums[f"{name}/grad"]  # float64 after load_flat (resumed)
        acts = acts if acts.dtype == act.dtype else acts.to(act.dtype)
        grads = grads if grads.dtype == grad.dtype else grads.to(grad.dtype)
        act.addmm_(acts.T, acts)
        grad.addmm_(grads.T, grads)
        super().observe(name, acts, grads, tokens)

    def covariances(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """KFAC factors per layer: A = sum x x^T / tokens, S = sum g g^T / samples (also PCA's)."""
        self.flush()
        out = {}
        for s in self.specs:
            tokens = max(self.tokens[s.name], 1.0)
            samples = max(self.samples, 1.0)
            out[s.name] = (self.sums[f"{s.name}/act"].double() / tokens, self.sums[f"{s.name}/grad"].double() / samples)
        return out

    def factor_shapes(self, spec: LayerSpec) -> dict[str, tuple[int, ...]]:
        return {
            "act_evals": (spec.k_in,),
            "act_evecs": (spec.k_in, spec.k_in),
            "grad_evals": (spec.k_out,),
            "grad_evecs": (spec.k_out, spec.k_out),
        }

    def layer_factors(
        self, spec: LayerSpec, dtype: torch.dtype = torch.float64, device="cpu"
    ) -> dict[str, torch.Tensor]:
        self.flush()
        tokens, samples = max(self.tokens[spec.name], 1.0), max(self.samples, 1.0)
        ea, va = torch.linalg.eigh(self.sums[f"{spec.name}/act"].to(device=device, dtype=dtype) / tokens)
        eg, vg = torch.linalg.eigh(self.sums[f"{spec.name}/grad"].to(device=device, dtype=dtype) / samples)
        return {"act_evals": ea.clamp_min(0), "act_evecs": va, "grad_evals": eg.clamp_min(0), "grad_evecs": vg}

    def max_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        return float(factors["act_evals"].max()) * float(factors["grad_evals"].max())

    def mean_eigenvalue(self, factors: dict[str, torch.Tensor]) -> float:
        return float(factors["act_evals"].double().mean() * factors["grad_evals"].double().mean())  # of S (x) A

    def eigenvalues(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(k_out, k_in) eigenvalues of S (x) A in the factors' eigenbasis (EKFAC would refit them)."""
        return factors["grad_evals"][:, None] * factors["act_evals"][None, :]

    def rotated(self, spec: LayerSpec, block: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(n, k_out, k_in) blocks in the eigenbases, the damped eigenvalues (k_out, k_in), and the
        eigenvectors of A and S: the whole K-FAC inverse but the division."""
        f, lam = self.layers[spec.name], self.lambdas[spec.name]
        va, vg = f["act_evecs"].to(block.dtype), f["grad_evecs"].to(block.dtype)
        denom = (self.eigenvalues(f) + lam).to(block.dtype)
        return vg.T @ block.reshape(-1, spec.k_out, spec.k_in) @ va, denom, va, vg

    def apply_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        rot, denom, va, vg = self.rotated(spec, block)
        return (vg @ (rot / denom) @ va.T).reshape(-1, spec.width)

    def whiten_layer(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        rot, denom, _, _ = self.rotated(spec, block)
        return (rot / denom.sqrt()).reshape(-1, spec.width)

    def layer_quadratic_form(self, spec: LayerSpec, block: torch.Tensor) -> torch.Tensor:
        rot, denom, _, _ = self.rotated(spec, block)
        return (rot * rot / denom).sum((1, 2))
