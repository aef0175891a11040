"""Counterfactual evaluation of attribution accuracy: LDS and brittleness against retraining.

`python -m logra_dist.eval run --benchmark digits|lm|synthetic [--fast]` (docs/evaluation.md).
Modules: tasks / lm_task (data, model, training recipe), methods (LoGra through the public API
and the baselines), retrain (parallel cached retraining), metrics (LDS, brittleness, bootstrap),
plans (what each benchmark runs), runner (one benchmark end to end), report (markdown).
"""

from logra_dist.eval.metrics import brittleness, lds, spearman_rows
from logra_dist.eval.runner import run_benchmark

__all__ = ["brittleness", "lds", "run_benchmark", "spearman_rows"]
