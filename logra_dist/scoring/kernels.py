"""Score kernels and a deterministic running top-k; no I/O, no model, no collectives.

Score of training row g for a query q (both projected gradients, H the damped projected Hessian):
  dot      q^T H^-1 g
  relatif  q^T H^-1 g / sqrt(g^T H^-1 g)            (penalizes high-norm outliers)
  cosine   q^T H^-1 g / sqrt(q^T H^-1 q g^T H^-1 g)
H^-1 is block diagonal over layers, so every quantity is a sum of per-layer terms: scores of a
layer group are the same formulas restricted to its layers' columns, and self-influence is
kept per layer so that any group's is a sum of columns.
Ties are broken by the smaller training id, so results never depend on chunking or world size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from logra_dist.config import SCORE_MODES
from logra_dist.core.curvature import Curvature, Identity
from logra_dist.core.projection import LayerSpec

NORM_FLOOR = 1e-30  # self-influence floor before a square root (relatif, cosine; also the prefilter's)
ID_PAD = torch.iinfo(torch.int64).max  # id of an empty top-k slot: sorts after every real id


def layer_columns(specs: list[LayerSpec]) -> torch.Tensor:
    """(D,) layer index of every column of a row."""
    return torch.cat([torch.full((s.width,), i, dtype=torch.int64) for i, s in enumerate(specs)])


def layer_self_influence(pre: Curvature | None, specs: list[LayerSpec], rows: torch.Tensor) -> torch.Tensor:
    """(n, L): g_l^T H_l^-1 g_l per row and layer (`Curvature.layer_self_influence`; None: H = I)."""
    pre = Identity.from_factors(specs) if pre is None else pre
    return pre.layer_self_influence(rows.dtype)(rows)


def self_influence(pre: Curvature | None, rows: torch.Tensor) -> torch.Tensor:
    """g^T H^-1 g for each row (the diagonal of the pairwise dot-score matrix)."""
    pre_rows = rows if pre is None else pre.apply(rows)
    return (rows * pre_rows).sum(dim=1)


def normalize(
    dots: torch.Tensor, mode: str, q_self: torch.Tensor | None, row_self: torch.Tensor | None
) -> torch.Tensor:
    """Turn (n_q, n_rows) dot scores into `mode` scores (in place when possible). row_self: (n_rows,)
    shared by all queries, or (n_q, n_rows) when each query has its own rows (ANN candidates)."""
    if mode not in SCORE_MODES:
        raise ValueError(f"score mode {mode!r} is not one of {list(SCORE_MODES)}")
    if mode in ("relatif", "cosine"):
        if row_self is None:
            raise ValueError(f"mode {mode!r} needs the training rows' self-influence")
        norms = row_self.clamp_min(NORM_FLOOR).sqrt()
        dots = dots.div_(norms if norms.dim() == 2 else norms[None, :])
    if mode == "cosine":
        if q_self is None:
            raise ValueError("mode 'cosine' needs the queries' self-influence")
        dots = dots.div_(q_self.clamp_min(NORM_FLOOR).sqrt()[:, None])
    return dots


def score_block(
    q_pre: torch.Tensor,
    rows: torch.Tensor,
    mode: str,
    q_self: torch.Tensor | None = None,
    row_self: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n_q, n_rows) scores of preconditioned queries against raw training rows."""
    return normalize(q_pre @ rows.T, mode, q_self, row_self)


