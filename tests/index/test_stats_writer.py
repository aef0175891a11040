"""The streamed stats.h5 (index/stats_writer.py) is the file `format.write_stats` writes from the
same fields: datasets, their checksums, every attribute and the digest; its errors and abort leave
nothing in place."""

from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest

from logra_dist.index import stats_writer
from logra_dist.index.format import STATS_ATTRS, IndexFormatError, read_stats, write_stats
from logra_dist.index.stats_writer import StatsWriter

ATTRS = {"samples": 12.0, "layout": "[]", "config": "{}", "job_key": "job", "shards_digest": "shards"}


def _layers() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {"a/evals": rng.random(5).astype(np.float32), "a/evecs": rng.random((5, 5)).astype(np.float32)},
        {"b/evals": rng.random(3), "b/evecs": rng.random((3, 3)).T},  # float64, not C-contiguous
        {"b/p_in": rng.random((2, 7)).astype(np.float32), "c/count": np.array(4.0)},
    ]


def _read(path) -> tuple[dict, dict]:
    sums = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            sums[name] = obj.attrs["sha256"]

    with h5py.File(path) as f:
        f.visititems(visit)
        return dict(f.attrs), sums


def test_streamed_file_equals_write_stats(tmp_path):
    state = {k: v for layer in _layers() for k, v in layer.items()}
    write_stats(tmp_path / "want.h5", "raw", 0.5, state, ATTRS)
    writer = StatsWriter(tmp_path / "got.h5", "raw", 0.5, ATTRS)
    first, *rest = _layers()
    writer.add(first)
    for layer in rest:  # as a layer still in transfer: called in the writer thread
        writer.add(lambda layer=layer: layer)
    writer.close()
    assert not (tmp_path / "got.h5.tmp").exists()
    want_attrs, want_sums = _read(tmp_path / "want.h5")
    got_attrs, got_sums = _read(tmp_path / "got.h5")
    assert sorted(got_attrs) == sorted([*STATS_ATTRS, "digest"])
    assert {k: str(v) for k, v in got_attrs.items()} == {k: str(v) for k, v in want_attrs.items()}
    assert got_sums == want_sums
    got, want = read_stats(tmp_path / "got.h5")[1], read_stats(tmp_path / "want.h5")[1]
    assert sorted(got) == sorted(state)
    for key, arr in state.items():
        assert got[key].dtype == want[key].dtype == arr.dtype, key
        np.testing.assert_array_equal(got[key], arr)


def test_abort_leaves_nothing(tmp_path):
    writer = StatsWriter(tmp_path / "stats.h5", "raw", 1.0, ATTRS)
    writer.add(_layers()[0])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_in_the_writer_thread_is_raised_by_close(tmp_path, monkeypatch):
    def full(*args):  # the writer thread's dataset write
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    monkeypatch.setattr(stats_writer, "write_stats_dataset", full)
    writer = StatsWriter(tmp_path / "stats.h5", "raw", 1.0, ATTRS)
    writer.add(_layers()[0])
    writer.add(_layers()[1])  # after the thread failed: dropped, no hang
    with pytest.raises(IndexFormatError, match=r"stats\.h5: disk full while writing the statistics"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_attributes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        StatsWriter(tmp_path / "stats.h5", "raw", 1.0, {"samples": 1.0})
    assert list(tmp_path.iterdir()) == []
