"""The self-influence cache (N x L float32, one column per layer) is checked and written block
by block: its checksum equals the whole-array one, and scoring from a cached entry never holds
the entry whole (at 10M rows of 40 layers it is 1.6 GB on every rank)."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
import torch

import logra_dist as ld
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import dataset_sha, dataset_sha_streamed, read_manifest, stats_attrs, write_stats
from logra_dist.index.writer import write_index


@pytest.mark.parametrize("shape", [(0, 4), (5, 3), (70_001, 3), (9,), ()])
def test_streamed_checksum_equals_the_whole_array_one(tmp_path, shape):
    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = arr
        assert dataset_sha_streamed(f["x"], rows=4096) == dataset_sha(arr)
    if arr.size:
        changed = arr.copy()
        changed.reshape(-1)[-1] += 1
        assert dataset_sha_streamed(changed, rows=4096) != dataset_sha(arr)


def test_scoring_from_the_cache_never_reads_the_entry_whole(tmp_path):
    n, layers = 200_000, 48  # the cached entry: 200k x 48 float32 = 38 MB; the rows 19 MB
    specs = [LayerSpec(f"l{i}", "linear", 2, 2, 1, 1) for i in range(layers)]
    cfg = ld.LoGraConfig(k_in=1, k_out=1, hessian="none", storage_dtype="float16", flush_rows=1 << 14)
    gen, step = torch.Generator().manual_seed(0), 1 << 14
    blocks = [
        (torch.arange(a, min(n, a + step)), torch.randn(min(n, a + step) - a, layers, generator=gen))
        for a in range(0, n, step)
    ]
    write_index(tmp_path / "idx", specs, cfg.to_json(), [blocks])
    attrs = stats_attrs(read_manifest(tmp_path / "idx" / "manifest.json"), n)
    write_stats(tmp_path / "idx" / "stats.h5", "none", 1.0, {}, attrs)
    queries = torch.randn(4, layers, generator=gen)

    def scored():
        sc = ld.Scorer(None, tmp_path / "idx", mode="relatif", chunk_rows=8192)
        sc.add_query_gradients(queries, np.arange(4))
        tracemalloc.start()
        result = sc.topk(5)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sc.close()
        assert (tmp_path / "idx" / "selfinf.h5").exists()  # written by the first run
        return result, peak

    first, _ = scored()
    again, peak = scored()  # reads the cached entry
    np.testing.assert_array_equal(again.train_ids, first.train_ids)
    entry = n * layers * 4
    assert peak < entry / 2, f"scoring from the cache peaked at {peak / 2**20:.1f} MiB, entry {entry / 2**20:.1f} MiB"
