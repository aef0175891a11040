"""A PCA index whose fitted projections are missing from stats.h5 cannot be scored: an
IndexFormatError names stats.h5, the layer and the dataset (not a bare KeyError)."""

from __future__ import annotations

import time

import numpy as np
import pytest

import logra_dist as ld
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import read_manifest, stats_attrs, write_stats
from logra_dist.index.writer import write_index
from logra_dist.scoring.queries import check_query_store

SPECS = [LayerSpec("a", "linear", 4, 4, 2, 3), LayerSpec("b", "linear", 4, 4, 3, 2)]
CFG = ld.LoGraConfig(k_in=2, k_out=2, init="pca", hessian="none", storage_dtype="float32", flush_rows=8)


def pca_index(out, drop: str | None = None):
    rows = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
    write_index(out, SPECS, CFG.to_json(), [[(np.arange(6), rows)]])
    state = {}
    for s in SPECS:
        state[f"{s.name}/p_in"] = np.eye(s.k_in, s.d_in, dtype=np.float32)
        state[f"{s.name}/p_out"] = np.eye(s.k_out, s.d_out, dtype=np.float32)
    state.pop(drop, None)
    write_stats(out / "stats.h5", "none", 1.0, state, stats_attrs(read_manifest(out / "manifest.json"), 6))
    return out


def test_scorer_names_the_missing_projection(tmp_path):
    index = pca_index(tmp_path / "idx", drop="b/p_out")
    start = time.perf_counter()
    with pytest.raises(ld.IndexFormatError) as info:
        ld.Scorer(None, index)
    assert time.perf_counter() - start < 5
    assert str(info.value).startswith(
        f"{index / 'stats.h5'}: PCA index without its projections: layer 'b' has no dataset 'b/p_out'"
    ), info.value
    ld.Scorer(None, pca_index(tmp_path / "whole")).close()  # with them: opens


def test_query_index_check_names_the_missing_projection(tmp_path):
    whole, broken = pca_index(tmp_path / "whole"), pca_index(tmp_path / "broken", drop="a/p_in")
    with ld.GradientStore(whole) as good, ld.GradientStore(broken) as bad:
        check_query_store(good, good)
        for queries, index in ((good, bad), (bad, good)):  # a missing training projection was a KeyError
            with pytest.raises(ld.IndexFormatError, match=r"broken/stats\.h5: PCA index without its projections: "):
                check_query_store(queries, index)
