"""Benchmark tasks by name: one task object per process. Above `tasks` and `lm_task`, so neither
imports the other (the LM task needs transformers, imported only when asked for)."""

from __future__ import annotations

import json

from logra_dist.eval.tasks import ClassificationTask, Task, TaskSpec


def make_task(spec: TaskSpec) -> Task:
    if spec.name in ("digits", "synthetic"):
        return ClassificationTask(TaskSpec(spec.name, {"data": spec.name, **spec.params}))
    if spec.name == "lm":
        from logra_dist.eval.lm_task import LMTask

        return LMTask(spec)
    raise ValueError(f"unknown benchmark {spec.name!r}; known: digits, synthetic, lm")


_TASKS: dict[str, Task] = {}


def cached_task(spec: TaskSpec) -> Task:
    """One task object per process (data loading and tokenization happen once per worker)."""
    key = json.dumps(spec.to_dict(), sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = make_task(spec)
    return _TASKS[key]
