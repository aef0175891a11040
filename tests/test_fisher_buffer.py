"""hessian="raw" buffers rows and folds them into the Fisher with one GEMM per FISHER_GEMM_ROWS
rows: every reader must see exactly sum_i g_i g_i^T over ALL rows added so far."""
import torch

from logra_dist.projection import LayerSpec
from logra_dist.statistics import FISHER_GEMM_ROWS, Accumulator


def test_buffered_fisher_equals_direct_sum_at_every_read():
    specs = [LayerSpec("a", "linear", 8, 8, 2, 3), LayerSpec("b", "linear", 8, 8, 4, 1)]
    acc = Accumulator(specs, "raw", torch.float64)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for batch in (3, 5, FISHER_GEMM_ROWS - 1, 1, 7, 0, 2):  # crosses the threshold, ends mid-buffer
        rows = torch.randn(batch, 10, generator=gen, dtype=torch.float64)
        acc.update_rows(rows)
        seen.append(rows)
        all_rows = torch.cat(seen)
        flat = acc.flat()  # a commit point reads mid-buffer
        expect = torch.cat([(all_rows[:, :6].T @ all_rows[:, :6]).reshape(-1),
                            (all_rows[:, 6:].T @ all_rows[:, 6:]).reshape(-1)])
        torch.testing.assert_close(flat[:expect.numel()], expect)
        assert flat[expect.numel()] == all_rows.shape[0]
    fresh = Accumulator(specs, "raw", torch.float64)
    fresh.update_rows(torch.randn(2, 10, dtype=torch.float64))  # pending rows are dropped by a load
    fresh.load_flat(acc.flat())
    torch.testing.assert_close(fresh.flat(), acc.flat())
    pre = fresh.preconditioner(1.0)
    assert set(pre.layers) == {"a", "b"}
