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


def test_copies_of_a_batch_with_data_labels_are_refused(tmp_path):
    task = cached_task(SPEC)
    att = Attributor(task, task.train(np.arange(task.n_train), seed=0), np.arange(4), tmp_path)
    with pytest.raises(ValueError, match="would count every sample 3x"):
        att._capture_all(None, "train", np.arange(4), "data", torch.Generator(), copies=3)
