"""Distributed scoring with real processes (torchrun + gloo), checked against numpy brute force.

Three launches share one folder: indexes logged on 4 ranks, then on 2 ranks (which then score),
then scoring on 3 ranks; world size 1 runs in this process. Every scoring world size scores
indexes logged on 2 and 4 ranks, so 4->1, 4->2, 4->3, 2->1, 2->2, 2->3 are all covered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scorer_worker as worker
from scorer_helpers import (
    GROUPS,
    MODES,
    group_mask,
    int_samples,
    inverse_hessian,
    raw_rows,
    reference_scores,
    reference_topk,
)

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parents[2]
WORLDS = (1, 2, 3)


def torchrun(n: int, phase: str, root: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        str(REPO / "tests" / "scorer_worker.py"),
        phase,
        str(root),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{phase} on {n} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist-scorer")
    torchrun(4, "log4", root)
    torchrun(2, "log2", root)
    torchrun(3, "score", root)
    worker.score_phase(root)  # world size 1, no process group
    return root


def load(root: Path, world: int, case: str) -> dict[str, np.ndarray]:
    """Rank 0's result, after checking that every rank returned exactly the same arrays."""
    files = [root / "results" / f"W{world}" / f"{case}.rank{r}.npz" for r in range(world)]
    arrays = [dict(np.load(f)) for f in files]
    for r, other in enumerate(arrays[1:], 1):
        assert other.keys() == arrays[0].keys()
        for key in arrays[0]:
            assert np.array_equal(arrays[0][key], other[key]), f"{case}: rank {r} differs from rank 0 in {key}"
    return arrays[0]


def check_topk(got_scores, got_ids, ref: np.ndarray, train_ids: np.ndarray, k: int, what: str) -> None:
    ref_s, ref_i = reference_topk(ref, train_ids, k)
    assert got_ids.shape == ref_i.shape == (ref.shape[0], min(k, ref.shape[1])), what
    # the data must separate the top-k from the rest, or exact id equality would be luck
    if ref.shape[1] > k:
        kth, nxt = ref_s[:, -1], -np.sort(-ref, axis=1)[:, k]
        assert np.all(kth - nxt > 1e-5 * np.abs(ref).max()), f"{what}: near-tie at the k-th place in test data"
    np.testing.assert_array_equal(got_ids, ref_i, err_msg=what)
    np.testing.assert_allclose(got_scores, ref_s, rtol=2e-4, atol=2e-5 * np.abs(ref_s).max(), err_msg=what)


@pytest.fixture(scope="module")
def queries(root):
    qids, q, _ = raw_rows(root / "qidx")
    order = np.argsort(qids)
    return qids[order], q[order]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("index", ["idx2", "idx4"])
def test_topk_equals_brute_force_every_mode_and_group(root, queries, index, world):
    qids, q = queries
    ids, g, layout = raw_rows(root / index)
    hinv = inverse_hessian(root / index, layout)
    for mode in MODES:
        got = load(root, world, f"{index}-{mode}")
        np.testing.assert_array_equal(got["query_ids"], qids)
        for name in ["total", *GROUPS]:
            ref = reference_scores(q, g, hinv, mode, group_mask(layout, None if name == "total" else GROUPS[name]))
            prefix = "" if name == "total" else f"{name}."
            check_topk(
                got[f"{prefix}scores"],
                got[f"{prefix}train_ids"],
                ref,
                ids,
                worker.K,
                f"{index} scored on {world} ranks, {mode}, {name}",
            )


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("index", ["idx2", "idx4"])
def test_bottomk_equals_brute_force_every_mode_and_group(root, queries, index, world):
    """The lowest scores (most opposing examples), lowest first, ties to the smaller id: numpy's
    argsort of the explicit score matrix, on 1, 2 and 3 scoring ranks."""
    _, q = queries
    ids, g, layout = raw_rows(root / index)
    hinv = inverse_hessian(root / index, layout)
    for mode in MODES:
        got = load(root, world, f"{index}-{mode}")
        for name in ["total", *GROUPS]:
            ref = reference_scores(q, g, hinv, mode, group_mask(layout, None if name == "total" else GROUPS[name]))
            prefix = "" if name == "total" else f"{name}."
            what = f"bottom-k of {index} scored on {world} ranks, {mode}, {name}"
            order = np.lexsort((np.broadcast_to(ids, ref.shape), ref), axis=1)[:, : worker.BOTTOM_K]
            np.testing.assert_array_equal(got[f"{prefix}bottom_train_ids"], ids[order], err_msg=what)
            check_topk(
                -got[f"{prefix}bottom_scores"], got[f"{prefix}bottom_train_ids"], -ref, ids, worker.BOTTOM_K, what
            )


