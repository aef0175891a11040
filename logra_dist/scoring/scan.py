"""The exact scan of one rank's training rows: running top-k and bottom-k per query and output.

Bottom-k (the most opposing examples: the lowest scores) is a top-k of the negated scores, so it
streams, breaks ties by the smaller id and reduces across ranks exactly as top-k does; the
negation is undone once, on the merged (n_q, k) lists. Every output of a `GroupPlan` (the total
first, then each layer group) gets its own lists from the same GEMMs.

The rows stream in small chunks (`Scorer.chunk_rows`, 512: the GEMM's inputs stay in cache),
but the top-k lists are updated once per REDUCE_ELEMENTS scores: a `RunningTopK.update` is a
dozen tensor ops whatever its width, so at 512 rows a chunk their dispatch outweighed the
arithmetic (6.0 of 19.8 s per 64-query batch at 10M rows). The lists do not depend on how the
stream is cut (ties go to the smaller id in every block), so the result is unchanged.

Where the CPU multiplies bfloat16 fast, a bfloat16 GEMM first bounds every score of a chunk
(`prefilter.py`) and only the rows that may still enter a list are scored exactly; the lists are
refreshed after the first chunk, then at doubling intervals up to every REFRESH_ROWS rows, so
that the thresholds it compares against rise early and keep rising.
"""

from __future__ import annotations

import torch

from logra_dist.scoring import prefilter
from logra_dist.scoring.kernels import GroupPlan, RunningTopK, TopKResult, normalize

REDUCE_ELEMENTS = 1 << 19  # scores (queries x rows) per top-k update: 2 MB of float32, cache-sized
REFRESH_ROWS = 1 << 16  # with the bfloat16 prefilter: rows streamed between threshold refreshes
PREFILTER_CHUNK_ROWS = 4096  # its chunks: a dozen small ops per chunk, amortized (512 rows: slower than no filter)


class _Reduction:
    """One query chunk's dot scores of consecutive row chunks, gathered until REDUCE_ELEMENTS,
    then normalized and folded into the running lists of every output in one update each."""

    def __init__(
        self, tracker, mode: str, rows: slice, q_self: torch.Tensor, tops: list[RunningTopK], bottoms: list[RunningTopK]
    ):
        self.tracker, self.mode, self.rows, self.q_self = tracker, mode, rows, q_self
        self.tops, self.bottoms = tops, bottoms
        self.dots: list[list[torch.Tensor]] = []  # per chunk, per output
        self.ids: list[torch.Tensor] = []
        self.row_self: list[torch.Tensor] = []
        self.width = 0

    def add(self, dots: list[torch.Tensor], ids: torch.Tensor, row_self: torch.Tensor | None) -> None:
        self.dots.append(dots)
        self.ids.append(ids)
        if row_self is not None:
            self.row_self.append(row_self)
        self.width += len(ids)
        if self.width * (self.rows.stop - self.rows.start) >= REDUCE_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.width:
            return
        ids = self.ids[0] if len(self.ids) == 1 else torch.cat(self.ids)
        row_self = None
        if self.row_self:
            row_self = self.row_self[0] if len(self.row_self) == 1 else torch.cat(self.row_self)
        with self.tracker.phase("topk-reduce"):
            for o in range(len(self.tops)):
                parts = [chunk[o] for chunk in self.dots]
                d = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
                s = normalize(d, self.mode, self.q_self[:, o], None if row_self is None else row_self[:, o])
                self.tops[o].update(s, ids, self.rows)
                if self.bottoms:
                    self.bottoms[o].update(-s, ids, self.rows)
        self.dots, self.ids, self.row_self, self.width = [], [], [], 0


def score_local(
    scorer, q, plan: GroupPlan, k: int, bottomk: int, self_plan
) -> tuple[list[RunningTopK], list[RunningTopK]]:
    """(top lists, bottom lists; empty without bottomk) of this rank's rows, one per output."""
    n_q, dtype = len(q.ids), scorer.score_dtype
    tops = [RunningTopK(n_q, k, dtype) for _ in plan.names]
    bottoms = [RunningTopK(n_q, bottomk, dtype) for _ in plan.names] if bottomk else []
    membership = plan.membership.to(dtype)
    q_self = q.self_layers @ membership  # (n_q, outputs)
    q_atoms = plan.split(q.pre)
    per_rank = len(scorer.store) // scorer.world
    pre = prefilter.Prefilter(plan, q_atoms, scorer.mode) if prefilter.enabled(n_q, max(k, bottomk), per_rank) else None
    chunk_rows = max(scorer.chunk_rows, PREFILTER_CHUNK_ROWS) if pre is not None else scorer.chunk_rows
    qc = scorer._query_chunk(n_q, len(plan.atom_layers), chunk_rows)
    spans = [slice(a, min(n_q, a + qc)) for a in range(0, n_q, qc)]
    pending = [_Reduction(scorer.tracker, scorer.mode, r, q_self[r], tops, bottoms) for r in spans]
    kept = torch.empty(0, 0)
    since_flush, refresh = 0, min(REFRESH_ROWS, chunk_rows)  # refresh early, then every REFRESH_ROWS
    for _, ids, rows, row_self_layers in scorer._chunks(*self_plan, chunk_rows):
        row_self = None if row_self_layers is None else row_self_layers @ membership
        if pre is not None:
            with scorer.tracker.phase("prefilter"):
                keep = pre.keep(rows, spans, q_self, row_self, tops, bottoms)
            since_flush += len(ids)
            if since_flush >= refresh:  # raise the thresholds the filter compares against
                for reduction in pending:
                    reduction.flush()
                since_flush, refresh = 0, min(REFRESH_ROWS, 2 * refresh)
            if len(keep) == 0:
                continue
            if len(keep) < len(ids):  # the kept rows into a reused buffer (fewer, steadier allocations)
                if kept.shape[0] < rows.shape[0]:  # the first chunk sets the width and dtype
                    kept = torch.empty(rows.shape, dtype=rows.dtype)
                ids, rows = ids[keep], torch.index_select(rows, 0, keep, out=kept[: len(keep)])
                row_self = None if row_self is None else row_self[keep]
        row_atoms = plan.split(rows)
        for r, reduction in zip(spans, pending):
            with scorer.tracker.phase("gemm"):
                dots = plan.output_dots([qa[r] @ ra.T for qa, ra in zip(q_atoms, row_atoms)], scorer.mode)
            reduction.add(dots, ids, row_self)
    for reduction in pending:
        reduction.flush()
    return tops, bottoms


def attach_bottoms(total: TopKResult, merged: list[TopKResult], names: list[str]) -> None:
    """Put the merged bottom lists (of negated scores) on the total and its groups, lowest first."""
    for name, res in zip(names, merged):
        res.scores = -res.scores
        target = total if name == "total" else total.groups[name]
        target.bottom = res
