"""GradientStore holds no table of every id: bounded memory, per-shard lookups, duplicate checks
in windows; each against brute force over the ids written."""

import json
import tracemalloc

import numpy as np
import pytest

import logra_dist as ld
from logra_dist.core.projection import LayerSpec
from logra_dist.index import ids as ids_mod
from logra_dist.index.format import IndexFormatError
from logra_dist.index.reader import index_problems
from logra_dist.index.writer import write_index

SPECS = [LayerSpec("l", "linear", 4, 4, 1, 2)]  # width 2: rows are cheap, ids dominate


def _index(path, shard_ids, storage="float16"):
    cfg = ld.LoGraConfig(k_in=1, k_out=2, storage_dtype=storage, flush_rows=1 << 15)
    gen = np.random.default_rng(0)

    def blocks(ids):
        for a in range(0, len(ids), 1 << 15):
            part = np.asarray(ids[a : a + (1 << 15)], np.int64)
            yield part, gen.standard_normal((len(part), 2)).astype(np.float32)

    write_index(path, SPECS, cfg.to_json(), [blocks(i) for i in shard_ids])
    return path


def _peaks(path, n):
    """(peak bytes while opening, while looking up 5 ids, the positions found) over `n` ids
    interleaved over 3 shards (a distributed sampler: overlapping id ranges)."""
    ids = np.arange(n, dtype=np.int64)
    _index(path, [ids[r::3] for r in range(3)])
    tracemalloc.start()
    store = ld.GradientStore(path)
    opened = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    want = np.array([5, n - 1, n // 2, 0, n // 3])
    pos = store.positions_of_ids(want)
    looked_up = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(store.ids_at(pos), want)
    offsets = np.cumsum([0] + [len(ids[r::3]) for r in range(3)])
    np.testing.assert_array_equal(pos, [offsets[i % 3] + i // 3 for i in want])  # id i: row i // 3 of shard i % 3
    return opened, looked_up


def test_open_and_lookup_memory_stays_flat_in_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(ids_mod, "ID_WINDOW", 1 << 16)  # the duplicate check's bound (4M ids by default)
    small, big = _peaks(tmp_path / "s", 200_000), _peaks(tmp_path / "b", 1_000_000)
    for what, a, b in zip(("open", "rows_for_ids"), small, big):
        # a table of all ids would hold 8 MB at 1M ids, 1.6 MB at 200k
        assert b < 1.25 * a + (256 << 10) and b < 1_000_000 * 8 / 2, f"{what}: {a} bytes at 200k ids, {b} at 1M"
    manifest = (tmp_path / "b" / "manifest.json").read_text()
    assert len(manifest) < 20_000 and "ids_digest" in manifest  # O(shards), not O(rows)


@pytest.mark.parametrize("layout", ["sorted", "shuffled"])
def test_lookups_and_ranges_equal_brute_force(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(ids_mod, "ID_CHUNK", 7)  # many chunks: the fence and chunk edges are exercised
    gen = np.random.default_rng(1)
    all_ids = gen.choice(10_000, 300, replace=False).astype(np.int64)
    all_ids = np.sort(all_ids) if layout == "sorted" else all_ids
    shards = [all_ids[:120], all_ids[120:121], all_ids[121:]]
    store = ld.GradientStore(_index(tmp_path / "i", shards))
    np.testing.assert_array_equal(store.ids, all_ids)
    assert [f.increasing for f in store.id_facts] == [layout == "sorted", True, layout == "sorted"]  # 1 id: sorted
    for lo, hi in [(0, 300), (115, 126), (120, 121), (299, 300), (5, 5)]:
        np.testing.assert_array_equal(store.ids_range(lo, hi), all_ids[lo:hi])
    pos = gen.permutation(300)[:50]
    np.testing.assert_array_equal(store.ids_at(pos), all_ids[pos])
    want = all_ids[gen.permutation(300)[:40]]
    row_of = {int(i): r for r, i in enumerate(all_ids)}  # the reference: a dict of every id
    np.testing.assert_array_equal(store.positions_of_ids(want), [row_of[int(i)] for i in want])
    np.testing.assert_array_equal(store.rows_for_ids(want), store[:][[row_of[int(i)] for i in want]])
    missing = int(np.setdiff1d(np.arange(10_001), all_ids)[3])
    with pytest.raises(KeyError, match=f"sample id {missing} "):
        store.rows_for_ids([int(all_ids[0]), missing])


@pytest.mark.parametrize(
    "case",
    ["across-interleaved", "across-unsorted", "within-shard", "clean-interleaved", "clean-disjoint"],
)
def test_duplicate_ids_found_window_by_window(tmp_path, monkeypatch, case):
    monkeypatch.setattr(ids_mod, "ID_WINDOW", 64)  # ~30 windows over 2000 ids
    monkeypatch.setattr(ids_mod, "ID_CHUNK", 50)
    ids = np.arange(2000, dtype=np.int64)
    shards = {
        "across-interleaved": [ids[0::2], np.sort(np.r_[ids[1::2], 1500])],
        "across-unsorted": [np.random.default_rng(2).permutation(ids[:1000]), np.r_[ids[1000:], 777]],
        "within-shard": [ids[:1000], np.r_[ids[1000:1500], 1234, ids[1500:]]],
        "clean-interleaved": [ids[0::2], ids[1::2]],
        "clean-disjoint": [ids[:1000], ids[1000:]],
    }[case]
    _index(tmp_path / "i", shards)
    if case.startswith("clean"):
        assert len(ld.GradientStore(tmp_path / "i")) == 2000
        return
    dup = {"across-interleaved": 1500, "across-unsorted": 777, "within-shard": 1234}[case]
    with pytest.raises(IndexFormatError, match=rf"ids logged more than once across shards, e\.g\. \[{dup}\]"):
        ld.GradientStore(tmp_path / "i")
    assert any("more than once" in p for p in index_problems(tmp_path / "i"))


def test_window_edges_follow_the_ids_not_their_span(tmp_path, monkeypatch):
    """One huge id must not put every other id into one window (memory bound by ID_WINDOW)."""
    monkeypatch.setattr(ids_mod, "ID_WINDOW", 100)
    ids = np.r_[np.arange(999), 10**15].astype(np.int64)
    store = ld.GradientStore(_index(tmp_path / "i", [ids[0::2], ids[1::2]]))
    edges = ids_mod._windows([(s.path, f) for s, f in zip(store.shards, store.id_facts)])
    counts = np.diff(np.searchsorted(ids, np.r_[ids.min(), edges]))
    assert len(edges) >= 8 and counts.max() <= 2 * 100, counts
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["total_rows"] == 1000