@pytest.mark.parametrize("world", WORLDS)
def test_query_index_and_other_damping(root, queries, world):
    """Queries from a query index (no model), damping != the index's, cache written by this world."""
    _qids, q = queries
    ids, g, layout = raw_rows(root / "idx2")
    got = load(root, world, "idx2-relatif-qindex")
    ref = reference_scores(
        q, g, inverse_hessian(root / "idx2", layout, float(got["damping"])), "relatif", group_mask(layout, None)
    )
    check_topk(got["scores"], got["train_ids"], ref, ids, worker.K, f"query index, world {world}")
    got = load(root, world, "idx4-cosine-nocache")
    ids, g, layout = raw_rows(root / "idx4")
    ref = reference_scores(q, g, inverse_hessian(root / "idx4", layout), "cosine", group_mask(layout, None))
    check_topk(got["scores"], got["train_ids"], ref, ids, worker.K, f"no cache, world {world}")


@pytest.mark.parametrize("mode", MODES)
def test_exact_ties_broken_by_id_whatever_the_world_size(root, mode):
    """Duplicated integer rows (exact arithmetic): equal scores, smaller id first, same on 1/2/3 ranks."""
    ids, g, layout = raw_rows(root / "dup4")
    got = [load(root, w, f"dup4-{mode}") for w in WORLDS]
    for w, other in zip(WORLDS[1:], got[1:]):
        for key in ("scores", "train_ids", "query_ids"):
            assert np.array_equal(got[0][key], other[key]), f"{mode}: {key} on {w} ranks differs from 1 rank"
    x, t = int_samples(got[0]["query_ids"])
    q = np.einsum("bo,bi->boi", t[:, 0].numpy(), x[:, 0].numpy()).reshape(len(x), -1).astype(np.float64)
    ref = reference_scores(q, g, inverse_hessian(root / "dup4", layout), mode, group_mask(layout, None))
    ref_s, ref_i = reference_topk(ref, ids, 9)
    ties = sum(len(row) - len(np.unique(row)) for row in ref_s)
    assert ties > 0, "the test data must contain exact ties inside the top-k"
    np.testing.assert_array_equal(got[0]["train_ids"], ref_i)
    np.testing.assert_allclose(got[0]["scores"], ref_s, rtol=1e-6)


@pytest.mark.parametrize("world", WORLDS)
def test_self_influence_is_diagonal_of_pairwise_scores(root, world):
    got = load(root, world, "selfinf")
    ids, g, layout = raw_rows(root / "idx2")
    hinv = inverse_hessian(root / "idx2", layout)
    np.testing.assert_array_equal(got["store_ids"], ids)
    pairwise = got["pairwise"]  # rows: queries sorted by id; columns: store order
    assert pairwise.shape == (len(ids), len(ids))
    diag = pairwise[np.searchsorted(got["query_ids"], ids), np.arange(len(ids))]
    np.testing.assert_allclose(got["selfinf"], diag, rtol=1e-5)
    np.testing.assert_allclose(got["selfinf"], np.einsum("nd,de,ne->n", g, hinv, g), rtol=1e-5)
    np.testing.assert_allclose(got["selfinf_layers"].sum(1), got["selfinf"], rtol=1e-5)


