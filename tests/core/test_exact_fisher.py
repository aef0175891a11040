"""fisher="exact": the statistics equal the explicit Gauss-Newton matrix E_n[J^T (diag p - p p^T) J]
of each layer (torch.func Jacobians); fisher="true" with fisher_samples=S equals the mean over
S drawn labels per sample of torch.func per-sample gradients' outer products."""

import numpy as np
import pytest
import torch
from reference import mlp, per_sample_weight_grads
from torch import nn
from torch.func import functional_call, jacrev

import logra_dist as ld
from logra_dist.core.fisher import FisherTargets
from logra_dist.index.format import read_stats

LAYERS = ("0", "2", "4")


def _problem():
    torch.manual_seed(0)
    model = mlp().double()
    return model, torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))


def _log(model, X, Y, out, gen=None, batch=4, **cfg):
    cfg = ld.LoGraConfig(compute_dtype="float64", storage_dtype="float32", hessian="raw", **cfg)
    targets = None if cfg.fisher == "empirical" else FisherTargets.for_config(cfg, classes=3)
    logger = ld.attach(model, cfg, out)
    for s in range(0, len(X), batch):
        ids, xb = torch.arange(s, min(s + batch, len(X))), X[s : s + batch]
        if targets is not None:
            with logger.statistics_pass(), logger.capture(targets.expand(ids)):
                logger.backward(targets.loss(logger.model(targets.expand(xb)), gen))
        with logger.capture(ids):
            logger.backward(nn.functional.cross_entropy(logger.model(xb), Y[s : s + batch], reduction="sum"))
    projections = {n: logger.projection(n) for n in LAYERS}
    logger.finalize()
    logger.close()
    _, stats = read_stats(out / "stats.h5")
    fisher = {n: stats[f"{n}/evecs"] @ np.diag(stats[f"{n}/evals"]) @ stats[f"{n}/evecs"].T for n in LAYERS}
    return fisher, projections


def _project(matrix, p_in, p_out):
    K = torch.kron(p_out.double(), p_in.double())  # vec of row-major (d_out x d_in) -> (k_out x k_in)
    return (K @ matrix @ K.T).numpy()


def _explicit_ggn(model, X):
    """Per layer E_n[J_n^T (diag p_n - p_n p_n^T) J_n], J_n = d logits_n / d vec(W) (torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p, x: functional_call(model, p, (x[None],))[0])
    ggn = {n: 0.0 for n in LAYERS}
    for x in X:  # the reference: one sample at a time, no shared code with the batched path
        J = jac(params, x)
        p = torch.softmax(functional_call(model, params, (x[None],))[0], -1)
        H = torch.diag(p) - torch.outer(p, p)
        for n in LAYERS:
            Jw = J[f"{n}.weight"].reshape(3, -1)
            ggn[n] = ggn[n] + Jw.T @ H @ Jw / len(X)
    return ggn


@pytest.mark.parametrize("init", ["identity", "random"])
def test_exact_fisher_equals_explicit_gauss_newton(tmp_path, init):
    model, X, Y = _problem()
    ggn = _explicit_ggn(model, X)
    over = {"k_in": 3, "k_out": 2} if init == "random" else {}
    fisher, projections = _log(model, X, Y, tmp_path / "exact", fisher="exact", init=init, **over)
    empirical, _ = _log(model, X, Y, tmp_path / "emp", init=init, **over)
    for n in LAYERS:
        want = _project(ggn[n], *projections[n])
        np.testing.assert_allclose(fisher[n], want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
        assert np.abs(empirical[n] - want).max() > 1e-2 * np.abs(want).max()  # the data labels' Fisher differs


def test_sampled_true_fisher_with_s_labels_per_sample(tmp_path):
    model, X, Y = _problem()
    S = 50
    fisher, _ = _log(model, X, Y, tmp_path, gen=torch.Generator().manual_seed(5), batch=10, fisher="true",
                     fisher_samples=S, init="identity")  # fmt: skip
    # the same draws, independently: copy-major labels from the same generator on the same logits
    targets = FisherTargets("true", S)
    with torch.no_grad():
        labels, _ = targets.targets(model(targets.expand(X)), torch.Generator().manual_seed(5))
    Xs = targets.expand(X)

    class Loss:
        n = len(Xs)

        def __call__(self, call, p, i):
            return nn.functional.cross_entropy(call(p, Xs[i : i + 1]), labels[i : i + 1], reduction="sum")

    grads = per_sample_weight_grads(model, Loss())
    ggn = _explicit_ggn(model, X)
    for n in LAYERS:
        g = grads[f"{n}.weight"].reshape(len(Xs), -1)
        np.testing.assert_allclose(fisher[n], (g.T @ g / len(Xs)).numpy(), rtol=1e-6, atol=1e-10)
        err = np.linalg.norm(fisher[n] - ggn[n].numpy()) / np.linalg.norm(ggn[n].numpy())
        assert err < 0.3  # S = 50 draws per sample: close to the expectation, not equal
        assert err > 1e-4


def test_fisher_settings_are_validated():
    with pytest.raises(ld.ConfigError, match="fisher_samples=4 is for fisher='true'"):
        ld.LoGraConfig(fisher="exact", fisher_samples=4)
    with pytest.raises(ld.ConfigError, match="fisher_samples must be a positive integer"):
        ld.LoGraConfig(fisher="true", fisher_samples=0)
    with pytest.raises(ld.ConfigError, match="needs the number of classes"):
        FisherTargets.for_config(ld.LoGraConfig(fisher="exact"))
    with pytest.raises(ValueError, match="for sequences use fisher='true'"):
        FisherTargets("exact", 3).targets(torch.zeros(6, 4, 3))
    with pytest.raises(ValueError, match="not 3 copies"):
        FisherTargets("exact", 3).targets(torch.zeros(4, 3))


def test_model_fisher_resolves_to_exact_for_a_classifier_and_to_draws_otherwise():
    """fisher="model" is the exact expectation when the caller gives the class count, else
    fisher_samples draws per token; empirical has no statistics batch to build."""
    cfg = ld.LoGraConfig(fisher="model", fisher_samples=8)
    assert FisherTargets.for_config(cfg, classes=10) == FisherTargets("exact", 10)
    assert FisherTargets.for_config(cfg) == FisherTargets("true", 8)
    assert FisherTargets("exact", 10).describe() == {"kind": "exact", "classes": 10}
    assert FisherTargets("true", 8).describe() == {"kind": "true", "samples": 8}
    with pytest.raises(ld.ConfigError, match="the logged rows feed the statistics"):
        FisherTargets.for_config(ld.LoGraConfig(), classes=10)
    with pytest.raises(ld.ConfigError, match="fisher='model' with classes=0: the exact expectation needs"):
        FisherTargets.for_config(cfg, classes=0)
