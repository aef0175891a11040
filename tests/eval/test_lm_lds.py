"""LDS on the embedded language model: retraining cache reuse, subset/loss alignment, and a
planted signal against the random floor (tiny plans: seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from logra_dist.eval.catalog import cached_task
from logra_dist.eval.metrics import lds
from logra_dist.eval.plans import lm_plan
from logra_dist.eval.plot import families, lds_vs_dim_svg
from logra_dist.eval.retrain import RetrainCache, make_job
from logra_dist.eval.runner import lds_subsets
from logra_dist.eval.tasks import TaskSpec

TINY = TaskSpec("lm", {"n_train": 12, "n_query_pool": 3, "steps": 3, "max_length": 24, "batch_size": 4})


def _planted(masks: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """(Q, N) scores whose subset sums reproduce -measured exactly (min-norm least squares)."""
    return np.linalg.lstsq(masks, -measured, rcond=None)[0].T


def test_lm_retraining_is_cached_and_subsets_align_with_losses(tmp_path):
    task = cached_task(TINY)
    masks = lds_subsets(task.n_train, 4, 0.5, seed=0)
    jobs = [make_job(np.flatnonzero(mk), 0) for mk in masks]
    cache = RetrainCache(tmp_path, task, TINY)
    first = cache.run(jobs, workers=1)
    assert (cache.hits, cache.misses) == (0, 4)
    again = RetrainCache(tmp_path, task, TINY)  # a later run: everything from disk
    second = again.run(jobs, workers=1)
    assert (again.hits, again.misses) == (4, 0)
    for j in jobs:
        np.testing.assert_array_equal(first[j]["loss"], second[j]["loss"])
    # another recipe (one more step) is another cache folder: nothing is reused across recipes
    assert RetrainCache(tmp_path, cached_task(TaskSpec("lm", {**TINY.params, "steps": 4})), TINY).dir != cache.dir

    measured = np.stack([first[j]["loss"] for j in jobs])  # (M, Q)
    assert np.isfinite(measured).all() and measured.std(0).min() > 0  # subsets change the losses
    planted = _planted(masks, measured)
    assert lds(planted, masks, measured)["mean"] == pytest.approx(1.0)
    assert lds(-planted, masks, measured)["mean"] == pytest.approx(-1.0)
    # the same scores against the losses of the subsets in another order lose the signal
    shuffled = measured[[1, 0, 3, 2]]
    assert lds(planted, masks, shuffled)["mean"] < 0.5


def test_lm_plan_is_full_size_and_peers_are_opt_in():
    full = lm_plan(fast=False)
    assert full.lds_subsets >= 64 and len(full.lds_seeds) >= 2 and full.lds_fraction == 0.5
    names = [m.name for m in full.methods]
    assert len(names) == len(set(names))
    assert "preset-fast-k32-relatif" in names and "preset-accurate-k32-relatif" in names
    assert "trackstar-k32" in names and "random-scores" in names
    assert not any(m.family == "peer" for m in full.methods)
    peers = {m.peer for m in lm_plan(fast=False, peers=True).methods if m.family == "peer"}
    assert peers == {"kronfluence-ekfac", "kronfluence-kfac", "trak", "logix"}
    # every peer recipe at its library default (damping None) and on a sweep
    for p in peers:
        d = [m.damping for m in lm_plan(fast=False, peers=True).methods if m.peer == p]
        assert None in d and len(d) >= 4


def test_lds_vs_dim_plot_groups_by_family():
    def entry(d, v):
        return {"storage_per_example": d, "lds": {"mean": v, "ci95": [v - 0.1, v + 0.1]}}

    methods = {
        "logra-random-k4-dot-c1": entry(240, 0.1),
        "logra-random-k8-dot-c1": entry(960, 0.2),
        "trak-D240-default": entry(240, 0.05),
        "trak-D960-default": entry(960, 0.07),
        "kronfluence-ekfac-default": entry(90304, 0.3),  # one dimension only: no line
    }
    fam = families(methods)
    assert set(fam) == {"logra-random-dot-c1", "trak-default"}
    assert [d for d, *_ in fam["logra-random-dot-c1"]] == [240, 960]
    svg = lds_vs_dim_svg(methods, "t")
    assert svg.startswith("<svg") and svg.count("<path") == 2 and "trak-default" in svg