def test_self_influence_cache_per_damping_per_layer(root):
    _ids, g, layout = raw_rows(root / "idx2")
    with h5py.File(root / "idx2" / "selfinf.h5", "r") as f:
        assert sorted(f) == [f"raw_damping_{d!r}" for d in (0.25, 0.5, 0.75, 1.0)]
        for d in (0.25, 0.5, 0.75, 1.0):
            hinv = inverse_hessian(root / "idx2", layout, d)
            for j, layer in enumerate(layout):
                m = group_mask(layout, "^" + layer["name"].replace(".", r"\.") + "$")
                ref = np.einsum("nd,de,ne->n", g[:, m], hinv[np.ix_(m, m)], g[:, m])
                np.testing.assert_allclose(f[f"raw_damping_{d!r}"][:, j], ref, rtol=1e-5)
    assert not [p.name for p in (root / "idx2").iterdir() if ".part-" in p.name or ".tmp" in p.name]
    with h5py.File(root / "idx4" / "selfinf.h5", "r") as f:  # the no-cache run added nothing
        assert sorted(f) == ["raw_damping_1.0"]


@pytest.mark.parametrize("world", WORLDS)
def test_fewer_rows_than_ranks(root, queries, world):
    qids, q = queries
    ids, g, layout = raw_rows(root / "tiny")
    got = load(root, world, "tiny")
    assert got["train_ids"].shape == (len(qids), 2)
    ref = reference_scores(q, g, inverse_hessian(root / "tiny", layout), "relatif", group_mask(layout, None))
    check_topk(got["scores"], got["train_ids"], ref, ids, 5, f"tiny on {world} ranks")


@pytest.mark.parametrize("world", WORLDS)
def test_failure_on_one_rank_reaches_every_rank(root, world):
    for r in range(world):
        out = dict(np.load(root / "results" / f"W{world}" / f"failure.rank{r}.npz"))
        bad, outcome = int(out["bad"]), str(out["outcome"])
        if r == bad:
            assert outcome.startswith("OSError: injected read failure"), outcome
        else:
            assert outcome == f"RuntimeError: scoring failed on rank(s) [{bad}]; see the error reported there"


def test_result_files(root, queries):
    qids, _ = queries
    _ids, _g, _layout = raw_rows(root / "idx4")
    per_world = {}
    for w in WORLDS:
        with h5py.File(root / "out" / f"W{w}" / "topk.h5", "r") as f:
            assert f["scores"].dtype == np.float32 and f["train_ids"].dtype == np.int64
            assert f["scores"].shape == f["train_ids"].shape == (len(qids), 3)
            np.testing.assert_array_equal(f["query_ids"][()], qids)
            assert f.attrs["mode"] == "relatif" and float(f.attrs["damping"]) == 1.0
            assert f.attrs["index"] == str((root / "idx4").resolve())
            assert json.loads(f.attrs["config"])["k_in"] == 3 and int(f.attrs["world_size"]) == w
            per_world[w] = {k: f[k][()] for k in ("scores", "train_ids", "groups/attn/train_ids", "groups/mlp/scores")}
        assert not list((root / "out" / f"W{w}").glob("*.tmp"))
    for w in WORLDS[1:]:
        for key in per_world[1]:
            np.testing.assert_array_equal(per_world[w][key], per_world[1][key], err_msg=key)
    lines = (root / "out" / "W3" / "topk.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == len(qids) and first["query_id"] == qids[0]
    assert first["query_text"] == f"query {qids[0]} | text"
    assert [r["train_id"] for r in first["results"]] == per_world[1]["train_ids"][0].tolist()
    assert first["results"][0]["text"] == f"train {first['results'][0]['train_id']}"
    assert set(first["groups"]) == {"attn", "mlp"}
    md = (root / "out" / "W3" / "topk.md").read_text()
    assert f"## Query {qids[0]}" in md and "query 1000 \\| text" in md and "### mlp" in md


def test_many_queries_use_several_query_chunks(root):
    """The cases above stream 21 queries in blocks of a few: check the configuration does that."""
    import logra_dist as ld
    from logra_dist.scoring.kernels import GroupPlan

    sc = ld.Scorer(None, root / "idx2", chunk_rows=5, block_bytes=worker.SMALL_BLOCK)
    plan = GroupPlan(sc.store.layout, GROUPS)
    assert 1 <= sc._query_chunk(len(worker.QUERY_IDS), len(plan.atom_layers)) < len(worker.QUERY_IDS) / 2
    sc.close()
