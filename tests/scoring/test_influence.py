"""Scores against exact influence, self-influence vs the pairwise diagonal, PCA vs an independent
eigendecomposition, and the modes' definitions."""

import numpy as np
import pytest
import torch
from reference import linear_covariances, log_classifier, mlp, per_sample_weight_grads
from torch import nn

import logra_dist as ld


class _Loss:
    def __init__(self, X, Y):
        self.X, self.Y, self.n = X, Y, len(X)

    def __call__(self, call, p, i):
        return nn.functional.cross_entropy(call(p, self.X[i : i + 1]), self.Y[i : i + 1], reduction="sum")


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = mlp().double()
    X, Y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    Xq, Yq = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    return model, X, Y, Xq, Yq


def _exact_influence(model, X, Y, Xq, Yq, damping):
    """Block-diagonal influence with an explicit per-layer empirical Fisher inverse."""
    gt = per_sample_weight_grads(model, _Loss(X, Y))
    gq = per_sample_weight_grads(model, _Loss(Xq, Yq))
    scores = np.zeros((len(Xq), len(X)))
    for name in ("0.weight", "2.weight", "4.weight"):
        t = gt[name].reshape(len(X), -1).numpy()
        q = gq[name].reshape(len(Xq), -1).numpy()
        fisher = t.T @ t / len(X)
        lam = damping * np.linalg.eigvalsh(fisher).clip(min=0).mean()
        scores += q @ np.linalg.solve(fisher + lam * np.eye(len(fisher)), t.T)
    return scores


def _scorer(model, index, Xq, Yq, **kw):
    scorer = ld.Scorer(model, index, **kw)
    with scorer.capture(torch.arange(len(Xq))):
        scorer.backward(nn.functional.cross_entropy(scorer.model(Xq), Yq, reduction="sum"))
    return scorer


@pytest.mark.parametrize("damping", [0.1, 1.0])
def test_full_rank_identity_scores_equal_exact_influence(problem, tmp_path, damping):
    model, X, Y, Xq, Yq = problem
    cfg = ld.LoGraConfig(
        init="identity", hessian="raw", damping=damping, compute_dtype="float64", storage_dtype="float32"
    )
    log_classifier(model, X, Y, tmp_path, cfg, batch_size=5)
    scorer = _scorer(model, tmp_path, Xq, Yq, mode="dot", dtype=torch.float64)
    got = scorer.scores()
    want = _exact_influence(model, X, Y, Xq, Yq, damping)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6 * np.abs(want).max())
    scorer.close()


@pytest.mark.parametrize("hessian", ["raw", "kfac", "ekfac", "none"])
def test_self_influence_is_pairwise_diagonal_and_modes_agree(problem, tmp_path, hessian):
    model, X, Y, _, _ = problem
    cfg = ld.LoGraConfig(k_in=3, k_out=2, hessian=hessian, compute_dtype="float64", storage_dtype="float32")
    log_classifier(model, X, Y, tmp_path, cfg, batch_size=7)
    scorer = _scorer(model, tmp_path, X, Y, mode="dot", dtype=torch.float64)  # queries = training set
    pairwise = scorer.scores()
    self_inf = scorer.train_self_influence()
    np.testing.assert_allclose(np.diag(pairwise), self_inf, rtol=1e-5)
    assert (self_inf > 0).all()
    for mode, expect in (
        ("relatif", pairwise / np.sqrt(self_inf)[None, :]),
        ("cosine", pairwise / np.sqrt(np.outer(self_inf, self_inf))),
    ):
        scorer.mode = mode
        np.testing.assert_allclose(scorer.scores(), expect, rtol=1e-5)
    np.testing.assert_allclose(np.diag(scorer.scores()), 1.0, rtol=1e-5)  # cosine of a row with itself
    # top-1 of every training example queried against the index is itself (cosine)
    top = scorer.topk(3)
    assert (top.train_ids[:, 0] == np.arange(len(X))).all()
    scorer.close()


def test_scores_do_not_depend_on_logging_batch_size(problem, tmp_path):
    model, X, Y, Xq, Yq = problem
    cfg = ld.LoGraConfig(k_in=4, k_out=3, compute_dtype="float64", storage_dtype="float32")
    results = []
    for bs in (1, 24):
        log_classifier(model, X, Y, tmp_path / str(bs), cfg, batch_size=bs)
        scorer = _scorer(model, tmp_path / str(bs), Xq, Yq, mode="relatif", dtype=torch.float64)
        results.append(scorer.scores())
        scorer.close()
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_kfac_preconditioner_matches_explicit_kronecker_inverse(problem, tmp_path):
    model, X, Y, _, _ = problem
    cfg = ld.LoGraConfig(k_in=3, k_out=2, hessian="kfac", compute_dtype="float64", storage_dtype="float32")
    log_classifier(model, X, Y, tmp_path, cfg, batch_size=6)
    scorer = ld.Scorer(model, tmp_path, mode="dot", dtype=torch.float64)
    pre = scorer.preconditioner
    v = torch.randn(2, scorer.store.width, dtype=torch.float64)
    got = pre.apply(v)
    offset = 0
    for spec in scorer.store.layout:
        f = pre.layers[spec.name]
        A = f["act_evecs"] @ torch.diag(f["act_evals"]) @ f["act_evecs"].T
        S = f["grad_evecs"] @ torch.diag(f["grad_evals"]) @ f["grad_evecs"].T
        K = torch.kron(S, A)  # vec of a row-major (k_out x k_in) block
        lam = cfg.damping * torch.linalg.eigvalsh(K).mean()
        want = torch.linalg.solve(K + lam * torch.eye(len(K), dtype=K.dtype), v[:, offset : offset + spec.width].T).T
        torch.testing.assert_close(got[:, offset : offset + spec.width], want, rtol=1e-8, atol=1e-10)
        offset += spec.width
    scorer.close()


def test_pca_projection_is_top_eigenvectors_of_independent_covariances(problem, tmp_path):
    model, X, Y, _, _ = problem
    cfg = ld.LoGraConfig(k_in=3, k_out=2, init="pca", compute_dtype="float64", storage_dtype="float32")
    logger = ld.attach(model, cfg, tmp_path)
    with logger.pca_pass():
        for s in range(0, 24, 8):
            with logger.capture(torch.arange(s, s + 8)):
                logger.backward(nn.functional.cross_entropy(logger.model(X[s : s + 8]), Y[s : s + 8], reduction="sum"))
    # independent covariances: inputs and output gradients of each Linear via plain autograd
    projections = {n: logger.projection(n) for n in ("0", "2", "4")}
    logger.close()  # hooks off, weights trainable again: the reference below is plain autograd
    for name, (A, S) in linear_covariances(model, X, Y).items():
        p_in, p_out = projections[name]
        for P, C, k in ((p_in, A, 3), (p_out, S, 2)):
            _evals, evecs = torch.linalg.eigh(C)
            top = evecs[:, -k:].flip(1).T
            # same subspace and same vectors up to sign
            torch.testing.assert_close((P.double() @ top.T).abs(), torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-6)
