"""hessian="raw" buffers rows and folds them into the Fisher with one GEMM per FISHER_GEMM_ROWS
rows: every reader must see exactly sum_i g_i g_i^T over ALL rows added so far."""

import torch

from logra_dist.core.curvature.raw import FISHER_GEMM_ROWS, Raw
from logra_dist.core.projection import LayerSpec


def test_buffered_fisher_equals_direct_sum_at_every_read():
    specs = [LayerSpec("a", "linear", 8, 8, 2, 3), LayerSpec("b", "linear", 8, 8, 4, 1)]
    acc = Raw(specs, torch.float64)
    gen = torch.Generator().manual_seed(0)
    seen = []
    for batch in (3, 5, FISHER_GEMM_ROWS - 1, 1, 7, 0, 2):  # crosses the threshold, ends mid-buffer
        rows = torch.randn(batch, 10, generator=gen, dtype=torch.float64)
        acc.update_rows(rows)
        seen.append(rows)
        all_rows = torch.cat(seen)
        flat = acc.flat()  # a commit point reads mid-buffer
        expect = torch.cat(
            [(all_rows[:, :6].T @ all_rows[:, :6]).reshape(-1), (all_rows[:, 6:].T @ all_rows[:, 6:]).reshape(-1)]
        )
        torch.testing.assert_close(flat[: expect.numel()], expect)
        assert flat[expect.numel()] == all_rows.shape[0]
    fresh = Raw(specs, torch.float64)
    fresh.update_rows(torch.randn(2, 10, dtype=torch.float64))  # pending rows are dropped by a load
    fresh.load_flat(acc.flat())
    torch.testing.assert_close(fresh.flat(), acc.flat())
    pre = fresh.preconditioner(1.0)
    assert set(pre.layers) == {"a", "b"}


def test_tiled_fisher_update_equals_direct_sum(monkeypatch):
    """Wide layers update only the tiles on and above the diagonal; every read (before and after
    more updates, widths not a multiple of the tile) must still see the full symmetric sum."""
    from logra_dist.core.curvature import raw as statistics

    monkeypatch.setattr(statistics, "FISHER_TILE", 4)
    specs = [
        LayerSpec("wide", "linear", 8, 8, 5, 3),
        LayerSpec("narrow", "linear", 8, 8, 2, 3),
    ]  # 15 = 4+4+4+3; 6 < 2 tiles
    acc = Raw(specs, torch.float32)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for batch in (FISHER_GEMM_ROWS + 3, 2, FISHER_GEMM_ROWS, 5):
        rows = torch.randn(batch, 21, generator=gen, dtype=torch.float64)
        acc.update_rows(rows.float())
        seen.append(rows)
        all_rows = torch.cat(seen)
        flat = acc.flat()
        expect = torch.cat(
            [(all_rows[:, :15].T @ all_rows[:, :15]).reshape(-1), (all_rows[:, 15:].T @ all_rows[:, 15:]).reshape(-1)]
        )
        torch.testing.assert_close(flat[: expect.numel()], expect, rtol=1e-5, atol=1e-4)
    wide = acc.sums["wide/fisher"]
    torch.testing.assert_close(wide, wide.T, rtol=0, atol=0)


def test_lent_statistics_stay_exactly_those_of_the_rows_before_the_commit(monkeypatch):
    """A commit lends views of the sums to the writer thread (no copy): rows arriving until it
    releases them are buffered, not folded in, and past the sums' size the logger waits. The wide
    layer is 3 tiles: what is lent is the complete symmetric sum, not just its upper tiles."""
    import threading
    import time

    import numpy as np

    from logra_dist.core.curvature import raw as statistics

    monkeypatch.setattr(statistics, "FISHER_TILE", 64)
    specs = [LayerSpec("a", "linear", 16, 16, 12, 16), LayerSpec("b", "linear", 16, 16, 4, 1)]  # widths 192, 4
    acc = Raw(specs, torch.float32)
    assert acc._lend_rows == (192 * 192 + 16) // 196 > 2 * FISHER_GEMM_ROWS
    gen = torch.Generator().manual_seed(0)
    fisher = lambda r: torch.cat([(r[:, :192].T @ r[:, :192]).reshape(-1), (r[:, 192:].T @ r[:, 192:]).reshape(-1)])  # noqa: E731
    before = torch.randn(FISHER_GEMM_ROWS + 3, 196, generator=gen)
    acc.update_rows(before)
    parts, released = acc.lend()
    after = torch.randn(2 * FISHER_GEMM_ROWS, 196, generator=gen)
    acc.update_rows(after)  # full buffers, but the sums are lent: not folded in
    got = np.concatenate([p.ravel() for p in parts[:-1]])
    np.testing.assert_allclose(got, fisher(before).numpy(), rtol=1e-5, atol=1e-4)
    assert parts[-1][0] == len(before) and parts[0].dtype == np.float32  # counts at the commit, own dtype
    threading.Timer(0.3, released.set).start()  # past the cap update_rows waits for the release
    start = time.monotonic()
    more = torch.randn(acc._lend_rows, 196, generator=gen)
    acc.update_rows(more)
    assert time.monotonic() - start >= 0.25 and released.is_set()
    flat = acc.flat()
    torch.testing.assert_close(flat[:-3], fisher(torch.cat([before, after, more])).double(), rtol=1e-5, atol=1e-3)
    # a snapshot restores exactly: its parts' float64 concatenation is flat()
    fresh = Raw(specs, torch.float32)
    fresh.load_snapshot(acc.snapshot())
    torch.testing.assert_close(fresh.flat(), flat)
