"""hessian="ekfac" against an explicit EKFAC built independently of the hooks: KFAC factors from
plain autograd, eigenvalues re-fitted on torch.func per-sample gradients, a dense solve."""

import numpy as np
import pytest
import torch
from reference import linear_covariances, log_classifier, mlp, per_sample_weight_grads
from torch import nn

import logra_dist as ld
from logra_dist.core.curvature import EKFAC
from logra_dist.core.curvature.ekfac import refit_eigenvalues
from logra_dist.core.projection import LayerSpec


class _Loss:
    def __init__(self, X, Y):
        self.X, self.Y, self.n = X, Y, len(X)

    def __call__(self, call, p, i):
        return nn.functional.cross_entropy(call(p, self.X[i : i + 1]), self.Y[i : i + 1], reduction="sum")


def _explicit_ekfac_scores(model, X, Y, Xq, Yq, damping):
    factors = linear_covariances(model, X, Y)
    gt = per_sample_weight_grads(model, _Loss(X, Y))
    gq = per_sample_weight_grads(model, _Loss(Xq, Yq))
    scores, evals = np.zeros((len(Xq), len(X))), {}
    for name, (A, S) in factors.items():
        _, va = torch.linalg.eigh(A.detach())
        _, vg = torch.linalg.eigh(S.detach())
        Q = torch.kron(vg, va)  # vec of row-major (d_out x d_in) gradients
        t = gt[f"{name}.weight"].reshape(len(X), -1)
        lam = ((t @ Q) ** 2).mean(0)  # E[(Q^T vec G)^2]: the refit
        H = Q @ torch.diag(lam) @ Q.T + damping * lam.mean() * torch.eye(len(Q), dtype=Q.dtype)
        q = gq[f"{name}.weight"].reshape(len(Xq), -1)
        scores += (q @ torch.linalg.solve(H, t.T)).numpy()
        evals[name] = lam.reshape(S.shape[0], A.shape[0])
    return scores, evals


@pytest.mark.parametrize("damping", [0.01, 1.0])
def test_full_rank_identity_ekfac_equals_explicit_ekfac_solve(tmp_path, damping):
    torch.manual_seed(0)
    model = mlp().double()
    X, Y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    Xq, Yq = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    cfg = ld.LoGraConfig(
        init="identity", hessian="ekfac", damping=damping, compute_dtype="float64", storage_dtype="float32"
    )
    manifest = log_classifier(model, X, Y, tmp_path, cfg, batch_size=7)
    want, evals = _explicit_ekfac_scores(model, X, Y, Xq, Yq, damping)  # before the Scorer freezes weights
    scorer = ld.Scorer(model, tmp_path, mode="dot", dtype=torch.float64)
    with scorer.capture(torch.arange(len(Xq))):
        scorer.backward(nn.functional.cross_entropy(scorer.model(Xq), Yq, reduction="sum"))
    got = scorer.scores()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())  # float32 rows on disk
    pre = scorer.preconditioner
    for name, lam in evals.items():
        torch.testing.assert_close(pre.layers[name]["evals"], lam, rtol=1e-8, atol=1e-12)
        assert manifest["lambdas"][name] == pytest.approx(damping * float(lam.mean()), rel=1e-8)
        kfac = pre.layers[name]["grad_evals"][:, None] * pre.layers[name]["act_evals"][None, :]
        assert (kfac - lam).abs().max() > 1e-3 * lam.abs().max()  # the refit really differs from KFAC
    # whitening and self-influence follow the same refit eigenvalues
    rows = torch.from_numpy(scorer.store[:]).double()
    white = pre.whiten(rows)
    torch.testing.assert_close((white * white).sum(1), (rows * pre.apply(rows)).sum(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scorer.train_self_influence(), (rows * pre.apply(rows)).sum(1).numpy(), rtol=1e-6)
    scorer.close()


def test_refit_is_the_diagonal_of_the_fisher_in_the_kronecker_basis():
    torch.manual_seed(1)
    k_out, k_in = 3, 4
    rows = torch.randn(50, k_out * k_in, dtype=torch.float64)
    fisher = rows.T @ rows / 50
    vg = torch.linalg.qr(torch.randn(k_out, k_out, dtype=torch.float64))[0]
    va = torch.linalg.qr(torch.randn(k_in, k_in, dtype=torch.float64))[0]
    Q = torch.kron(vg, va)
    want = torch.diag(Q.T @ fisher @ Q).reshape(k_out, k_in)
    torch.testing.assert_close(refit_eigenvalues(fisher, vg, va), want, rtol=1e-12, atol=1e-14)
    # sums are rank-additive: two halves' statistics loaded into one equal the whole
    spec = LayerSpec("l", "linear", 9, 9, k_in, k_out)
    whole, halves = EKFAC([spec]), [EKFAC([spec]), EKFAC([spec])]
    acts, grads = torch.randn(80, k_in, dtype=torch.float64), torch.randn(80, k_out, dtype=torch.float64)
    whole.observe("l", acts, grads, 80)
    whole.update_rows(rows)
    for i, h in enumerate(halves):
        h.observe("l", acts[40 * i : 40 * (i + 1)], grads[40 * i : 40 * (i + 1)], 40)
        h.update_rows(rows[25 * i : 25 * (i + 1)])
    summed = EKFAC([spec])
    summed.load_flat(halves[0].flat() + halves[1].flat())
    a, b = whole.preconditioner(1.0), summed.preconditioner(1.0)
    for field in ("evals", "act_evals", "grad_evals"):
        torch.testing.assert_close(a.layers["l"][field], b.layers["l"][field], rtol=1e-10, atol=1e-12)


def test_lent_statistics_are_those_at_the_commit():
    """A commit borrows the Fisher (no copy, frozen until released) but KFAC's token sums keep
    growing in place: those must be copies."""
    spec = LayerSpec("l", "linear", 9, 9, 2, 3)
    acc = EKFAC([spec])
    acc.observe("l", torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64), 4)
    acc.update_rows(torch.ones(2, 6, dtype=torch.float64))
    parts, released = acc.lend()
    acc.observe("l", torch.ones(4, 2, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64), 4)
    acc.update_rows(torch.ones(1, 6, dtype=torch.float64))
    assert [p.ravel()[0] for p in parts[:3]] == [4.0, 4.0, 2.0] and list(parts[3]) == [2.0, 4.0]
    released.set()
    acc.flush()
    assert [float(acc.sums[f"l/{f}"].ravel()[0]) for f in ("act", "grad", "fisher")] == [8.0, 8.0, 3.0]
