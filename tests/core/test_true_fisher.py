"""fisher="true": statistics come from sampled-label gradients, rows keep the data's labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import logra_dist
from logra_dist import LoGraConfig
from logra_dist.index.format import read_stats


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def _data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(24, 6, generator=gen)
    y = torch.randint(0, 5, (24,), generator=gen)
    y_sampled = torch.randint(0, 5, (24,), generator=gen)
    return x, y, y_sampled


def _log(out, hessian: str, fisher: str, row_labels, stat_labels=None) -> logra_dist.Logger:
    model = _mlp()
    x, _, _ = _data()
    cfg = LoGraConfig(k_in=3, k_out=4, hessian=hessian, fisher=fisher, storage_dtype="float32", compute_dtype="float64")
    logger = logra_dist.attach(model.double(), cfg, out)
    for start in range(0, 24, 8):
        ids = torch.arange(start, start + 8)
        xb = x[ids].double()

        def step(labels):
            with logger.capture(ids):
                loss = nn.functional.cross_entropy(logger.model(xb), labels[ids], reduction="sum")
                logger.backward(loss)

        if stat_labels is not None:
            with logger.statistics_pass():
                step(stat_labels)
        step(row_labels)
    logger.finalize()
    return logger


@pytest.mark.parametrize("hessian", ["raw", "kfac", "ekfac"])
def test_true_fisher_statistics_from_sampled_labels_rows_from_data_labels(tmp_path, hessian):
    _, y, y_sampled = _data()
    true = _log(tmp_path / "true", hessian, "true", y, y_sampled)
    _log(tmp_path / "rows", hessian, "empirical", y)  # same rows
    _log(tmp_path / "stats", hessian, "empirical", y_sampled)  # same statistics
    with (
        logra_dist.GradientStore(tmp_path / "true") as a,
        logra_dist.GradientStore(tmp_path / "rows") as b,
        logra_dist.GradientStore(tmp_path / "stats") as c,
    ):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a[:], b[:], rtol=1e-6, atol=1e-7)
        assert np.abs(a[:] - c[:]).max() > 1e-3  # the two label sets really differ
    _, st_true = read_stats(tmp_path / "true" / "stats.h5")
    _, st_ref = read_stats(tmp_path / "stats" / "stats.h5")
    _, st_emp = read_stats(tmp_path / "rows" / "stats.h5")
    fields = {"raw": ("evals",), "kfac": ("act_evals", "grad_evals")}.get(hessian, ("evals", "act_evals", "grad_evals"))
    for name in [s.name for s in true.specs]:
        for f in fields:
            np.testing.assert_allclose(st_true[f"{name}/{f}"], st_ref[f"{name}/{f}"], rtol=1e-6, atol=1e-10)
        if hessian != "kfac":  # empirical and true Fisher differ; the test must be able to see it
            assert np.abs(st_true[f"{name}/evals"] - st_emp[f"{name}/evals"]).max() > 1e-4
    assert true.accumulator.samples == 24


def test_true_fisher_requires_a_statistics_pass(tmp_path):
    _, y, _ = _data()
    with pytest.raises(RuntimeError, match="statistics_pass"):
        _log(tmp_path / "none", "raw", "true", y)
    with pytest.raises(RuntimeError, match="fisher='true'"):
        _log(tmp_path / "emp", "raw", "empirical", y, y)
