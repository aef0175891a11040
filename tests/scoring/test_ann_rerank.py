"""The ANN re-rank reads only its candidate rows, each verified against its own checksum (kept in
the .ann file by `ann build`), decoded once; loaded files are reused across a scorer's batches."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from ann import build_index, queries

import logra_dist as ld
from logra_dist.index.format import IndexFormatError
from logra_dist.index.stream import plain_runs
from logra_dist.scoring import ann as scoring_ann
from logra_dist.scoring.ann import build_ann


@pytest.mark.parametrize("storage", ["int8", "float16"])
def test_codec_rows_rerank_equals_the_exact_scan(tmp_path, storage):
    index = tmp_path / "i"
    build_index(index, 700, 1, 2, storage=storage)
    build_ann(index, factory="Flat", mode="relatif", dim=256)  # d = D: no sketch, an exact search
    q = queries(5, 256, seed=3)
    sc = ld.Scorer(None, index, mode="relatif")
    sc.add_query_gradients(q, np.arange(5))
    exact = sc.topk(10)
    got = sc.topk(10, ann=True, candidates=20)
    np.testing.assert_array_equal(got.train_ids, exact.train_ids)
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-5, atol=0)
    first = dict(scoring_ann._LOADED[sc])
    again = sc.topk(10, ann=True, candidates=20)  # the second batch reuses the loaded files
    assert all(scoring_ann._LOADED[sc][p][1] is first[p][1] for p in first)
    np.testing.assert_array_equal(again.train_ids, got.train_ids)
    sc.close()


def test_a_corrupted_candidate_row_is_named(tmp_path):
    index = tmp_path / "i"
    build_index(index, 300, 1, 1, storage="float16")
    build_ann(index, factory="Flat", mode="dot")
    shard = index / "shards" / "rank-00000.h5"
    with h5py.File(shard, "r") as f:
        runs = plain_runs(f["grads"], 2)
        row_bytes = f["grads"].shape[1] * 2
    data = bytearray(shard.read_bytes())
    data[int(runs[0, 1]) + 137 * row_bytes + 5] ^= 0x40  # row 137, one bit
    shard.write_bytes(bytes(data))
    sc = ld.Scorer(None, index, mode="dot")
    sc.add_query_gradients(queries(2, 256), np.arange(2))
    with pytest.raises(IndexFormatError, match=r"rank-00000\.h5: row 137 fails its checksum"):
        sc.topk(5, ann=True, candidates=300)  # every row a candidate
    sc.close()


def test_corrupted_faiss_bytes_are_refused_before_loading(tmp_path):
    index = tmp_path / "i"
    build_index(index, 200, 1, 1, storage="float16")
    build_ann(index, factory="HNSW32", mode="dot")
    with h5py.File(index / "shards" / "rank-00000.ann", "a") as f:  # verified in pieces, then read in pieces
        f["faiss"][len(f["faiss"]) // 2] ^= 1
    sc = ld.Scorer(None, index, mode="dot")
    sc.add_query_gradients(queries(2, 256), np.arange(2))
    with pytest.raises(IndexFormatError, match=r"rank-00000\.ann: the FAISS bytes do not match their digest"):
        sc.topk(5, ann=True, candidates=10)
    sc.close()


def test_candidate_rows_read_one_by_one_are_the_stored_bytes_and_a_cut_shard_is_named(tmp_path):
    """gather_stored (one preadv per row at the cached chunk runs) returns exactly the stored rows
    at scattered positions, and a shard cut short after its runs were cached is refused."""
    from logra_dist.index.h5io import row_checksums
    from logra_dist.index.stream import gather_stored

    index = tmp_path / "i"
    build_index(index, 9000, 1, 1, storage="int8")
    store = ld.GradientStore(index)
    shard = store.shards[0].path
    with h5py.File(shard, "r") as f:
        stored = f["grads"][()]
    positions = np.array([0, 1, 4095, 4096, 5000, 8191, 8192, 8999])
    got = gather_stored(store, 0, positions, row_checksums(stored[positions]))
    np.testing.assert_array_equal(got, stored[positions])
    with h5py.File(shard, "r") as f:
        last = plain_runs(f["grads"], 1)[-1]
    with open(shard, "r+b") as fh:  # cut inside the last chunk run, before the last row ends
        fh.truncate(int(last[1]) + (8999 - int(last[0])) * stored.shape[1] + 10)
    with pytest.raises(IndexFormatError, match=r"rank-00000\.h5: rows unreadable .*cut short"):
        gather_stored(store, 0, positions, row_checksums(stored[positions]))
