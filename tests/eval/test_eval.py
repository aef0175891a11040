"""Counterfactual evaluation (logra_dist.eval): metrics, cache, and the fast end-to-end runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from logra_dist.eval.metrics import brittleness, lds, rankdata, spearman_rows
from logra_dist.eval.plans import plan_for
from logra_dist.eval.retrain import make_job, subset_hash
from logra_dist.eval.runner import lds_subsets, top_k_ids

REPO = Path(__file__).resolve().parents[2]


def test_rankdata_and_spearman_match_definitions():
    x = np.array([[3.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(rankdata(x), [[3.0, 0.0, 1.5, 1.5], [1.0, 1.0, 1.0, 3.0]])
    a = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    b = np.array([[2.0, 4.0, 9.0, 16.0, 99.0], [5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    rho = spearman_rows(a, b)
    assert rho[0] == pytest.approx(1.0) and rho[1] == pytest.approx(-1.0) and np.isnan(rho[2])
    # Pearson of ranks with ties, computed by hand: ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3)
    r1, r2 = np.array([0, 1.5, 1.5, 3]) - 1.5, np.array([0, 1, 2, 3]) - 1.5
    expected = (r1 @ r2) / np.sqrt((r1 @ r1) * (r2 @ r2))
    assert spearman_rows([[1, 2, 2, 3]], [[1, 2, 3, 4]])[0] == pytest.approx(expected)


def test_lds_sign_convention_rewards_scores_that_predict_lower_loss():
    rng = np.random.default_rng(0)
    n, q, m = 40, 3, 30
    true_effect = rng.normal(size=(q, n))  # how much each example lowers each query's loss
    masks = lds_subsets(n, m, 0.5, seed=1)
    loss = 5.0 - masks @ true_effect.T  # (M, Q): including helpful examples lowers loss
    assert lds(true_effect, masks, loss)["mean"] == pytest.approx(1.0)
    assert lds(-true_effect, masks, loss)["mean"] == pytest.approx(-1.0)
    assert abs(lds(rng.normal(size=(q, n)), masks, loss)["mean"]) < 0.5
    assert masks.sum(1).tolist() == [20.0] * m


def test_brittleness_summary_and_top_k_ties():
    b = brittleness(np.array([0.3, 0.5, 0.1]), np.array([0.1, 0.1, 0.2]))
    assert b["ratio_of_means"] == pytest.approx(0.9 / 0.4)
    assert b["win_rate"] == pytest.approx(2 / 3)
    assert b["diff_mean"] == pytest.approx(0.5 / 3)
    assert top_k_ids(np.array([1.0, 3.0, 3.0, 0.5]), 2).tolist() == [1, 2]


def test_cache_keys_depend_on_subset_and_seed_only():
    assert subset_hash(np.array([3, 1, 2])) == subset_hash(np.array([1, 2, 3, 3]))
    assert make_job(np.array([2, 1]), 0) == make_job(np.array([1, 2]), 0)
    assert make_job(np.array([1, 2]), 0).name != make_job(np.array([1, 2]), 1).name
    assert make_job(np.array([1, 2]), 0).name != make_job(np.array([1, 3]), 0).name


def _run(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "logra_dist.eval",
            "run",
            *args,
            "--out",
            str(tmp / "acc"),
            "--cache",
            str(tmp / "cache"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fast_classification_end_to_end_and_cache_hit(tmp_path):
    _run(["--benchmark", "synthetic", "--fast"], tmp_path)
    first = json.loads((tmp_path / "acc" / "synthetic-fast.json").read_text())
    plan = plan_for("synthetic", fast=True)
    assert list(first["methods"]) == [m.name for m in plan.methods]
    for name, entry in first["methods"].items():
        assert np.isfinite(entry["lds"]["mean"]), name
        assert entry["lds"]["n_queries"] == plan.lds_queries, name
    assert first["cache"]["misses"] > 0
    # the retrained full-data seed-0 model is the attributed model, bit for bit
    assert first["attributed_model_vs_retrained_max_abs_loss_diff"] == 0.0
    # exact influence (full rank, identity projections) correlates with retraining
    exact = first["methods"]["logra-identity"]["lds"]
    assert exact["mean"] > 0.3 and exact["ci95"][0] > 0
    assert first["methods"]["full-fisher"]["lds"]["mean"] > 0.3
    for name in plan.brittle_methods:
        assert np.isfinite(first["methods"][name]["brittleness"]["delta_top_mean"])
    # equal storage: every rank group's baselines store exactly LoGra's D
    assert (
        first["methods"]["dense-fisher-D48"]["storage_per_example"]
        == first["methods"]["logra-random-k4"]["storage_per_example"]
        == 48
    )

    _run(["--benchmark", "synthetic", "--fast"], tmp_path)  # same recipe: nothing retrained
    second = json.loads((tmp_path / "acc" / "synthetic-fast.json").read_text())
    assert second["cache"]["misses"] == 0
    assert second["cache"]["hits"] == first["cache"]["hits"] + first["cache"]["misses"]
    for name in first["methods"]:
        np.testing.assert_allclose(
            second["methods"][name]["lds"]["mean"], first["methods"][name]["lds"]["mean"], atol=1e-6
        )
    table = (tmp_path / "acc.md").read_text()
    assert all(f"| {name} |" in table for name in first["methods"])


def test_fast_lm_lds_and_brittleness_end_to_end(tmp_path):
    _run(["--benchmark", "lm", "--fast", "--workers", "1"], tmp_path)
    res = json.loads((tmp_path / "acc" / "lm-fast.json").read_text())
    plan = plan_for("lm", fast=True)
    assert list(res["methods"]) == [m.name for m in plan.methods]
    assert res["attributed_model_vs_retrained_max_abs_loss_diff"] == 0.0
    for name in plan.brittle_methods:
        b = res["methods"][name]["brittleness"]
        assert b["n_queries"] == plan.brittle_queries and np.isfinite(b["delta_top_mean"])
    # LoGra over the 15 Linear layers of the tiny Llama at rank 4
    assert res["methods"]["logra-random-k4-dot-c1"]["storage_per_example"] == 15 * 16
    # the same index and scoring reached two ways (preset "fast" = the defaults) agree exactly
    assert res["methods"]["preset-fast-k4-relatif"]["lds"] == res["methods"]["logra-random-k4-relatif-c1"]["lds"]
    cost = res["methods"]["logra-random-k4-dot-c1"]["cost"]
    assert cost["logging_pass_seconds"] > 0 and cost["finalize_seconds"] > 0 and cost["floor_pass_seconds"] > 0
    # the measured losses in the JSON are the cached retrainings, in lds_subsets order
    measured = np.array(res["lds_measured_loss"])
    masks = lds_subsets(res["task"]["n_train"], plan.lds_subsets, plan.lds_fraction, plan.subset_seed)
    cache = next((tmp_path / "cache").glob("lm-*"))
    for mk, row in zip(masks, measured):
        with np.load(cache / f"{make_job(np.flatnonzero(mk), 0).name}.npz") as z:
            np.testing.assert_array_equal(z["loss"][: plan.lds_queries], row)
    # a planted signal (subset sums reproduce the losses) reaches LDS 1; the random floor does not
    planted = np.linalg.lstsq(masks, -measured, rcond=None)[0].T
    assert lds(planted, masks, measured)["mean"] == pytest.approx(1.0)
    assert res["methods"]["random-scores"]["lds"]["mean"] < 0.9
    assert (tmp_path / "acc" / "lm-fast-lds-vs-dim.svg").read_text().startswith("<svg")


def test_digits_plan_with_peers_has_presets_and_every_peer_at_k_up_to_32():
    from logra_dist.eval.plans import digits_dim

    plain = {m.name for m in plan_for("digits", fast=False).methods}
    plan = plan_for("digits", fast=False, peers=True)
    names = [m.name for m in plan.methods]
    assert len(names) == len(set(names)) and plain < set(names)
    assert {m.peer for m in plan.methods if m.family == "peer"} == {
        "kronfluence-ekfac",
        "kronfluence-kfac",
        "trak",
        "logix",
    }
    for k in (8, 32):
        assert {f"preset-fast-k{k}-relatif", f"preset-accurate-k{k}-dot", f"trackstar-k{k}"} <= set(names)
        assert f"trak-D{digits_dim(k)}-default" in names and f"logix-D{digits_dim(k)}-default" in names
    assert (digits_dim(8), digits_dim(32)) == (3 * 64, 32 * 32 + 32 * 32 + 32 * 10)  # the 10-class head: 10 wide
    assert not any(m.family == "peer" for m in plan_for("synthetic", fast=True, peers=True).methods)


def test_peer_worker_rebuilds_a_plain_module_from_its_state_dict(tmp_path):
    """A model without save_pretrained (the digits MLP) reaches the peer worker as model.pt and
    comes back with the same outputs and the task's summed loss."""
    import torch

    from logra_dist.eval.catalog import cached_task
    from logra_dist.eval.peers import PeerRunner
    from logra_dist.eval.tasks import TaskSpec

    sys.path.insert(0, str(REPO / "bench" / "peers"))
    try:
        from run_peer import adapter_for
    finally:
        sys.path.pop(0)
    spec = TaskSpec("synthetic", {"data": "synthetic", "n_train": 40, "n_query_pool": 4, "steps": 5})
    task = cached_task(spec)
    model = task.train(np.arange(40), seed=1)
    runner = PeerRunner(sys.executable, REPO / "bench" / "peers" / "run_peer.py", spec, model, [], [], tmp_path, [])
    ad = adapter_for(task)
    again = ad.load(str(runner._saved_model()))
    batch = ad.collate("train", [3, 1, 2])
    ref = {"x": task.x["train"][[3, 1, 2]], "y": task.y["train"][[3, 1, 2]]}
    with torch.no_grad():
        assert torch.equal(ad.logits(again, batch), model(ref["x"]))
        assert torch.allclose(ad.loss(ad.logits(again, batch), batch), task.summed_loss(model(ref["x"]), ref))
