"""A bfloat16 pass that proves which training rows cannot enter a top-k list, so that the exact
scan computes exact scores only for the others. The result is the exact scan's, not an estimate.

On CPUs with AVX512-BF16 (or AMX) a bfloat16 GEMM runs 4-5x faster than float32 (64 queries x
4096 rows x 1024: 1.4 ms against 6.4 ms here). Each approximate dot s~ of query q and row r
obeys |s~ - s| <= eps_K ||q|| ||r||: both operands rounded to bfloat16 (unit roundoff u = 2^-8,
2u + u^2 per product), the float32 accumulation of K terms (K 2^-24 each), the bfloat16 output
rounding (u), and the exact path's own float32 accumulation (another K 2^-24, so the skipped
row's float32 score is below the threshold too): eps_K = 2^-6 + 2 K 2^-24 covers these with a
margin. A row's bound is the sum of its atoms' bounds, divided by the same positive norms as the
score (relatif, cosine). A row is skipped only when, for every query and output, its upper bound
is below that list's current k-th exact score (which only rises) and, with bottom-k, its lower
bound above the bottom list's: it cannot be in the final lists. NaN and infinite scores never
compare below, so such rows are always scored exactly, as before. The thresholds are compared in
float32, each lowered by 2^-20 of itself so that rounding a float64 list's k-th score (or the
cosine product) can only keep more rows.

`enabled()` checks the CPU flag, that the filter pays (enough queries, k small against the rows)
and, once per process, that the bfloat16 GEMM meets the bound on random data (a BLAS that
accumulated in bfloat16 would not): otherwise the scan runs as before.
"""

from __future__ import annotations

import functools
import os

import torch

from logra_dist.scoring.kernels import NORM_FLOOR, GroupPlan

ENV = "LOGRA_DIST_BF16_PREFILTER"  # "0": never; "1": whenever the bfloat16 GEMM is sound; unset: auto (CPU flag)


def eps(k: int) -> float:
    """Bound on |s~ - s| / (||q|| ||r||) for dots over k columns (module docstring)."""
    return 2.0**-6 + 2.0 * k * 2.0**-24


@functools.cache
def _sound() -> bool:
    """The bfloat16 GEMM meets eps on random data, wide-ranged norms included."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, 16, dtype=torch.float64)[:, None]
    q = torch.randn(16, 512, generator=gen, dtype=torch.float64) * scales
    r = torch.randn(300, 512, generator=gen, dtype=torch.float64)
    approx = (q.float().bfloat16() @ r.float().bfloat16().T).double()
    bound = eps(512) * q.norm(dim=1)[:, None] * r.norm(dim=1)[None, :]
    return bool(((approx - q @ r.T).abs() <= bound).all())


MIN_QUERIES = 4  # fewer: the bfloat16 GEMM saves no more than the filter's own passes over the rows
ROWS_PER_LISTED = 1000  # rows per rank per list entry (max(k, bottomk)) below which too few rows are skipped


def worthwhile(n_queries: int, k: int, rows: int) -> bool:
    """Where the filter pays, measured at 100k and 1M rows (bench/results/prefilter.json): at
    100k rows 4 queries take 0.94x the plain scan's time but 1 query 1.03x, and k = 1000 1.14x
    (the k-th scores stay low, so few rows fall below them) while k = 1000 at 1M rows is 0.87x."""
    return n_queries >= MIN_QUERIES and rows >= ROWS_PER_LISTED * k


def enabled(n_queries: int, k: int, rows: int) -> bool:
    """Whether the scan should prefilter: ENV "0" never, "1" always where the GEMM is sound
    (tests), else on a CPU with fast bfloat16 and where `worthwhile`."""
    setting = os.environ.get(ENV)
    if setting == "0":
        return False
    if setting != "1":
        flag = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if not ((flag is not None and flag()) or (amx is not None and amx())):
            return False
        if not worthwhile(n_queries, k, rows):
            return False
    return _sound()


class Prefilter:
    """The bfloat16 queries of one scan and their atoms' bound factors; `keep` picks the rows of
    a chunk that may still enter a list. Few, large ops per chunk: each small op costs tens of
    microseconds beside the stream's thread, so per 512-row chunk they outweighed the GEMM saved."""

    def __init__(self, plan: GroupPlan, q_atoms: list[torch.Tensor], mode: str):
        self.plan, self.mode = plan, mode
        self.q_atoms = [qa.float().bfloat16() for qa in q_atoms]
        self._low = torch.empty(0, 0, dtype=torch.bfloat16)  # the chunk's rows in bfloat16
        # (n_q, atoms): eps(K_a) ||q_a||; an output's bound is this @ (row norms of its atoms)
        self.q_bounds = torch.stack([eps(qa.shape[1]) * qa.float().norm(dim=1) for qa in q_atoms], 1)

    def keep(
        self,
        rows: torch.Tensor,
        spans: list[slice],
        q_self: torch.Tensor,
        row_self: torch.Tensor | None,
        tops: list,
        bottoms: list,
    ) -> torch.Tensor:
        """Indices of the chunk's rows (n, D) that some query may still rank (module docstring)."""
        row_atoms = self.plan.split(rows)
        norms = torch.stack([ra.float().norm(dim=1) for ra in row_atoms], 1) * (1 + 1e-5)  # (n, atoms)
        if self._low.shape[0] < rows.shape[0]:  # one reused buffer: no per-chunk 8 MB allocation
            self._low = torch.empty(rows.shape, dtype=torch.bfloat16)
        low = self.plan.split(self._low[: rows.shape[0]].copy_(rows))
        scale = None  # relatif, cosine: 1 / sqrt(row self-influence) per output, (outputs, n)
        if self.mode != "dot":
            scale = row_self.float().T.clamp_min(NORM_FLOOR).rsqrt()
        alive = torch.zeros(rows.shape[0], dtype=torch.bool)
        for r in spans:
            approx = self.plan.output_dots([(qa[r] @ ra.T).float() for qa, ra in zip(self.q_atoms, low)], "dot")
            for o, (s, atoms) in enumerate(zip(approx, self.plan.output_atoms)):
                b = self.q_bounds[r][:, atoms] @ norms[:, atoms].T  # (n_r, n)
                thresholds = [tops[o].scores[r, -1:]] + ([bottoms[o].scores[r, -1:]] if bottoms else [])
                for sign, t in zip((1.0, -1.0), thresholds):  # bottom lists hold -s
                    t = t.float()
                    if self.mode == "cosine":  # s / sqrt(q_self) < t  <=>  s < t sqrt(q_self)
                        t = t * q_self[r, o : o + 1].float().clamp_min(NORM_FLOOR).sqrt()
                    # lowered by 2^-20 |t| (16 float32 ulps): the rounding of a float64 list's
                    # threshold to float32, and of the cosine product, can never raise it
                    t = t - t.abs() * 2.0**-20
                    bound = torch.add(b, s, alpha=sign)
                    if scale is not None:
                        bound.mul_(scale[o])
                    # a row stays unless every query's bound is below its k-th; NaN never compares below
                    alive |= ~(bound.sub_(t).amax(0) < 0)
        return torch.nonzero(alive).reshape(-1)
