"""EKFAC statistics and the exact Fisher's statistics pass under 2 gloo ranks (torchrun, uneven
shares) equal one process: the finalize all-reduce sums KFAC factors and the row Fisher alike."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import curvature_worker  # noqa: E402
from jobs import free_port, run_job  # noqa: E402

import logra_dist as ld  # noqa: E402
from logra_dist.core.curvature import CURVATURES  # noqa: E402
from logra_dist.index.format import read_stats  # noqa: E402

pytestmark = pytest.mark.distributed


def test_two_ranks_equal_one_process(tmp_path):
    run_job(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
        + [str(HERE / "curvature_worker.py"), str(tmp_path / "two")],
        tmp_path / "two.log",
        timeout_s=240,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curvature_worker.log(str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    stores = {k: ld.GradientStore(tmp_path / k) for k in ("one", "two")}
    assert [s.rows for s in stores["two"].shards] == [13, 8]
    (rows1, ids1), (rows2, ids2) = ((s[:][np.argsort(s.ids)], np.sort(s.ids)) for s in stores.values())
    np.testing.assert_array_equal(ids1, ids2)
    np.testing.assert_allclose(rows2, rows1, rtol=1e-6, atol=1e-9)
    (attrs1, st1), (_, st2) = read_stats(tmp_path / "one" / "stats.h5"), read_stats(tmp_path / "two" / "stats.h5")
    assert attrs1["hessian"] == "ekfac"
    m1, m2 = (json.loads((tmp_path / k / "manifest.json").read_text()) for k in ("one", "two"))
    assert m1["samples_in_statistics"] == m2["samples_in_statistics"] == 3 * curvature_worker.N  # C copies each
    assert m2["lambdas"] == pytest.approx(m1["lambdas"], rel=1e-9)
    for key in st1:
        if key.endswith("evals"):
            np.testing.assert_allclose(st2[key], st1[key], rtol=1e-9, atol=1e-14)
    layout = stores["one"].layout
    v = torch.randn(5, rows1.shape[1], dtype=torch.float64)
    a, b = (CURVATURES.get("ekfac").from_state(layout, 1.0, st).apply(v) for st in (st1, st2))
    torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)  # eigenbases too (sign-free comparison)
    for s in stores.values():
        s.close()
