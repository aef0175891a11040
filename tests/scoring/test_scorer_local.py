"""Single-process checks of the scorer's parts: top-k merging, row assignment, self-influence,
layer groups, query validation, KFAC and no-Hessian scoring against numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scorer_helpers import (
    GROUPS,
    MODES,
    TinyNet,
    capture_batches,
    config,
    group_mask,
    inverse_hessian,
    log_index,
    raw_rows,
    reference_scores,
    reference_topk,
    skipped_rows,
)

import logra_dist as ld
from logra_dist.core.curvature import CURVATURES
from logra_dist.index.partition import SHARD_SPLIT_SLACK, assign_rows
from logra_dist.scoring.kernels import (
    ID_PAD,
    GroupPlan,
    RunningTopK,
    layer_self_influence,
    select_topk,
    self_influence,
)


# -- top-k --------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 40, 70])
def test_running_topk_equals_sort_with_ties_any_chunking(k):
    gen = torch.Generator().manual_seed(k)
    n_q, n = 6, 57
    scores = torch.randint(0, 6, (n_q, n), generator=gen).float()  # many exact ties
    ids = torch.randperm(n, generator=gen) * 3
    ref_s, ref_i = reference_topk(scores.numpy(), ids.numpy(), k)
    for chunk, q_chunk in [(57, 6), (1, 1), (4, 5), (10, 2)]:
        top = RunningTopK(n_q, k)
        for s in range(0, n, chunk):
            for a in range(0, n_q, q_chunk):
                top.update(scores[a : a + q_chunk, s : s + chunk], ids[s : s + chunk], slice(a, a + q_chunk))
        kk = min(k, n)
        np.testing.assert_array_equal(top.ids[:, :kk].numpy(), ref_i)
        np.testing.assert_array_equal(top.scores[:, :kk].numpy(), ref_s)
        assert (top.ids[:, kk:] == ID_PAD).all()


def test_select_topk_merges_per_rank_lists_like_one_list():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 30), generator=gen).float()
    ids = torch.arange(30)[None].expand(3, -1)
    parts = [select_topk(scores[:, s : s + 10], ids[:, s : s + 10], 7) for s in (20, 0, 10)]  # any rank order
    merged = select_topk(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), 7)
    _ref_s, ref_i = reference_topk(scores.numpy(), np.arange(30), 7)
    np.testing.assert_array_equal(merged[1].numpy(), ref_i)


# -- row assignment -----------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [[20, 10, 14, 4], [23, 14], [0, 5, 0, 7], [100, 1, 1, 1], [3], [0, 0], [1, 1]])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_assign_rows_covers_every_row_once_and_balances(shards, world):
    plan = assign_rows(shards, world)
    total = sum(shards)
    assert len(plan) == world
    covered = [r for ranges in plan for lo, hi in ranges for r in range(lo, hi)]
    assert sorted(covered) == list(range(total))
    for ranges in plan:
        assert all(lo < hi for lo, hi in ranges) and ranges == sorted(ranges)
    loads = [sum(hi - lo for lo, hi in ranges) for ranges in plan]
    assert max(loads) <= max(SHARD_SPLIT_SLACK * total / world, -(-total // world))
    offsets = set(itertools.accumulate([0] + shards))
    whole_shards = all(lo in offsets and hi in offsets for ranges in plan for lo, hi in ranges)
    if len(shards) < world:
        assert max(loads) - min(loads) <= 1  # row ranges, balanced to one row
    if shards == [20, 10, 14, 4] and world in (2, 3):
        assert whole_shards  # balanced enough: each file read by one rank


def test_assign_rows_falls_back_to_ranges_when_shards_are_unbalanced():
    plan = assign_rows([100, 1, 1, 1], 2)
    assert [sum(hi - lo for lo, hi in r) for r in plan] == [52, 51]


# -- self-influence and preconditioners ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["raw", "kfac", "none"])
def test_layer_self_influence_equals_applied_preconditioner(kind):
    """Per layer and in total; layers b, c share a width (batched into one bmm for raw)."""
    torch.manual_seed(0)
    LayerSpec = ld.core.projection.LayerSpec
    specs = [
        LayerSpec("a", "linear", 5, 4, 3, 2),
        LayerSpec("b", "linear", 4, 6, 2, 4),
        LayerSpec("c", "linear", 6, 4, 4, 2),
        LayerSpec("d", "linear", 4, 6, 2, 3),
    ]
    acc = CURVATURES.get(kind)(specs, torch.float64)
    rows = torch.randn(40, 28, dtype=torch.float64)
    acc.update_rows(rows)
    for s in specs:
        acc.observe(
            s.name, torch.randn(50, s.k_in, dtype=torch.float64), torch.randn(50, s.k_out, dtype=torch.float64), 50
        )
    pre = None if kind == "none" else acc.preconditioner(0.7)
    per_layer = layer_self_influence(pre, specs, rows)
    if kind == "raw":
        assert [r[:2] for r in pre.layer_self_influence().runs] == [(0, 1), (1, 2), (3, 1)]
    torch.testing.assert_close(per_layer.sum(1), self_influence(pre, rows))
    col = 0
    for i, s in enumerate(specs):
        block = rows[:, col : col + s.width]
        torch.testing.assert_close(per_layer[:, i], self_influence(None if pre is None else _only(pre, i), block))
        col += s.width


def _only(pre, i):
    spec = pre.specs[i]
    return type(pre).from_factors([spec], pre.damping, {spec.name: pre.layers[spec.name]})


def test_group_plan_overlapping_groups():
    specs = [
        ld.core.projection.LayerSpec(n, "linear", 4, 4, 2, 2) for n in ("self_attn.q", "mlp.fc1", "mlp.fc2", "head")
    ]
    plan = GroupPlan(specs, {"mlp": "mlp", "fc1q": r"fc1|\.q$"})
    assert plan.names == ["total", "mlp", "fc1q"]
    x = torch.arange(16.0)[None]
    atoms = plan.split(x)
    assert sorted(int(v) for a in atoms for v in a.reshape(-1)) == list(range(16))
    dots = plan.output_dots([a.sum(1, keepdim=True) for a in atoms], "relatif")
    assert [float(d) for d in dots] == [120.0, float(sum(range(4, 12))), float(sum(range(0, 8)))]
    with pytest.raises(ValueError, match="matches no logged layer"):
        GroupPlan(specs, {"x": "nothing"})
    with pytest.raises(ValueError, match="reserved"):
        GroupPlan(specs, {"total": "mlp"})


# -- end to end in one process ------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-scorer")
    train, queries = np.random.default_rng(1).permutation(30), np.arange(1000, 1009)
    for hessian in ("kfac", "none"):
        log_index(root / hessian, train, config(hessian=hessian))
    log_index(root / "q", queries)
    log_index(root / "q-seed", queries, config(seed=8))
    log_index(root / "q-layers", queries, config(include=["mlp"]))
    return root


@pytest.mark.parametrize("prefilter", ["0", "1"])
@pytest.mark.parametrize("reduce_every", [None, 2, 1])
@pytest.mark.parametrize("hessian", ["kfac", "none"])
def test_kfac_and_plain_gradients_match_numpy(indexes, hessian, reduce_every, prefilter, monkeypatch):
    """reduce_every: the top-k lists updated once at the end (default size), or every 2 chunks /
    every chunk of 4 rows (scan.REDUCE_ELEMENTS shrunk): the same lists, top and bottom.
    prefilter "1": the bfloat16 bounds run on every chunk, thresholds refreshed every chunk (at
    this size every row is in some query's lists; test_prefilter.py has the skipping)."""
    ids, g, layout = raw_rows(indexes / hessian)
    qids, q, _ = raw_rows(indexes / "q")
    hinv = inverse_hessian(indexes / hessian, layout)
    if reduce_every is not None:
        monkeypatch.setattr(ld.scoring.scan, "REDUCE_ELEMENTS", reduce_every * 4 * len(qids))
    monkeypatch.setenv(ld.scoring.prefilter.ENV, prefilter)
    monkeypatch.setattr(ld.scoring.scan, "REFRESH_ROWS", 4)
    kept = skipped_rows(monkeypatch)
    for mode in MODES:
        sc = ld.Scorer(TinyNet(), indexes / hessian, mode=mode, chunk_rows=4)
        capture_batches(sc, qids[::-1], batch=4)
        res = sc.topk(7, groups=GROUPS, bottomk=5)
        for name, r in [("total", res), *res.groups.items()]:
            ref = reference_scores(q, g, hinv, mode, group_mask(layout, None if name == "total" else GROUPS[name]))
            ref = ref[np.argsort(qids)]
            ref_s, ref_i = reference_topk(ref, ids, 7)
            np.testing.assert_array_equal(r.train_ids, ref_i, err_msg=f"{hessian} {mode} {name}")
            np.testing.assert_allclose(r.scores, ref_s, rtol=1e-4, atol=1e-6)
            low_s, low_i = reference_topk(-ref, ids, 5)
            np.testing.assert_array_equal(r.bottom.train_ids, low_i, err_msg=f"bottom {hessian} {mode} {name}")
            np.testing.assert_allclose(r.bottom.scores, -low_s, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(sc.scores(), ref_full(q, g, hinv, mode, layout, qids), rtol=1e-4, atol=1e-6)
        sc.close()
    assert (len(kept) > 0) == (prefilter == "1"), kept  # the filter ran on the chunks


def ref_full(q, g, hinv, mode, layout, qids):
    return reference_scores(q, g, hinv, mode, group_mask(layout, None))[np.argsort(qids)]


def test_precomputed_array_queries_and_padding_ids(indexes):
    qids, q, _ = raw_rows(indexes / "q")
    sc = ld.Scorer(None, indexes / "none", mode="dot")
    sc.add_query_gradients(q[:5], qids[:5])
    sc.add_query_gradients(q[5:], np.where(np.arange(len(q) - 5) == 1, -1, qids[5:]))  # one padding row
    res = sc.topk(3)
    assert len(res.query_ids) == len(qids) - 1 and qids[6] not in res.query_ids
    with pytest.raises(ValueError, match="non-finite query gradients for query ids \\[77\\]"):
        sc.add_query_gradients(np.full((1, q.shape[1]), np.nan), [77])
    with pytest.raises(ValueError, match=r"must be \(n, 27\)"):
        sc.add_query_gradients(q[:, :5], qids)
    sc.add_query_gradients(q[:1], qids[:1])
    with pytest.raises(ValueError, match="query ids must be unique"):
        sc.topk(3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sc.topk(0)
    sc.close()


def test_query_index_must_match_training_index(indexes):
    sc = ld.Scorer(None, indexes / "none")
    with pytest.raises(ld.IndexFormatError, match=r"configs differ in \{'seed': \(8, 7\)\}"):
        sc.add_query_gradients(indexes / "q-seed")
    with pytest.raises(ld.IndexFormatError, match="layer layouts differ"):
        sc.add_query_gradients(indexes / "q-layers")
    with pytest.raises(RuntimeError, match="no queries on any rank"):
        sc.topk(2)
    sc.close()


def test_model_layers_must_match_index(indexes):
    class Other(TinyNet):
        def __init__(self):
            super().__init__()
            self.mlp.fc2 = torch.nn.Linear(10, 5)

    with pytest.raises(ld.IndexFormatError, match="do not match the index layout"):
        ld.Scorer(Other(), indexes / "none")


# -- streaming ----------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"])
def test_chunk_stream_equals_store_reads_across_shard_boundaries(tmp_path, storage):
    from scorer_helpers import write_synthetic_index

    from logra_dist.index.stream import ChunkStream

    given = write_synthetic_index(tmp_path, [5, 0, 9, 4], storage)
    store = ld.GradientStore(tmp_path)
    tol = {"float16": 1e-3, "bfloat16": 1e-2, "float32": 0}[storage]
    np.testing.assert_allclose(store.read(0, len(store)), given, rtol=tol, atol=tol)
    for ranges, chunk in [([(0, 18)], 4), ([(2, 12)], 3), ([(0, 3), (6, 14), (17, 18)], 5), ([], 4)]:
        seen = []
        for start, ids, rows, side in ChunkStream(store, ranges, chunk, side=lambda a, b: (a, b)):
            assert side == (start, start + len(ids))
            assert rows.dtype == torch.float32 and len(rows) == len(ids) <= chunk
            np.testing.assert_array_equal(rows.numpy(), store.read(start, start + len(ids)))
            np.testing.assert_array_equal(ids, store.ids[start : start + len(ids)])
            seen += list(range(start, start + len(ids)))
        assert seen == [r for lo, hi in ranges for r in range(lo, hi)]


def test_chunk_stream_stops_cleanly_when_abandoned(tmp_path):
    import threading

    from scorer_helpers import write_synthetic_index

    from logra_dist.index.stream import ChunkStream

    write_synthetic_index(tmp_path, [40], "float16")
    store = ld.GradientStore(tmp_path)
    for start, _, _, _ in ChunkStream(store, [(0, 40)], 2):
        if start >= 4:
            break
    assert not [t for t in threading.enumerate() if t.name == "logra-score-stream"]


def test_self_influence_part_writer_batches_and_merges(tmp_path, monkeypatch):
    from scorer_helpers import write_synthetic_index

    from logra_dist.scoring.selfinf import PartWriter, SelfInfluenceCache

    write_synthetic_index(tmp_path, [6, 5], "float32")
    cache = SelfInfluenceCache(tmp_path, "raw", 1.0, 11, ld.GradientStore(tmp_path).manifest["layout"])
    monkeypatch.setattr(PartWriter, "flush_rows", 3)
    values = np.arange(22, dtype=np.float32).reshape(11, 2)
    assignment = [[(0, 2), (8, 11)], [], [(2, 8)]]
    for rank, ranges in enumerate(assignment):
        w = cache.part_writer(7, rank)
        for lo, hi in ranges:
            for s in range(lo, hi, 2):
                w.append(values[s : min(hi, s + 2)])
        w.close()
    assert not cache.available()
    cache.merge(7, assignment)
    assert cache.available()
    np.testing.assert_array_equal(cache.read(0, 11), values)
    cache.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "selfinf.h5", "shards"]
