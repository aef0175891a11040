"""LDS on the digits task for raw / KFAC / EKFAC curvature with the empirical or the exact (GGN)
Fisher, at full rank and k=8 (PCA, random), each over a damping sweep. "best" is tuned ON THE
TEST QUERIES (the peers' figures in issue 14 are tuned the same way).

Uses the eval's own task, subsets and retrainings, which must be cached already (run
`python -m logra_dist.eval run --benchmark digits` once):
    nice -n 10 python bench/curvature_lds.py [--cache bench/cache/accuracy] [--out FILE]
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import logra_dist as ld
from logra_dist.core.fisher import FisherTargets
from logra_dist.eval.catalog import cached_task
from logra_dist.eval.damping import damping_sweep
from logra_dist.eval.metrics import lds
from logra_dist.eval.plans import plan_for
from logra_dist.eval.retrain import RetrainCache, make_job
from logra_dist.eval.runner import lds_subsets

args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
args.add_argument("--cache", default="bench/cache/accuracy")
args.add_argument("--out", default="bench/results/curvature_lds.json")
args = args.parse_args()
plan = plan_for("digits", False)
task = cached_task(plan.spec)
retrain = RetrainCache(args.cache, task, plan.spec)
masks = lds_subsets(task.n_train, plan.lds_subsets, plan.lds_fraction, plan.subset_seed)
jobs = [make_job(np.flatnonzero(mk), s) for mk in masks for s in plan.lds_seeds]
missing = [j for j in jobs if not retrain.path(j).exists()]
assert not missing, f"{len(missing)} retrainings not cached"
results = retrain.run(jobs, 1)
Q = plan.lds_queries
measured = np.stack([retrain.mean_outputs(results, np.flatnonzero(mk), plan.lds_seeds, "loss") for mk in masks])[:, :Q]
torch.set_num_threads(1)
model = task.train(np.arange(task.n_train), seed=0)
torch.set_num_threads(2)
classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
work = Path(tempfile.mkdtemp(prefix="q-lds-"))
gen = torch.Generator().manual_seed(0)
out = {}


def log_index(name, cfg):
    path = work / name
    logger = ld.attach(model, cfg, path)
    targets = FisherTargets.for_config(cfg, classes) if cfg.fisher != "empirical" else None

    def all_batches(fn):
        for b, batch in task.batches("train", np.arange(task.n_train), 64):
            fn(b, batch)

    if cfg.init == "pca":
        with logger.pca_pass():
            all_batches(lambda b, batch: _cap(logger, b, batch["x"], batch["y"], targets))

    def step(b, batch):
        if targets is not None:
            with logger.statistics_pass(), logger.capture(targets.expand(b)):
                logger.backward(targets.loss(logger.model(targets.expand(batch["x"]))))
        with logger.capture(b):
            logger.backward(nn.functional.cross_entropy(logger.model(batch["x"]), batch["y"], reduction="sum"))

    all_batches(step)
    logger.finalize()
    logger.close()
    scorer = ld.Scorer(model, path, mode="dot")
    for b, batch in task.batches("query", np.arange(Q), 64):
        with scorer.capture(b):
            scorer.backward(nn.functional.cross_entropy(scorer.model(batch["x"]), batch["y"], reduction="sum"))
    rows = scorer.queries.local_rows().clone()
    qids = scorer.query_ids
    scorer.close()
    assert np.array_equal(qids, np.arange(Q))
    return path, rows


def _cap(logger, b, x, y, targets):
    # PCA statistics from the same Fisher the Hessian uses
    if targets is None:
        with logger.capture(b):
            logger.backward(nn.functional.cross_entropy(logger.model(x), y, reduction="sum"))
    else:
        with logger.capture(targets.expand(b)):
            logger.backward(targets.loss(logger.model(targets.expand(x))))


def metric(s):
    return lds(s, masks, measured)["mean"]


sweep_c = [0.001, 0.01, 0.1, 1.0, 10.0]
for init, k in (("identity", None), ("pca", 8), ("random", 8)):
    for hessian in ("raw", "kfac", "ekfac"):
        for fisher in ("empirical", "exact"):
            name = f"{init}{'' if k is None else f'-k{k}'}-{hessian}-{fisher}"
            kw = {} if k is None else {"k_in": k, "k_out": k}
            cfg = ld.LoGraConfig(init=init, hessian=hessian, fisher=fisher, storage_dtype="float32", **kw)
            t = time.perf_counter()
            path, rows = log_index(name, cfg)
            sw = damping_sweep(path, rows, sweep_c, metric)
            out[name] = {
                "lds_by_damping": sw.all,
                "best_c": sw.best["all"],
                "seconds": round(time.perf_counter() - t, 1),
            }
            print(
                f"{name:34s} LDS(c=1) {sw.all[1.0]:.3f}  best c={sw.best['all']:g}: {sw.all[sw.best['all']]:.3f}"
                f"  all: {' '.join(f'{c:g}:{v:.3f}' for c, v in sw.all.items())}",
                flush=True,
            )
shutil.rmtree(work, ignore_errors=True)
Path(args.out).write_text(json.dumps(out, indent=1))
