"""Score kernels and a deterministic running top-k; no I/O, no model, no collectives.

Score of training row g for a query q (both projected gradients, H the damped projected Hessian):
  dot      q^T H^-1 g
  relatif  q^T H^-1 g / sqrt(g^T H^-1 g)            (penalizes high-norm outliers)
  cosine   q^T H^-1 g / sqrt(q^T H^-1 q g^T H^-1 g)
Ties are broken by the smaller training id, so results never depend on chunking or world size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import SCORE_MODES
from .statistics import Preconditioner

_TINY = 1e-30


def self_influence(pre: Preconditioner | None, rows: torch.Tensor) -> torch.Tensor:
    """g^T H^-1 g for each row (the diagonal of the pairwise score matrix)."""
    pre_rows = rows if pre is None else pre.apply(rows)
    return (rows * pre_rows).sum(dim=1)


def score_block(q_pre: torch.Tensor, rows: torch.Tensor, mode: str,
                q_self: torch.Tensor | None = None, row_self: torch.Tensor | None = None) -> torch.Tensor:
    """(n_q, n_rows) scores of preconditioned queries against raw training rows."""
    if mode not in SCORE_MODES:
        raise ValueError(f"score mode {mode!r} is not one of {list(SCORE_MODES)}")
    scores = q_pre @ rows.T
    if mode in ("relatif", "cosine"):
        if row_self is None:
            raise ValueError(f"mode {mode!r} needs the training rows' self-influence")
        scores = scores / row_self.clamp_min(_TINY).sqrt()[None, :]
    if mode == "cosine":
        if q_self is None:
            raise ValueError("mode 'cosine' needs the queries' self-influence")
        scores = scores / q_self.clamp_min(_TINY).sqrt()[:, None]
    return scores


def select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k per row of `scores` (n_q, c) with candidate ids (n_q, c): larger score first, then
    smaller id. Two stable sorts: by id, then by score."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


class RunningTopK:
    """Per-query top-k over a stream of score blocks; memory O(n_q x (k + block))."""

    def __init__(self, n_queries: int, k: int, dtype: torch.dtype = torch.float32):
        self.k = k
        self.scores = torch.empty(n_queries, 0, dtype=dtype)
        self.ids = torch.empty(n_queries, 0, dtype=torch.int64)

    def update(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        """scores (n_q, c) for candidates `ids`: (c,) shared by all queries, or (n_q, c)."""
        if ids.dim() == 1:
            ids = ids[None, :].expand(scores.shape[0], -1)
        self.scores, self.ids = select_topk(torch.cat([self.scores, scores.to(self.scores.dtype)], 1),
                                            torch.cat([self.ids, ids.to(torch.int64)], 1), self.k)


@dataclass
class TopKResult:
    """scores and train_ids: (n_queries, k), best first; query_ids: (n_queries,)."""

    scores: np.ndarray
    train_ids: np.ndarray
    query_ids: np.ndarray
    mode: str
    damping: float
