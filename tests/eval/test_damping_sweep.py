"""The per-layer damping sweep equals re-scoring with explicit per-layer solves, and every result
records the per-layer lambdas it used."""

import json

import h5py
import numpy as np
import pytest
import torch
from reference import log_classifier, mlp
from torch import nn

import logra_dist as ld
from logra_dist.eval.damping import damping_sweep
from logra_dist.index.format import read_stats


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    torch.manual_seed(0)
    model = mlp().double()
    X, Y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    Xq, Yq = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    out = tmp_path_factory.mktemp("sweep") / "index"
    cfg = ld.LoGraConfig(k_in=3, k_out=2, hessian="raw", compute_dtype="float64", storage_dtype="float32")
    log_classifier(model, X, Y, out, cfg, batch_size=6, ids=torch.randperm(20))  # ids out of order on disk
    scorer = ld.Scorer(model, out, mode="dot", dtype=torch.float64)
    with scorer.capture(torch.arange(4)):
        scorer.backward(nn.functional.cross_entropy(scorer.model(Xq), Yq, reduction="sum"))
    queries = scorer.queries.local_rows().clone()
    scorer.close()
    return out, queries


def _explicit(out, queries, dampings: dict[str, float], mode: str) -> np.ndarray:
    """Scores (Q, N by ascending id) with layer l at damping c_l: explicit per-layer solves."""
    _, state = read_stats(out / "stats.h5")
    with ld.GradientStore(out) as store:
        rows, layout = store[:][np.argsort(store.ids)].astype(np.float64), store.layout
    q = queries.numpy()
    dots, t_self, q_self, col = 0.0, 0.0, 0.0, 0
    for s in layout:
        e, v = state[f"{s.name}/evals"], state[f"{s.name}/evecs"]
        H = v @ np.diag(e) @ v.T + dampings[s.name] * e.mean() * np.eye(len(e))
        g, qq = rows[:, col : col + s.width], q[:, col : col + s.width]
        dots = dots + qq @ np.linalg.solve(H, g.T)
        t_self = t_self + np.einsum("nd,dn->n", g, np.linalg.solve(H, g.T))
        q_self = q_self + np.einsum("nd,dn->n", qq, np.linalg.solve(H, qq.T))
        col += s.width
    if mode == "relatif":
        return dots / np.sqrt(t_self)[None, :]
    return dots


@pytest.mark.parametrize("mode", ["dot", "relatif"])
def test_sweep_equals_explicit_per_layer_damping(index, mode):
    out, queries = index
    W = np.random.default_rng(0).normal(size=(4, 20))
    metric = lambda s: float((s * W).sum())  # noqa: E731 - a random linear functional sees every score
    sweep = damping_sweep(out, queries, [0.1, 3.0], metric, mode=mode)
    assert sweep.base == 1.0 and sorted(sweep.all) == [0.1, 1.0, 3.0]
    names = ["0", "2", "4"]
    for c in (0.1, 1.0, 3.0):
        assert sweep.all[c] == pytest.approx(metric(_explicit(out, queries, dict.fromkeys(names, c), mode)), rel=1e-8)
        for name in names:
            damp = {n: (c if n == name else 1.0) for n in names}
            assert sweep.layers[name][c] == pytest.approx(metric(_explicit(out, queries, damp, mode)), rel=1e-8)
    assert sweep.layers["0"][0.1] != pytest.approx(sweep.layers["0"][3.0], rel=1e-3)  # damping matters here
    _, state = read_stats(out / "stats.h5")
    for c in (0.1, 3.0):
        for name in names:
            assert sweep.lambdas[c][name] == pytest.approx(c * state[f"{name}/evals"].mean(), rel=1e-10)
    for name, by_c in [("all", sweep.all), *sweep.layers.items()]:
        assert by_c[sweep.best[name]] == max(by_c.values())


def test_results_record_damping_and_per_layer_lambdas(index, tmp_path):
    out, queries = index
    manifest = json.loads((out / "manifest.json").read_text())
    scorer = ld.Scorer(None, out, mode="dot", damping=0.5)
    scorer.add_query_gradients(queries.numpy(), np.arange(4))
    paths = scorer.write_results(tmp_path / "res", scorer.topk(3))
    with h5py.File(paths["h5"]) as f:
        assert f.attrs["damping"] == 0.5
        lambdas = json.loads(f.attrs["lambdas"])
    assert lambdas.keys() == manifest["lambdas"].keys()
    for name, lam in manifest["lambdas"].items():  # the index was finalized at damping 1.0
        assert lambdas[name] == pytest.approx(0.5 * lam, rel=1e-10)
    scorer.store.close()


def test_sweep_refuses_what_it_cannot_sweep(index, tmp_path):
    out, queries = index
    with pytest.raises(ValueError, match="do not fit the index's width"):
        damping_sweep(out, queries[:, :5], [1.0], float)
    torch.manual_seed(0)
    cfg = ld.LoGraConfig(k_in=2, k_out=2, hessian="none", storage_dtype="float32")
    log_classifier(mlp(), torch.randn(4, 5), torch.randint(0, 3, (4,)), tmp_path / "none", cfg)
    with pytest.raises(ld.ConfigError, match="hessian='none' has no damping to sweep"):
        damping_sweep(tmp_path / "none", np.zeros((1, 12)), [1.0], float)
