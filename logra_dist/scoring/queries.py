"""Query gradients on their way to scoring: collected per rank, checked, preconditioned, gathered.

Queries are split over ranks (each rank captures or loads its share). Each rank preconditions its
own rows once, then one all-gather gives every rank all queries, ordered by query id so that the
result does not depend on how the queries were split. Precomputed queries come from a "query
index": an index logged by the Logger from query texts with the training index's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from logra_dist import comm
from logra_dist.core.curvature import Curvature
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import IndexFormatError, read_stats
from logra_dist.index.partition import split_rows
from logra_dist.index.reader import GradientStore
from logra_dist.scoring.kernels import layer_self_influence


@dataclass
class GatheredQueries:
    """All queries of all ranks, sorted by id: preconditioned rows and per-layer self-influence."""

    ids: np.ndarray  # (n_q,) int64
    pre: torch.Tensor  # (n_q, D) H^-1 q
    self_layers: torch.Tensor  # (n_q, L) q_l^T H_l^-1 q_l


def check_query_store(queries: GradientStore, index: GradientStore) -> None:
    """A query index must produce rows in the same space as the training index."""
    where = f"query index {queries.root} vs training index {index.root}"
    if queries.layout != index.layout:
        diff = next(
            (f"{a} != {b}" for a, b in zip(queries.layout, index.layout) if a != b),
            f"{len(queries.layout)} layers != {len(index.layout)} layers",
        )
        raise IndexFormatError(f"{where}: layer layouts differ ({diff}); log queries with the same model and config")
    qk, ik = queries.config.row_compatibility_key, index.config.row_compatibility_key
    if qk != ik:
        fields = {k: (qk[k], ik[k]) for k in qk if qk[k] != ik[k]}
        raise IndexFormatError(f"{where}: configs differ in {fields} (query, training); rows are not comparable")
    if index.config.init == "pca":
        _, q_state = read_stats(queries.root / "stats.h5")
        _, i_state = read_stats(index.root / "stats.h5")
        pca_projections(i_state, index.layout, index.root / "stats.h5")
        pca_projections(q_state, queries.layout, queries.root / "stats.h5")
        for s in index.layout:
            for side in ("p_in", "p_out"):
                key = f"{s.name}/{side}"
                if not np.array_equal(q_state[key], i_state[key]):
                    raise IndexFormatError(
                        f"{where}: PCA projection {key} differs; PCA projections are fitted "
                        "per logging run, so queries must be captured with the Scorer "
                        "on the model instead of logged separately"
                    )


def pca_projections(state: dict[str, np.ndarray], layout: list[LayerSpec], path) -> dict[str, tuple]:
    """A PCA index's fitted projections from its stats.h5 (they cannot be regenerated from a seed)."""
    for s in layout:
        for side in ("p_in", "p_out"):
            if f"{s.name}/{side}" not in state:
                raise IndexFormatError(
                    f"{path}: PCA index without its projections: layer {s.name!r} has no dataset "
                    f"'{s.name}/{side}' (stats.h5 damaged or replaced by another job's?); restore the "
                    "stats.h5 written with these shards, or log the index again"
                )
    return {
        s.name: (torch.from_numpy(state[f"{s.name}/p_in"]), torch.from_numpy(state[f"{s.name}/p_out"])) for s in layout
    }


class QuerySet:
    """This rank's query rows and ids, validated as they arrive."""

    def __init__(self, width: int):
        self.width = width
        self._rows: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []

    def add(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Rows (n, D) with 1-D int64 ids; ids < 0 mark padding samples and are dropped (a rank
        whose queries ran out may pad its last batch: sharded engines need every rank to run
        the same number of forward passes)."""
        rows = torch.as_tensor(rows).detach().cpu()
        ids = torch.as_tensor(ids).detach().cpu().reshape(-1).to(torch.int64)
        if rows.dim() != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rank {comm.rank()}: query gradients must be (n, {self.width}), got {tuple(rows.shape)}")
        if rows.shape[0] != ids.shape[0]:
            raise ValueError(f"rank {comm.rank()}: {rows.shape[0]} query rows but {ids.shape[0]} ids")
        keep = ids >= 0
        rows, ids = rows[keep], ids[keep]
        finite = torch.isfinite(rows).all(1)
        if not bool(finite.all()):
            raise ValueError(
                f"rank {comm.rank()}: non-finite query gradients for query ids "
                f"{ids[~finite][:10].tolist()} (check the loss of these queries)"
            )
        self._rows.append(rows.float())
        self._ids.append(ids)

    def add_store(
        self, queries: GradientStore, index: GradientStore, share: bool, chunk_rows: int, ids: np.ndarray | None = None
    ) -> None:
        """Rows of a query index: this rank's contiguous share of it (share=True), or all; or
        only the query ids `ids` (one rank's share of a chunk: grouped reads of just those rows)."""
        check_query_store(queries, index)
        if ids is not None:
            ids = np.asarray(ids, np.int64)
            if len(ids):
                self.add(torch.from_numpy(queries.rows_for_ids(ids)), torch.from_numpy(ids))
            return
        ranges = split_rows(len(queries), comm.world_size())[comm.rank()] if share else [(0, len(queries))]
        for lo, hi in ranges:
            for _, ids, rows in queries.iter_chunks(chunk_rows, lo, hi):
                self.add(torch.from_numpy(rows), torch.from_numpy(ids))

    @property
    def local_ids(self) -> np.ndarray:
        return torch.cat(self._ids).numpy() if self._ids else np.zeros(0, np.int64)

    def local_rows(self) -> torch.Tensor:
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.width)

    def gather(self, pre: Curvature | None, specs: list[LayerSpec], dtype: torch.dtype) -> GatheredQueries:
        """Collective: precondition this rank's rows (float64, they are few), all-gather, sort by id."""
        rows = self.local_rows().double()
        q_pre = rows if pre is None else pre.apply(rows)
        q_self = layer_self_influence(pre, specs, rows)
        packed = torch.cat([q_pre, q_self], 1).to(dtype)
        all_rows = torch.cat(comm.all_gather_rows(packed))
        all_ids = torch.cat(comm.all_gather_rows(torch.as_tensor(self.local_ids).reshape(-1, 1))).reshape(-1)
        order = torch.argsort(all_ids, stable=True)
        all_ids, all_rows = all_ids[order], all_rows[order]
        if len(all_ids) > 1 and bool((all_ids[1:] == all_ids[:-1]).any()):
            dup = torch.unique(all_ids[1:][all_ids[1:] == all_ids[:-1]])[:5].tolist()
            raise ValueError(
                f"query ids must be unique across ranks; duplicated: {dup} (did two ranks add the same queries?)"
            )
        d = self.width
        return GatheredQueries(all_ids.numpy(), all_rows[:, :d].contiguous(), all_rows[:, d:].contiguous())
