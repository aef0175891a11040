"""The scoring orchestrator: query gradients in, top-k training examples out.

Queries are captured exactly as the Logger captures training batches (same layers, same
projections regenerated from the index's config), preconditioned once with the index's
statistics, then scored against the training rows streamed chunk by chunk from the shards.
Memory is O(queries x (k + chunk)), never O(queries x index) unless `scores()` is asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import SCORE_MODES, ConfigError
from .reader import GradientStore
from .scoring import RunningTopK, TopKResult, score_block, self_influence
from .session import GradientSession
from .statistics import Preconditioner
from .store import IndexFormatError, read_stats


class Scorer(GradientSession):
    """Pass the model (or engine) to compute query gradients, or None to score precomputed ones."""

    def __init__(self, model_or_engine: Any, index_dir: str | Path, *, mode: str = "relatif",
                 damping: float | None = None, chunk_rows: int = 4096,
                 dtype: torch.dtype = torch.float32, tracker=None):
        if tracker is not None:  # phase timers (logra_dist.tracking.Tracker)
            self.tracker = tracker
        if mode not in SCORE_MODES:
            raise ConfigError(f"score mode {mode!r} is not one of {list(SCORE_MODES)}")
        self.index_dir = Path(index_dir)
        self.store = GradientStore(self.index_dir)
        self.store.tracker = self.tracker
        attrs, state = read_stats(self.index_dir / "stats.h5")
        config = self.store.config
        self.mode, self.chunk_rows, self.score_dtype = mode, chunk_rows, dtype
        self.damping = float(attrs["damping"] if damping is None else damping)
        projections = None
        if config.init == "pca":
            projections = {s.name: (torch.from_numpy(state[f"{s.name}/p_in"]), torch.from_numpy(state[f"{s.name}/p_out"]))
                           for s in self.store.layout}
        if model_or_engine is not None:
            super().__init__(model_or_engine, config, projections)
            if [s for s in self.specs] != self.store.layout:
                raise IndexFormatError(f"{self.index_dir}: the model's selected layers do not match the index "
                                  f"layout (model: {[(s.name, s.d_in, s.d_out) for s in self.specs][:4]}..., "
                                  f"index: {[(s.name, s.d_in, s.d_out) for s in self.store.layout][:4]}...)")
            if projections is not None:  # PCA matrices must live where activations are
                self._install({k: (a.to(self.device, self.compute_dtype), b.to(self.device, self.compute_dtype))
                               for k, (a, b) in projections.items()})
        else:
            self.config, self.specs = config, self.store.layout
        kind = str(attrs["hessian"])
        self.preconditioner = (None if kind == "none"
                               else Preconditioner.from_state(self.store.layout, kind, self.damping, state))
        self._query_rows: list[torch.Tensor] = []
        self._query_ids: list[torch.Tensor] = []
        self._train_self: torch.Tensor | None = None

    # -- queries ----------------------------------------------------------------------------
    def _on_batch(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self._query_rows.append(rows.detach().cpu())
        self._query_ids.append(ids)

    def add_query_gradients(self, rows, ids) -> None:
        """Precomputed projected query gradients (n, D) in the index layout."""
        rows = torch.as_tensor(np.asarray(rows))
        if rows.dim() != 2 or rows.shape[1] != self.store.width:
            raise ValueError(f"query gradients must be (n, {self.store.width}), got {tuple(rows.shape)}")
        self._on_batch(torch.as_tensor(np.asarray(ids), dtype=torch.int64), rows)

    @property
    def query_ids(self) -> np.ndarray:
        return torch.cat(self._query_ids).numpy() if self._query_ids else np.zeros(0, np.int64)

    @property
    def query_rows(self) -> torch.Tensor:
        if not self._query_rows:
            raise RuntimeError("no queries captured: use capture()/backward() or add_query_gradients()")
        return torch.cat(self._query_rows).to(self.score_dtype)

    def _prepared(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.query_rows
        q_pre = q if self.preconditioner is None else self.preconditioner.apply(q)
        return q_pre, (q * q_pre).sum(1)

    # -- training side ----------------------------------------------------------------------
    def train_self_influence(self) -> torch.Tensor:
        """g^T H^-1 g for every training row (computed once per scorer)."""
        if self._train_self is None:
            parts = [self_influence(self.preconditioner, torch.from_numpy(rows).to(self.score_dtype))
                     for _, _, rows in self.store.iter_chunks(self.chunk_rows)]
            self._train_self = torch.cat(parts) if parts else torch.zeros(0, dtype=self.score_dtype)
        return self._train_self

    def _blocks(self):
        q_pre, q_self = self._prepared()
        need_self = self.mode in ("relatif", "cosine")
        train_self = self.train_self_influence() if need_self else None
        for start, ids, rows in self.store.iter_chunks(self.chunk_rows):
            rows_t = torch.from_numpy(rows).to(self.score_dtype)
            row_self = train_self[start:start + len(ids)] if need_self else None
            with self.tracker.phase("gemm"):
                block = score_block(q_pre, rows_t, self.mode, q_self, row_self)
            yield torch.from_numpy(ids), block

    def scores(self) -> np.ndarray:
        """The full (n_queries x n_train) matrix, columns in store order (`self.store.ids`)."""
        blocks = [s for _, s in self._blocks()]
        n_q = len(self.query_ids)
        return torch.cat(blocks, dim=1).numpy() if blocks else np.zeros((n_q, 0), np.float32)

    def topk(self, k: int) -> TopKResult:
        if k < 1:
            raise ValueError(f"topk: k must be >= 1, got {k}")
        running = RunningTopK(len(self.query_ids), k, self.score_dtype)
        for ids, block in self._blocks():
            with self.tracker.phase("topk-reduce"):
                running.update(block, ids)
        return TopKResult(running.scores.numpy(), running.ids.numpy(), self.query_ids, self.mode, self.damping)
