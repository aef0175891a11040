"""topk.h5 is written for programs: what write_topk_h5 stores, read_topk_h5 gives back exactly."""

import numpy as np

from logra_dist.scoring.kernels import TopKResult
from logra_dist.scoring.results import read_topk_h5, write_topk_h5


def test_topk_h5_round_trip_with_groups(tmp_path):
    rng = np.random.default_rng(0)

    def result() -> TopKResult:
        return TopKResult(
            rng.standard_normal((3, 4)).astype(np.float32),
            rng.integers(0, 100, (3, 4)),
            np.array([7, 2, 9]),
            "relatif",
            0.5,
        )

    top = result()
    top.groups = {"mlp": result(), "attn": result()}
    back = read_topk_h5(write_topk_h5(tmp_path / "topk.h5", top, {"index": "/x", "world_size": 2}))
    for got, want in [(back, top), *((back.groups[g], top.groups[g]) for g in ("mlp", "attn"))]:
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.train_ids, want.train_ids)
        np.testing.assert_array_equal(got.query_ids, top.query_ids)
        assert (got.mode, got.damping) == ("relatif", 0.5)
    assert list(back.groups) == ["mlp", "attn"]
