"""Counterfactual metrics: linear datamodeling score (LDS) and brittleness, with spread.

Sign convention, used everywhere in logra_dist.eval: a score s(q, i) > 0 means training on
example i LOWERS the loss of query q (the query's and the example's loss gradients agree after
preconditioning). So the value a method predicts for a training subset S is sum_{i in S} s(q, i),
and it should rank subsets like the NEGATIVE query loss measured after retraining on S:
LDS(q) = Spearman(predicted(S_1..S_M), -loss_q(S_1..S_M)); higher is better, 1 is perfect.
"""

from __future__ import annotations

import numpy as np


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks (0-based) along the last axis, ties given their average rank (as scipy's)."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):  # one row per query: Q x M log M, negligible
        order = np.argsort(row, kind="stable")
        s = row[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        ends = np.r_[starts[1:], len(s)]
        out[r, order] = np.repeat((starts + ends - 1) / 2.0, ends - starts)
    return out.reshape(x.shape)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[q] with b[q] for every row q; NaN where a row is constant."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape:
        raise ValueError(f"spearman_rows: shapes differ, {a.shape} vs {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def bootstrap_ci(
    values: np.ndarray, seed: int = 0, draws: int = 2000, level: float = 0.95, statistic=np.mean
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over the entries of `values` (queries)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(draws, len(values)))
    stats = np.array([statistic(values[p]) for p in picks]) if statistic is not np.mean else values[picks].mean(1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def lds(scores: np.ndarray, masks: np.ndarray, measured_loss: np.ndarray, seed: int = 0) -> dict:
    """LDS of one method.

    scores: (Q, N) influence of each training example on each query (sign convention above).
    masks: (M, N) 0/1 membership of the M retraining subsets.
    measured_loss: (M, Q) query loss after retraining on each subset (mean over seeds).
    """
    scores, masks, measured_loss = (np.asarray(x, dtype=np.float64) for x in (scores, masks, measured_loss))
    if masks.shape[1] != scores.shape[1] or measured_loss.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"lds: scores {scores.shape}, masks {masks.shape} and measured {measured_loss.shape} "
            "do not agree: need (Q, N), (M, N), (M, Q)"
        )
    predicted = masks @ scores.T  # (M, Q)
    per_query = spearman_rows(predicted.T, -measured_loss.T)
    return summarize(per_query, seed)


def summarize(per_query: np.ndarray, seed: int = 0) -> dict:
    """mean, std over queries, bootstrap 95% CI of the mean, and the per-query values."""
    v = np.asarray(per_query, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo, hi = bootstrap_ci(finite, seed)
    return {
        "mean": float(finite.mean()) if len(finite) else float("nan"),
        "std": float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
        "ci95": [lo, hi],
        "n_queries": len(finite),
        "n_undefined": int(len(v) - len(finite)),
        "per_query": [None if not np.isfinite(x) else float(x) for x in v],
    }


def brittleness(delta_top: np.ndarray, delta_random: np.ndarray, seed: int = 0) -> dict:
    """Compare the query-loss increase after removing a method's top-k with removing k random
    examples. delta_*: (Q,) loss after removal minus loss of the full-data model (seed means).
    The ratio is of the means over queries (a per-query ratio explodes where random removal
    changes nothing). Its CI bootstraps queries, pairing each query's two deltas; a draw whose
    random mean is <= 0 counts as an unbounded ratio (upper end None), and the CI is None when
    2.5% or more of the draws are such (read the CI of the difference instead)."""
    top, rnd = np.asarray(delta_top, np.float64), np.asarray(delta_random, np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(top), size=(2000, len(top)))
    num, den = top[picks].mean(1), rnd[picks].mean(1)
    ratio = float(top.mean() / rnd.mean()) if rnd.mean() > 0 else None
    ratio_ci = None
    if (den <= 0).mean() < 0.025:
        with np.errstate(divide="ignore"):
            draws = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.inf)
        lo, hi = np.quantile(draws, [0.025, 0.975])
        ratio_ci = [float(lo), float(hi) if np.isfinite(hi) else None]
    diff = top - rnd
    sd = lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
    return {
        "delta_top_mean": float(top.mean()),
        "delta_top_std": sd(top),
        "delta_random_mean": float(rnd.mean()),
        "delta_random_std": sd(rnd),
        "ratio_of_means": ratio,
        "ratio_ci95": ratio_ci,
        "diff_mean": float(diff.mean()),
        "diff_std": sd(diff),
        "diff_ci95": list(bootstrap_ci(diff, seed)),
        "win_rate": float((top > rnd).mean()),
        "n_queries": len(top),
        "per_query_top": top.tolist(),
        "per_query_random": rnd.tolist(),
    }
