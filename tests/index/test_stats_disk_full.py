"""A disk that fills while rank 0 writes stats.h5 (after the shards are complete): a named error
saying so and what to do, nothing renamed into place, and `--resume` then finishes the index."""

from __future__ import annotations

import time

import h5py
import numpy as np
from reliability_helpers import mlp_args, mlp_worker, rows_by_id, run_mlp


def test_disk_full_while_writing_stats_then_resume(tmp_path):
    out, ref = tmp_path / "index", tmp_path / "ref"
    start = time.perf_counter()
    failed = run_mlp(out, fault="fsize_at_stats:2000")  # stats.h5 needs ~11 kB here
    elapsed = time.perf_counter() - start
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "IndexFormatError" in failed.stderr and f"{out / 'stats.h5'}: disk full while writing the statistics" in (
        failed.stderr
    ), failed.stderr[-3000:]
    assert "File too large" in failed.stderr and "rerun the same command with --resume" in failed.stderr
    assert elapsed < 60, elapsed
    assert (out / "shards" / "rank-00000.h5").exists() and (out / "shards" / "rank-00000.stats.npz").exists()
    assert not (out / "stats.h5").exists() and not (out / "stats.h5.tmp").exists()
    assert not (out / "manifest.json").exists()
    mlp_worker.run(mlp_args(out, "--resume"))  # space again: the same command with --resume
    mlp_worker.run(mlp_args(ref))
    for a, b in zip(rows_by_id(out), rows_by_id(ref)):
        np.testing.assert_array_equal(a, b)
    with h5py.File(out / "stats.h5") as got, h5py.File(ref / "stats.h5") as want:
        assert sorted(got) == sorted(want)
        for layer in want:
            for key in want[layer]:
                np.testing.assert_allclose(got[layer][key][()], want[layer][key][()], rtol=1e-5, atol=1e-6)
