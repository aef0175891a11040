"""The exact scan of one rank's training rows: running top-k and bottom-k per query and output.

Bottom-k (the most opposing examples: the lowest scores) is a top-k of the negated scores, so it
streams, breaks ties by the smaller id and reduces across ranks exactly as top-k does; the
negation is undone once, on the merged (n_q, k) lists. Every output of a `GroupPlan` (the total
first, then each layer group) gets its own lists from the same GEMMs.
"""

from __future__ import annotations

from logra_dist.scoring.kernels import GroupPlan, RunningTopK, TopKResult, normalize


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
    qc = scorer._query_chunk(n_q, len(plan.atom_layers))
    for _, ids, rows, row_self_layers in scorer._chunks(*self_plan):
        row_atoms = plan.split(rows)
        row_self = None if row_self_layers is None else row_self_layers @ membership
        for a in range(0, n_q, qc):
            b = min(n_q, a + qc)
            with scorer.tracker.phase("gemm"):
                dots = plan.output_dots([qa[a:b] @ ra.T for qa, ra in zip(q_atoms, row_atoms)], scorer.mode)
            with scorer.tracker.phase("topk-reduce"):
                for o, d in enumerate(dots):
                    s = normalize(d, scorer.mode, q_self[a:b, o], None if row_self is None else row_self[:, o])
                    tops[o].update(s, ids, slice(a, b))
                    if bottoms:
                        bottoms[o].update(-s, ids, slice(a, b))
    return tops, bottoms


def attach_bottoms(total: TopKResult, merged: list[TopKResult], names: list[str]) -> None:
    """Put the merged bottom lists (of negated scores) on the total and its groups, lowest first."""
    for name, res in zip(names, merged):
        res.scores = -res.scores
        target = total if name == "total" else total.groups[name]
        target.bottom = res