class GroupPlan:
    """Total and per-group scores from one pass over the columns.

    groups: name -> regex (re.search on layer names). Layers with the same group membership form
    an atom; each atom costs one GEMM over its columns, and every output (the total first, then
    each group) is the sum of its atoms' dot products, so groups add no GEMM work.
    """

    def __init__(self, specs: list[LayerSpec], groups: dict[str, str] | None = None):
        groups = dict(groups or {})
        if "total" in groups:
            raise ValueError("layer group name 'total' is reserved for the all-layer score")
        names = [s.name for s in specs]
        member = {g: [bool(re.search(p, n)) for n in names] for g, p in groups.items()}
        for g, hits in member.items():
            if not any(hits):
                raise ValueError(f"layer group {g!r} ({groups[g]!r}) matches no logged layer; layers: {names[:8]}...")
        signature = [tuple(member[g][i] for g in groups) for i in range(len(specs))]
        atoms: dict[tuple, list[int]] = {}
        for i, sig in enumerate(signature):
            atoms.setdefault(sig, []).append(i)
        self.names = ["total", *groups]
        self.atom_layers = list(atoms.values())
        sigs = list(atoms)
        self.output_atoms = [list(range(len(sigs)))] + [
            [a for a, sig in enumerate(sigs) if sig[j]] for j in range(len(groups))
        ]
        self.membership = torch.zeros(len(specs), len(self.names), dtype=torch.float64)
        self.membership[:, 0] = 1
        for j, g in enumerate(groups):
            self.membership[:, j + 1] = torch.tensor(member[g], dtype=torch.float64)
        col = layer_columns(specs)
        self.atom_cols: list[slice | torch.Tensor] = []
        for layers in self.atom_layers:
            idx = torch.nonzero(torch.isin(col, torch.tensor(layers))).reshape(-1)
            contiguous = len(idx) == 0 or int(idx[-1] - idx[0]) + 1 == len(idx)
            self.atom_cols.append(slice(int(idx[0]), int(idx[-1]) + 1) if contiguous and len(idx) else idx)
        self.atom_uses = [sum(a in out for out in self.output_atoms) for a in range(len(self.atom_layers))]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Columns of each atom (views for contiguous atoms, copies otherwise)."""
        return [x[:, c] for c in self.atom_cols]

    def output_dots(self, atom_dots: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
        """Dot scores of every output; fresh tensors wherever `normalize` will write in place."""
        out = []
        for atoms in self.output_atoms:
            d = atom_dots[atoms[0]]
            if len(atoms) > 1:
                d = d + sum(atom_dots[a] for a in atoms[1:])
            elif mode != "dot" and self.atom_uses[atoms[0]] > 1:
                d = d.clone()
            out.append(d)
        return out


def select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k per row of `scores` (n_q, c) with candidate ids (n_q, c): larger score first, then
    smaller id. Two stable sorts: by id, then by score."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


class RunningTopK:
    """Per-query top-k over a stream of score blocks; memory O(n_q x (k + block)).

    Slots start empty (score -inf, id ID_PAD). A block only enters the sort through the entries
    at or above each query's current k-th score (found with torch.topk, linear time), and only
    for the queries whose best score in the block reaches it, so once the lists fill, a chunk
    costs a row maximum instead of a full sort. Entries equal to the k-th score always enter,
    which keeps the smaller-id tie rule exact.
    """

    def __init__(self, n_queries: int, k: int, dtype: torch.dtype = torch.float32):
        if k < 1:
            raise ValueError(f"top-k: k must be >= 1, got {k}")
        self.k = k
        self.scores = torch.full((n_queries, k), -torch.inf, dtype=dtype)
        self.ids = torch.full((n_queries, k), ID_PAD, dtype=torch.int64)

    def update(self, scores: torch.Tensor, ids: torch.Tensor, rows: slice = slice(None)) -> None:
        """scores (n, c) of the queries `rows` for candidates `ids`: (c,) shared, or (n, c)."""
        cur_s, cur_i = self.scores[rows], self.ids[rows]
        if scores.shape[0] != cur_s.shape[0]:
            raise ValueError(f"top-k update: {scores.shape[0]} score rows for {cur_s.shape[0]} queries")
        if scores.shape[1] == 0:
            return
        scores, ids = scores.to(cur_s.dtype), ids.to(torch.int64)
        best = scores.amax(1)  # a query whose best score is below its k-th cannot change (NaN: let it try)
        live = torch.nonzero((best >= cur_s[:, -1]) | best.isnan()).reshape(-1)
        if len(live) == 0:
            return
        if len(live) < scores.shape[0]:
            scores, cur_s, cur_i = scores[live], cur_s[live], cur_i[live]
            ids = ids if ids.dim() == 1 else ids[live]
            rows = torch.arange(self.scores.shape[0])[rows][live]
        enter = scores >= cur_s[:, -1:]
        counts = enter.sum(1)
        m = int(counts.max())
        if m == 0:
            return
        if m < scores.shape[1] // 4 and not best.isnan().any():  # few enter: gather them, padded with empty slots
            r, c = torch.nonzero(enter, as_tuple=True)
            slot = torch.arange(len(r)) - (torch.cumsum(counts, 0) - counts)[r]
            cand_s = torch.full((len(scores), m), -torch.inf, dtype=scores.dtype)
            cand_i = torch.full((len(scores), m), ID_PAD, dtype=torch.int64)
            cand_s[r, slot] = scores[r, c]
            cand_i[r, slot] = ids[c] if ids.dim() == 1 else ids[r, c]
            scores, ids = cand_s, cand_i
        else:
            if m < scores.shape[1]:
                scores, pos = torch.topk(scores, m, dim=1, sorted=False)  # NaN ranks first, as it always did
                ids = ids[pos] if ids.dim() == 1 else ids.gather(1, pos)
            elif ids.dim() == 1:
                ids = ids[None, :].expand(scores.shape[0], -1)
        new_s, new_i = select_topk(torch.cat([cur_s, scores], 1), torch.cat([cur_i, ids], 1), self.k)
        self.scores[rows], self.ids[rows] = new_s, new_i


@dataclass
class TopKResult:
    """scores and train_ids: (n_queries, k), best first; query_ids: (n_queries,).
    groups: the same for each requested layer group (block-restricted scores); bottom: the lowest
    scores (most opposing examples), lowest first, when asked for; info: facts about the search
    written with the results (ANN: ann, ann_candidates, ann_factory, ann_sketch_dim,
    ann_search_params)."""

    scores: np.ndarray
    train_ids: np.ndarray
    query_ids: np.ndarray
    mode: str
    damping: float
    groups: dict[str, TopKResult] = field(default_factory=dict)
    bottom: TopKResult | None = None
    info: dict[str, Any] = field(default_factory=dict)  # how it was found, e.g. ann, ann_candidates
