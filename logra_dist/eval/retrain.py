"""Counterfactual retraining: many (subset, seed) trainings in worker processes, cached on disk.

A retrained model is a deterministic function of (task key, training subset, seed), so its
measured query outputs are stored once, as `<cache>/<task key>/<subset hash>-s<seed>.npz`, and
every later evaluation, of any new attribution method, reuses them without retraining. Workers
run one PyTorch thread each (two workers fill two cores without oversubscription); files are
written to a temporary name and renamed, so an interrupted run never leaves a half-written
entry and a rerun just fills in what is missing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logra_dist.eval.catalog import cached_task
from logra_dist.eval.tasks import Task, TaskSpec


def subset_hash(train_ids: np.ndarray) -> str:
    ids = np.unique(np.asarray(train_ids, dtype=np.int64))
    return hashlib.sha256(ids.tobytes()).hexdigest()[:20]


@dataclass(frozen=True)
class Job:
    train_ids: tuple[int, ...]
    seed: int

    @property
    def name(self) -> str:
        return f"{subset_hash(np.asarray(self.train_ids))}-s{self.seed}"


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _run_job(spec: TaskSpec, job: Job, path: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    task = cached_task(spec)
    model = task.train(np.asarray(job.train_ids, dtype=np.int64), job.seed)
    outputs = task.evaluate(model)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **outputs)
    os.replace(tmp, path)
    return path, time.perf_counter() - t0


class RetrainCache:
    """Measured query outputs of retrained models, keyed by task, subset and seed."""

    def __init__(self, root: str | Path, task: Task, spec: TaskSpec):
        self.spec, self.task = spec, task
        self.dir = Path(root) / f"{task.name}-{task.key()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        recipe = self.dir / "recipe.json"
        if not recipe.exists():
            recipe.write_text(json.dumps({"task": task.name, "recipe": task.recipe()}, indent=2, sort_keys=True))
        self.hits = self.misses = 0
        self.train_seconds = 0.0

    def path(self, job: Job) -> Path:
        return self.dir / f"{job.name}.npz"

    def run(self, jobs: list[Job], workers: int = 2) -> dict[Job, dict[str, np.ndarray]]:
        """Outputs of every job, retraining (in `workers` processes) only those not cached."""
        unique = list(dict.fromkeys(jobs))
        todo = [j for j in unique if not self.path(j).exists()]
        self.hits += len(unique) - len(todo)
        self.misses += len(todo)
        if todo:
            if workers <= 1:
                _init_worker()
                for j in todo:
                    self.train_seconds += _run_job(self.spec, j, str(self.path(j)))[1]
            else:
                ctx = multiprocessing.get_context("spawn")  # no forked OpenMP/thread state
                with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
                    futures = [pool.submit(_run_job, self.spec, j, str(self.path(j))) for j in todo]
                    for f in futures:
                        self.train_seconds += f.result()[1]
        out = {}
        for j in unique:
            with np.load(self.path(j)) as z:
                out[j] = {k: z[k] for k in z.files}
        return out

    def mean_outputs(
        self, results: dict[Job, dict[str, np.ndarray]], train_ids: np.ndarray, seeds: list[int], key: str = "loss"
    ) -> np.ndarray:
        """Seed-mean of one output for a subset."""
        ids = tuple(int(i) for i in np.unique(train_ids))
        return np.mean([results[Job(ids, s)][key] for s in seeds], axis=0)


def make_job(train_ids: np.ndarray, seed: int) -> Job:
    return Job(tuple(int(i) for i in np.unique(np.asarray(train_ids, dtype=np.int64))), int(seed))
