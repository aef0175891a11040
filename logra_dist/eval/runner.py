"""One benchmark end to end: train the attributed model, score every method, retrain (cached),
compute LDS and brittleness, write `<out>/<benchmark>[-fast].json`."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist.eval.catalog import cached_task
from logra_dist.eval.methods import Attributor
from logra_dist.eval.metrics import brittleness, lds, spearman_rows, summarize
from logra_dist.eval.plans import Plan, plan_for
from logra_dist.eval.retrain import Job, RetrainCache, make_job
from logra_dist.version import __version__


def lds_subsets(n_train: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """(count, n_train) 0/1 masks, each a uniformly random subset of round(fraction n) examples."""
    rng = np.random.default_rng(seed)
    size = round(fraction * n_train)
    masks = np.zeros((count, n_train), dtype=np.float64)
    for m in range(count):
        masks[m, rng.choice(n_train, size=size, replace=False)] = 1.0
    return masks


def top_k_ids(scores_row: np.ndarray, k: int) -> np.ndarray:
    """The k largest scores (most loss-lowering examples), ties broken by the smaller id."""
    return np.argsort(-scores_row, kind="stable")[:k]


def run_benchmark(
    benchmark: str,
    out: str | Path,
    cache: str | Path,
    fast: bool = False,
    workers: int = 2,
    command: str = "",
    log: Callable[[str], None] = print,
    peer_python: str | Path | None = None,
    score_threads: int = 1,
    smaller: bool = False,
) -> dict[str, Any]:
    """`peer_python`: the bench venv's python; adds the peer libraries to the plan (LM, digits).
    Scoring runs on `score_threads` threads (the peers too), so the costs compare."""
    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]  # a shared machine: costs are read against this
    plan = plan_for(benchmark, fast, peers=peer_python is not None, smaller=smaller)
    task = cached_task(plan.spec)
    retrain = RetrainCache(cache, task, plan.spec)
    n_queries = max(plan.lds_queries, plan.brittle_queries)
    query_ids = np.arange(n_queries)
    log(f"[{benchmark}] training the attributed model on all {task.n_train} examples (seed 0)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the retraining workers: the same model, bit for bit
    workdir = Path(tempfile.mkdtemp(prefix=f"logra-eval-{benchmark}-"))
    optimizer_path = workdir / "optimizer.pt"  # the attributed model's Adam state (TrackStar-style methods)
    try:
        model = task.train(np.arange(task.n_train), seed=0, optimizer_path=str(optimizer_path))
        attributed_outputs = task.evaluate(model)
    finally:
        torch.set_num_threads(threads)
    t_model = time.perf_counter()

    threads = torch.get_num_threads()
    torch.set_num_threads(score_threads)
    try:
        peers = None
        if peer_python is not None:
            from logra_dist.eval.peers import PeerRunner

            peers = PeerRunner(
                peer_python,
                Path(__file__).resolve().parents[2] / "bench" / "peers" / "run_peer.py",
                plan.spec,
                model,
                np.arange(task.n_train),
                query_ids,
                workdir,
                plan.methods,
                threads=score_threads,
            )
        attributor = Attributor(task, model, query_ids, workdir, optimizer_path=optimizer_path, peers=peers)
        scores: dict[str, np.ndarray] = {}
        for m in plan.methods:
            scores[m.name] = attributor.scores(m)
            log(
                f"[{benchmark}] scored {m.name:32s} D={attributor.storage[m.name]:6d} {attributor.seconds[m.name]:.1f}s"
            )
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(workdir, ignore_errors=True)
    t_scored = time.perf_counter()

    # -- every retraining this evaluation needs, in one parallel batch ---------------------------
    full = np.arange(task.n_train)
    masks = lds_subsets(task.n_train, plan.lds_subsets, plan.lds_fraction, plan.subset_seed)
    jobs: list[Job] = [make_job(np.flatnonzero(mk), s) for mk in masks for s in plan.lds_seeds]
    jobs += [make_job(full, s) for s in plan.brittle_seeds]
    removals: dict[str, list[np.ndarray]] = {}
    for name in plan.brittle_methods + ["random"]:
        removals[name] = []
        for q in range(plan.brittle_queries):
            if name == "random":
                removed = np.random.default_rng(1000 + q).choice(task.n_train, plan.brittle_k, replace=False)
            else:
                removed = top_k_ids(scores[name][q], plan.brittle_k)
            removals[name].append(removed)
            jobs += [make_job(np.setdiff1d(full, removed), s) for s in plan.brittle_seeds]
    log(
        f"[{benchmark}] {len(set(jobs))} retrainings needed "
        f"({len({j for j in jobs if retrain.path(j).exists()})} cached)"
    )
    results = retrain.run(jobs, workers)
    t_retrained = time.perf_counter()

    # -- metrics --------------------------------------------------------------------------------
    out_methods: dict[str, Any] = {}
    lds_q = np.arange(plan.lds_queries)
    measured: dict[str, np.ndarray] = {}
    consistency = None
    if plan.lds_subsets:
        for key in results[next(iter(results))]:
            measured[key] = np.stack(
                [retrain.mean_outputs(results, np.flatnonzero(mk), plan.lds_seeds, key) for mk in masks]
            )[:, lds_q]
        if len(plan.lds_seeds) >= 2:  # how reproducible the measured outputs are across seeds
            per_seed = [
                np.stack([results[make_job(np.flatnonzero(mk), s)]["loss"] for mk in masks])[:, lds_q]
                for s in plan.lds_seeds[:2]
            ]
            consistency = summarize(spearman_rows(per_seed[0].T, per_seed[1].T))
    base = (
        np.mean([results[make_job(full, s)]["loss"] for s in plan.brittle_seeds], axis=0)
        if plan.brittle_seeds
        else None
    )
    reproduced = None
    if 0 in plan.brittle_seeds:  # the retrained full-data seed-0 model IS the attributed model
        reproduced = float(np.abs(results[make_job(full, 0)]["loss"] - attributed_outputs["loss"]).max())
    random_delta = None
    if plan.brittle_queries:
        random_delta = np.array(
            [
                retrain.mean_outputs(results, np.setdiff1d(full, r), plan.brittle_seeds)[q] - base[q]
                for q, r in enumerate(removals["random"])
            ]
        )
    for m in plan.methods:
        entry: dict[str, Any] = {
            "method": m.to_dict(),
            "storage_per_example": attributor.storage[m.name],
            "score_seconds": round(attributor.seconds[m.name], 3),
            "cost": attributor.cost.get(m.name, {}),
        }
        if plan.lds_subsets:
            entry["lds"] = lds(scores[m.name][lds_q], masks, measured["loss"])
            if "margin" in measured:  # margin: higher is better, so negate it into a "loss"
                entry["lds_margin"] = lds(scores[m.name][lds_q], masks, -measured["margin"])
        if m.name in plan.brittle_methods:
            top_delta = np.array(
                [
                    retrain.mean_outputs(results, np.setdiff1d(full, r), plan.brittle_seeds)[q] - base[q]
                    for q, r in enumerate(removals[m.name])
                ]
            )
            entry["brittleness"] = brittleness(top_delta, random_delta)
        out_methods[m.name] = entry
    t_end = time.perf_counter()

    result = {
        "benchmark": benchmark,
        "fast": fast,
        "smaller": smaller,
        "command": command,
        "task": {
            "name": task.name,
            "key": task.key(),
            "recipe": task.recipe(),
            "n_train": task.n_train,
            "n_query_pool": task.n_query_pool,
        },
        "plan": {
            "lds_queries": plan.lds_queries,
            "lds_subsets": plan.lds_subsets,
            "lds_fraction": plan.lds_fraction,
            "lds_seeds": plan.lds_seeds,
            "subset_seed": plan.subset_seed,
            "brittle_queries": plan.brittle_queries,
            "brittle_k": plan.brittle_k,
            "brittle_methods": plan.brittle_methods,
            "brittle_seeds": plan.brittle_seeds,
            "attributed_model_seed": 0,
            "random_removal_seeds": "numpy default_rng(1000 + query index)",
            "notes": plan.notes,
        },
        "sign_convention": "score > 0: the example lowers the query loss; LDS = Spearman(sum of scores over "
        "the subset, -query loss after retraining), averaged over queries",
        "retrain_consistency": consistency,
        # (subsets x queries) seed-mean query losses, subsets in lds_subsets(n_train, M, fraction,
        # subset_seed) order: anyone can recompute every LDS from these and the scores
        "lds_measured_loss": measured["loss"].tolist() if plan.lds_subsets else None,
        "attributed_model_vs_retrained_max_abs_loss_diff": reproduced,
        "base_query_loss": None if base is None else {"mean": float(base.mean()), "per_query": base.tolist()},
        "methods": out_methods,
        "cache": {
            "dir": str(retrain.dir),
            "hits": retrain.hits,
            "misses": retrain.misses,
            "worker_train_seconds": round(retrain.train_seconds, 1),
        },
        "timing_seconds": {
            "attributed_model": round(t_model - t_start, 1),
            "scoring": round(t_scored - t_model, 1),
            "retraining": round(t_retrained - t_scored, 1),
            "total": round(t_end - t_start, 1),
        },
        "environment": {
            "logra_dist": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "workers": workers,
            "threads_per_worker": 1,
            "scoring_threads": score_threads,
            "load_average_1_5_15min": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}{'-fast' if fast else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False))
    tmp.replace(path)
    if plan.lds_subsets:
        from logra_dist.eval.plot import lds_vs_dim_svg

        svg = path.with_name(f"{path.stem}-lds-vs-dim.svg")
        svg.write_text(lds_vs_dim_svg(out_methods, f"{benchmark}: LDS against D ({plan.lds_queries} queries)"))
    log(f"[{benchmark}] wrote {path} ({result['timing_seconds']})")
    return result


__all__ = ["Plan", "lds_subsets", "run_benchmark", "top_k_ids"]
