"""The evaluation's true Fisher with S sampled labels per example (Method.fisher_samples): the
index's statistics equal the mean over the S copy-major draws of torch.func per-sample gradients'
outer products, the same draws reproduced independently; the rows keep the data's labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from logra_dist.core.fisher import FisherTargets
from logra_dist.eval.catalog import cached_task
from logra_dist.eval.methods import Attributor, Method
from logra_dist.eval.tasks import TaskSpec
from logra_dist.index.format import read_stats
from logra_dist.index.reader import GradientStore

SPEC = TaskSpec("synthetic", {"data": "synthetic", "n_train": 40, "n_query_pool": 4, "steps": 30})


def _reference_fisher(task, model, S: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Per Linear layer, mean over S N draws of g g^T (weight gradients, torch.func), labels drawn
    batch by batch from one generator on the copy-major expanded logits, as the harness draws them."""
    gen = torch.Generator().manual_seed(seed)
    targets = FisherTargets("true", S)
    names = [n for n, p in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    parts = []
    for _, batch in task.batches("train", np.arange(task.n_train), batch_size):
        x = targets.expand(batch["x"])
        with torch.no_grad():
            labels = torch.multinomial(F.softmax(model(x).double(), -1), 1, generator=gen)[:, 0]
        parts.append(task.per_sample_grads(model, {"x": x, "y": labels}).double())
    grads = torch.cat(parts)
    blocks = dict(zip(names, torch.split(grads, sizes, dim=1)))
    return {n[: -len(".weight")]: (g.T @ g / len(g)).numpy() for n, g in blocks.items() if n.endswith(".weight")}


@pytest.mark.parametrize("S", [1, 3])
def test_attributor_true_fisher_counts_s_draws_per_example(tmp_path, S):
    task = cached_task(SPEC)
    model = task.train(np.arange(task.n_train), seed=0)
    att = Attributor(task, model, np.arange(4), tmp_path, batch_size=16)
    m = Method("t", "logra", init="identity", hessian="raw", fisher="true", fisher_samples=S, damping=0.1)
    att.scores(m)
    index = next(tmp_path.glob(f"index-identity-raw-k8-true{S}-*"))
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["samples_in_statistics"] == S * task.n_train
    _, stats = read_stats(index / "stats.h5")
    want = _reference_fisher(task, model, S, 16, seed=0)
    for name, ref in want.items():
        got = stats[f"{name}/evecs"] @ np.diag(stats[f"{name}/evals"]) @ stats[f"{name}/evecs"].T
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())  # float32 rows
    with GradientStore(index) as store:  # one row per example, with the data's labels
        assert len(store) == task.n_train


def _reference_ggn(task, model) -> dict[str, np.ndarray]:
    """Per Linear layer, (1/N) sum_n sum_c p_nc g_nc g_nc^T with g_nc the torch.func gradient of
    the loss at label c: the Gauss-Newton matrix of the cross-entropy, no sampling."""
    x = task.x["train"][: task.n_train]
    C = task.classes
    with torch.no_grad():
        p = F.softmax(model(x).double(), -1)  # (N, C)
    xs = x.repeat(C, 1)  # copy-major: copy c is label c
    ys = torch.arange(C).repeat_interleave(len(x))
    grads = task.per_sample_grads(model, {"x": xs, "y": ys}).double() * p.T.reshape(-1, 1).sqrt()
    names = [n for n, _ in model.named_parameters()]
    blocks = dict(zip(names, torch.split(grads, [q.numel() for q in model.parameters()], dim=1)))
    return {n[: -len(".weight")]: (g.T @ g / len(x)).numpy() for n, g in blocks.items() if n.endswith(".weight")}


def test_attributor_model_fisher_on_a_classifier_is_the_exact_expectation(tmp_path):
    """fisher="model" on a classifier resolves to the exact expectation over its classes (no
    draws), records that in the manifest, and its statistics equal the explicit GGN."""
    task = cached_task(SPEC)
    model = task.train(np.arange(task.n_train), seed=0)
    att = Attributor(task, model, np.arange(4), tmp_path, batch_size=16)
    att.scores(Method("m", "logra", init="identity", hessian="raw", fisher="model", fisher_samples=8, damping=0.1))
    index = next(tmp_path.glob("index-identity-raw-k8-model8-*"))
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["metadata"]["fisher_estimator"] == {"kind": "exact", "classes": task.classes}
    assert manifest["samples_in_statistics"] == task.classes * task.n_train
    _, stats = read_stats(index / "stats.h5")
    for name, ref in _reference_ggn(task, model).items():
        got = stats[f"{name}/evecs"] @ np.diag(stats[f"{name}/evals"]) @ stats[f"{name}/evecs"].T
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_attributor_true_fisher_records_its_draws(tmp_path):
    task = cached_task(SPEC)
    att = Attributor(task, task.train(np.arange(task.n_train), seed=0), np.arange(4), tmp_path, batch_size=16)
    att.scores(Method("t", "logra", init="identity", hessian="raw", fisher="true", fisher_samples=3, damping=0.1))
    manifest = json.loads(next(tmp_path.glob("index-identity-raw-k8-true3-*")).joinpath("manifest.json").read_text())
    assert manifest["metadata"]["fisher_estimator"] == {"kind": "true", "samples": 3}
