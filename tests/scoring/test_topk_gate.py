"""RunningTopK skips queries whose best score in a block is below their k-th and gathers the
few entries that enter instead of sorting: the result must still equal one sort of everything
(larger score first, then smaller id), with ties, infinities and per-query candidate ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scorer_helpers import reference_topk

from logra_dist.scoring.kernels import ID_PAD, RunningTopK


@pytest.mark.parametrize("values", [None, 50, 4])
@pytest.mark.parametrize("per_row_ids", [False, True])
def test_gated_running_topk_equals_one_sort(values, per_row_ids):
    gen = torch.Generator().manual_seed(7)
    n_q, n, k = 9, 600, 5
    scores = (
        torch.randn(n_q, n, generator=gen)
        if values is None
        else torch.randint(0, values, (n_q, n), generator=gen).float()
    )  # ties, few or many
    scores[0, 17] = scores[3, 590] = torch.inf
    scores[5, :] = -torch.inf  # a query that never beats its empty slots' scores
    ids = torch.randperm(n, generator=gen) * 3 + 1
    ref_s, ref_i = reference_topk(scores.numpy(), ids.numpy(), k)
    for chunk, q_chunk in [(120, 9), (37, 4), (600, 2)]:
        top = RunningTopK(n_q, k)
        for s in range(0, n, chunk):
            for a in range(0, n_q, q_chunk):
                block_ids = ids[s : s + chunk]
                if per_row_ids:
                    block_ids = block_ids[None].expand(min(q_chunk, n_q - a), -1).clone()
                top.update(scores[a : a + q_chunk, s : s + chunk], block_ids, slice(a, a + q_chunk))
        np.testing.assert_array_equal(top.scores.numpy(), ref_s)
        np.testing.assert_array_equal(top.ids.numpy(), ref_i)
        assert not (top.ids == ID_PAD).any()
