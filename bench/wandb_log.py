"""Send a benchmark run's figures to Weights & Biases (`bench/run.py --wandb`).

One run of job type "bench": its config is the machine and the command; its summary holds every
numeric leaf of results.json under a slash path (e.g. `logging_speed/models/large/variants/
k64-kfac/vs_floor/ratio`), and a `targets` table holds the README table's rows (figure,
setting, measured, target, met/missed). Mode follows logra_dist's rules: online with an API key,
else offline (upload later with `wandb sync`)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from logra_dist.tracking import start_wandb

COLUMNS = ["figure", "name", "setting", "measured", "target", "status"]


def numeric_leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(slash/path, value) of every finite int or float in nested dicts (lists of dicts are
    indexed by position); per-round time lists are left out (the medians summarize them)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key in ("all_times_s", "times_s", "traceback"):
                continue
            yield from numeric_leaves(value, f"{prefix}{key}/")
    elif isinstance(tree, list) and all(isinstance(x, dict) for x in tree):
        for i, value in enumerate(tree):
            yield from numeric_leaves(value, f"{prefix}{i}/")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) and math.isfinite(tree):
        yield prefix.rstrip("/"), float(tree)


def table_rows(markdown: str) -> list[list[str]]:
    """The data rows of the README table rendered by report.render."""
    rows = []
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) and cells[0].isdigit():
            rows.append(cells)
    return rows


def log_results(results: dict[str, Any], markdown: str, *, project: str | None = None) -> str | None:
    """Log one bench run; returns the W&B run directory (None when W&B is disabled)."""
    run = start_wandb(
        "bench",
        {"machine": results.get("machine", {}), "command": results.get("command"), "quick": results.get("quick")},
        project=project,
        rank=0,
    )
    if run is None:
        return None
    try:
        run.run.summary.update(dict(numeric_leaves({k: v for k, v in results.items() if k != "machine"})))
        run.run.log({"targets": run._wandb.Table(columns=COLUMNS, data=table_rows(markdown))})
        return run.dir
    finally:
        run.finish()
