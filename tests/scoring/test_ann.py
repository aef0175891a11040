"""ANN retrieval with exact re-ranking (scoring/ann.py, index/ann.py), against the exact scan.

Synthetic structured rows (bench/ann.py: low rank, decaying spectrum, noisy tail, norm outliers)
with a raw projected Fisher. Exact factory without a sketch: exactly the exact top-k; with a
sketch: a recall bound measured here; 2 and 3 scoring ranks (torchrun) equal 1; stale ANN files
refused naming the field; results record ANN and C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from ann import build_index, queries, recall

import logra_dist as ld
from logra_dist.index.format import IndexFormatError
from logra_dist.scoring.ann import build_ann

REPO = Path(__file__).resolve().parents[2]
MODES = ("dot", "relatif", "cosine")


def topk(index: Path, q: np.ndarray, mode: str, k: int, damping=None, **kw) -> ld.TopKResult:
    sc = ld.Scorer(None, index, mode=mode, damping=damping)
    sc.add_query_gradients(q, np.arange(len(q)))
    try:
        return sc.topk(k, **kw)
    finally:
        sc.close()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """D = 256, 900 rows in 3 shards of unequal size."""
    out = tmp_path_factory.mktemp("ann") / "index"
    build_index(out, 900, 1, 3, storage="float32")
    return out


@pytest.mark.parametrize("union_gemm", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_flat_without_sketch_returns_the_exact_topk(small, mode, union_gemm, monkeypatch):
    """Both re-rank paths: one GEMM against the candidates' union, or each query's own rows."""
    monkeypatch.setattr(ld.scoring.ann, "UNION_GEMM_RATIO", 64 if union_gemm else 0)
    q = queries(9, 256, seed=1)
    build_ann(small, factory="Flat", mode=mode, dim=256)  # d = D: no sketch
    exact = topk(small, q, mode, 10)
    got = topk(small, q, mode, 10, ann=True, candidates=10)
    np.testing.assert_array_equal(got.train_ids, exact.train_ids)
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-5, atol=0)
    want = {"ann": True, "ann_candidates": 10, "ann_factory": "Flat", "ann_sketch_dim": 256, "ann_search_params": ""}
    assert got.info == want
    assert exact.info == {}


def test_search_params_given_at_scoring_replace_the_files_own(small):
    """IVF4 built with nprobe=1 (one of 4 lists probed) misses part of the exact top-k; scoring
    with search_params="nprobe=4" probes every list: the exact top-k, recorded in info; the next
    call without them is back to the file's nprobe=1; parameters FAISS does not know for the
    factory are a ValueError naming them."""
    q = queries(9, 256, seed=1)
    build_ann(small, factory="IVF4,Flat", mode="relatif", dim=256, search_params="nprobe=1")
    exact = topk(small, q, "relatif", 10)
    sc = ld.Scorer(None, small, mode="relatif")
    sc.add_query_gradients(q, np.arange(len(q)))
    try:
        one = sc.topk(10, ann=True, candidates=10)
        every = sc.topk(10, ann=True, candidates=10, search_params="nprobe=4")
        again = sc.topk(10, ann=True, candidates=10)
        with pytest.raises(ValueError, match=r"efSearch=9.*IVF4,Flat"):
            sc.topk(10, ann=True, candidates=10, search_params="efSearch=9")
        with pytest.raises(ValueError, match="ann=True"):
            sc.topk(10, search_params="nprobe=4")
    finally:
        sc.close()
    assert recall(exact.train_ids, one.train_ids) < 1.0
    np.testing.assert_array_equal(every.train_ids, exact.train_ids)
    np.testing.assert_array_equal(again.train_ids, one.train_ids)
    assert (one.info["ann_search_params"], every.info["ann_search_params"]) == ("nprobe=1", "nprobe=4")
    assert again.info["ann_search_params"] == "nprobe=1"


def test_build_params_shape_the_graph_and_are_recorded(small):
    """`build_params` reach FAISS before the rows are added (HNSW's efConstruction, kept in the
    file) and the record; parameters FAISS does not know for the factory are a ValueError
    naming both, before any file is written."""
    import faiss

    from logra_dist.cli.main import main
    from logra_dist.index.ann import ann_path, read_record

    build = ["ann", "build", str(small), "--factory", "HNSW16", "--sketch-dim", "64"]
    assert main([*build, "--build-params", "efConstruction=23"]) == 0
    paths = [ann_path(info.path) for info in ld.GradientStore(small).shards]
    for path in paths:
        assert read_record(path).build_params == "efConstruction=23"
        with h5py.File(path, "r") as f:
            index = faiss.downcast_index(faiss.deserialize_index(f["faiss"][()]))
        assert index.hnsw.efConstruction == 23
    for path in paths:
        path.unlink()
    with pytest.raises(ValueError, match=r"build parameters 'nprobe=4' do not apply to factory 'HNSW16'"):
        build_ann(small, factory="HNSW16", mode="relatif", dim=64, build_params="nprobe=4")
    store = ld.GradientStore(small)
    assert not any(ann_path(info.path).exists() for info in store.shards)


def test_quantized_graph_storage_trains_and_reranks_exactly(small):
    """HNSW over SQ8-coded vectors (trained on the shard's sample; 0.64x the files at 1M rows,
    bench/results/scale-1m-hnsw-storage.json): with every row of a shard a candidate, the
    re-rank from the full rows gives exactly the exact top-k, whatever the codes lost."""
    from logra_dist.index.ann import ann_path, read_record

    q = queries(9, 256, seed=4)
    build_ann(small, factory="HNSW32_SQ8", mode="dot", dim=64)
    assert all(read_record(ann_path(i.path)).factory == "HNSW32_SQ8" for i in ld.GradientStore(small).shards)
    exact = topk(small, q, "dot", 10)
    got = topk(small, q, "dot", 10, ann=True, candidates=400, search_params="efSearch=400")
    np.testing.assert_array_equal(got.train_ids, exact.train_ids)
    np.testing.assert_allclose(got.scores, exact.scores, rtol=1e-5, atol=0)
    assert got.info["ann_factory"] == "HNSW32_SQ8"


def test_sketched_recall_is_high_on_structured_rows(tmp_path):
    """D = 1024, Gaussian sketch to 256, Flat search, C = 1000 of 2000 rows per shard, queries of
    another low-rank model than the rows: recall@10 measured 0.93 (sketching raw rows against
    preconditioned queries, the first design: 0.69)."""
    index = tmp_path / "index"
    build_index(index, 4000, 4, 2)
    q = queries(24, 1024, seed=2)
    build_ann(index, factory="Flat", dim=256, mode="relatif", kind="gaussian")
    exact = topk(index, q, "relatif", 10)
    got = topk(index, q, "relatif", 10, ann=True, candidates=1000)
    assert got.info["ann_sketch_dim"] == 256
    assert recall(exact.train_ids, got.train_ids) >= RECALL_BOUND
    hits = got.train_ids == exact.train_ids  # every id found is scored exactly
    np.testing.assert_allclose(got.scores[hits], exact.scores[hits], rtol=1e-5)


RECALL_BOUND = 0.9


def test_pca_sketch_keeps_the_topk_with_few_candidates(tmp_path):
    """The PCA sketch (each shard's sample, d = 128 of D = 1024), queries of the rows' own model
    (as real queries are: gradients of the same model): recall@10 at C = 30 of 1000 rows per
    shard measured 1.0, the Gaussian sketch of d = 128 0.74."""
    index = tmp_path / "index"
    build_index(index, 2000, 4, 2)
    q = queries(16, 1024)
    exact = topk(index, q, "relatif", 10)
    build_ann(index, factory="Flat", mode="relatif", dim=128)
    got = topk(index, q, "relatif", 10, ann=True, candidates=30)
    assert got.info["ann_sketch_dim"] == 128
    pca = recall(exact.train_ids, got.train_ids)
    build_ann(index, factory="Flat", mode="relatif", kind="gaussian", dim=128)
    gaussian = recall(exact.train_ids, topk(index, q, "relatif", 10, ann=True, candidates=30).train_ids)
    assert pca >= 0.97 and gaussian < pca - 0.1, (pca, gaussian)


def test_stale_or_foreign_ann_files_are_refused_naming_the_field(tmp_path):
    index = tmp_path / "index"
    build_index(index, 300, 1, 2, storage="float32")
    q = queries(3, 256)
    with pytest.raises(IndexFormatError, match=r"rank-00000\.ann: no ANN index.*ann build"):
        topk(index, q, "relatif", 5, ann=True, candidates=5)
    build_ann(index, factory="Flat", mode="relatif")
    topk(index, q, "cosine", 5, ann=True, candidates=5)  # relatif files serve cosine
    with pytest.raises(IndexFormatError, match=r"rank-00000\.ann: .*damping is 1\.0, expected 0\.5"):
        topk(index, q, "relatif", 5, damping=0.5, ann=True, candidates=5)
    with pytest.raises(IndexFormatError, match=r"normalization is 'selfinf', expected 'none'"):
        topk(index, q, "dot", 5, ann=True, candidates=5)
    build_ann(index, factory="Flat", mode="dot")
    topk(index, q, "dot", 5, ann=True, candidates=5)
    with pytest.raises(IndexFormatError, match=r"rank-00000\.ann: .*damping is 1\.0, expected 0\.5"):
        topk(index, q, "dot", 5, damping=0.5, ann=True, candidates=5)  # whitened with the damping
    # the shards rebuilt in place (other rows, same ids): the ANN files left beside them are stale
    kept = {p.name: p.read_bytes() for p in (index / "shards").glob("*.ann")}
    shutil.rmtree(index)
    build_index(index, 300, 1, 2, storage="float32", seed=5)
    for name, data in kept.items():
        (index / "shards" / name).write_bytes(data)
    with pytest.raises(IndexFormatError, match=r"rank-00000\.ann: .*content_digest is"):
        topk(index, q, "dot", 5, ann=True, candidates=5)
    with h5py.File(index / "shards" / "rank-00001.ann", "a") as f:  # corrupted FAISS bytes
        f["faiss"][100] ^= 1
    build_ann(index, factory="Flat", mode="dot")  # rebuilt: accepted again
    topk(index, q, "dot", 5, ann=True, candidates=5)
    with pytest.raises(ValueError, match=r"FAISS factory 'NoSuchIndex' is not valid"):
        build_ann(index, factory="NoSuchIndex")
    with pytest.raises(ValueError, match=r"candidates \(3\) must be >= k \(5\)"):
        topk(index, q, "dot", 5, ann=True, candidates=3)


def test_cli_build_and_score_record_ann_and_candidates(tmp_path):
    from logra_dist.cli.main import main

    index, qidx, out = tmp_path / "index", tmp_path / "qidx", tmp_path / "out"
    build_index(index, 300, 1, 2)
    build_index(qidx, 4, 1, 1, seed=7)  # a query index with the same layout and config
    assert main(["ann", "build", str(index), "--factory", "Flat", "--mode", "dot"]) == 0
    args = ["score", "--index", str(index), "--query-index", str(qidx), "--mode", "dot", "--topk", "3"]
    with pytest.raises(SystemExit, match="--search-params tunes the ANN search"):
        main([*args, "--search-params", "nprobe=2", "--out", str(out), "--no-wandb"])
    assert main([*args, "--ann", "--candidates", "7", "--out", str(out), "--no-wandb"]) == 0
    with h5py.File(out / "topk.h5", "r") as f:
        assert bool(f.attrs["ann"]) and int(f.attrs["ann_candidates"]) == 7
        assert f.attrs["ann_factory"] == "Flat" and int(f.attrs["ann_sketch_dim"]) == 256  # default min(D, 256)
        ann_ids = f["train_ids"][()]
    assert (
        "ANN: 7 candidates per query and shard (Flat, sketch dim 256, search parameters none)"
        in (out / "topk.md").read_text()
    )
    assert ld.scoring.results.read_topk_h5(out / "topk.h5").info["ann_candidates"] == 7
    assert main([*args, "--out", str(tmp_path / "exact"), "--no-wandb"]) == 0
    with h5py.File(tmp_path / "exact" / "topk.h5", "r") as f:
        assert "ann" not in f.attrs
        np.testing.assert_array_equal(f["train_ids"][()], ann_ids)


# -- 2 and 3 scoring ranks equal 1 ------------------------------------------------------------------
def torchrun(n: int, phase: str, root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [str(REPO / "tests" / "ann_worker.py"), phase, str(root)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{phase} on {n} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.distributed
def test_ann_under_2_and_3_scoring_ranks_equals_1(tmp_path):
    import ann_worker as worker

    build_index(tmp_path / "index", 1000, 2, 4)  # D = 512 sketched to 128, approximate HNSW search
    torchrun(2, "build", tmp_path)  # each rank builds its 2 shards
    assert len(list((tmp_path / "index" / "shards").glob("*.ann"))) == 4
    torchrun(2, "score", tmp_path)
    torchrun(3, "score", tmp_path)
    worker.score(tmp_path)
    ref = dict(np.load(tmp_path / "results" / "W1.rank0.npz"))
    assert int(ref["candidates"]) == worker.CANDIDATES
    for world in (2, 3):
        for r in range(world):
            got = dict(np.load(tmp_path / "results" / f"W{world}.rank{r}.npz"))
            np.testing.assert_array_equal(got["train_ids"], ref["train_ids"], err_msg=f"W{world} rank {r}")
            np.testing.assert_array_equal(got["query_ids"], ref["query_ids"])
            np.testing.assert_allclose(got["scores"], ref["scores"], rtol=1e-6)
    exact = topk(tmp_path / "index", queries(worker.N_QUERIES, 512, seed=3), "relatif", worker.K)
    assert recall(exact.train_ids, ref["train_ids"]) >= 0.5  # approximate (measured 0.56; chance: 0.16)


@pytest.mark.parametrize("kind", ["raw", "kfac", "none"])
def test_whitened_rows_give_the_preconditioned_inner_product(kind):
    """whiten(q) . whiten(g) = q^T H^-1 g for every curvature kind (what the ANN sketch keeps)."""
    import torch

    from logra_dist.core.curvature import CURVATURES
    from logra_dist.core.projection import LayerSpec

    torch.manual_seed(0)
    specs = [LayerSpec("a", "linear", 5, 4, 3, 2), LayerSpec("b", "linear", 4, 6, 2, 4)]
    acc = CURVATURES.get(kind)(specs, torch.float64)
    rows = torch.randn(30, 14, dtype=torch.float64)
    acc.update_rows(rows)
    for s in specs:
        acc.observe(
            s.name, torch.randn(40, s.k_in, dtype=torch.float64), torch.randn(40, s.k_out, dtype=torch.float64), 40
        )
    pre = acc.preconditioner(0.3)
    q = torch.randn(5, 14, dtype=torch.float64)
    torch.testing.assert_close(pre.whiten(q) @ pre.whiten(rows).T, pre.apply(q) @ rows.T)
