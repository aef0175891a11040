"""Samples with a non-finite gradient: the manifest counts them per shard (O(shards)), the ids stay
in each shard's `nonfinite_ids` dataset and are read on demand; real 2-rank gloo jobs (torchrun),
and an index written by the previous format version (3, which listed every id in the manifest).

tests/index/data/v3-index was written by format version 3 (commit 599e2c8) with
`torchrun --nproc_per_node 2 tests/faults/mlp_worker.py --out DIR --nan-id 7 --samples 12`:
rank 0 logged 0, 2, ..., 10; rank 1 logged 1, 3, ..., 11 but 7, whose loss was NaN.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from reliability_helpers import MLP_WORKER, assert_same_index, mlp_args, mlp_worker, torchrun

import logra_dist as ld
from logra_dist.index.format import FORMAT_VERSION
from logra_dist.index.inspect import inspect_index, render

N = 40
NAN = [4, 6, 13, 27]  # rank 0 owns the even ids, rank 1 the odd ones (rank striding)
V3 = Path(__file__).parent / "data" / "v3-index"


def _manifest(index: Path) -> dict:
    return json.loads((index / "manifest.json").read_text())


def _shard_ids(index: Path, rank: int) -> list[int]:
    with h5py.File(index / "shards" / f"rank-{rank:05d}.h5") as f:
        return f["nonfinite_ids"][:].tolist()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, Path, str]:
    """(2-rank index, the same samples logged by one process, rank 0's stderr and stdout)."""
    root = tmp_path_factory.mktemp("nonfinite")
    nan = ["--nan-id", *map(str, NAN)]
    proc = torchrun(MLP_WORKER, "--out", str(root / "two"), *nan)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.warns(RuntimeWarning, match=r"4 sample\(s\) had non-finite gradients"):
        mlp_worker.run(mlp_args(root / "one", *nan))
    return root / "two", root / "one", proc.stderr + proc.stdout


def test_manifest_counts_per_shard_and_the_ids_stay_in_the_shards(two_ranks):
    two, one, output = two_ranks
    m = _manifest(two)
    assert "nonfinite_ids" not in m and m["format_version"] == FORMAT_VERSION
    assert [s["nonfinite_count"] for s in m["shards"]] == [2, 2] and m["nonfinite_total"] == 4
    assert m["total_rows"] == N - 4 and m["samples_in_statistics"] == N - 4
    assert _shard_ids(two, 0) == [4, 6] and _shard_ids(two, 1) == [13, 27]
    with ld.GradientStore(two) as store:
        assert store.nonfinite_counts == [2, 2] and store.nonfinite_total == 4
        assert store.nonfinite_ids().tolist() == NAN
        assert store.nonfinite_ids(limit=3).tolist() == [4, 6, 13]
        assert store.nonfinite_ids(limit=0).tolist() == []
        assert not set(NAN) & set(store.ids.tolist())
    # rank 0 warns with the total and its own ids only (nothing gathered): 13 and 27 are rank 1's
    warning = re.search(r"RuntimeWarning: (.*)", output).group(1)
    assert warning.startswith("4 sample(s) had non-finite gradients") and "rank 0's shard holds ids [4, 6]." in warning
    assert "'nonfinite_ids'" in warning and "13" not in warning
    assert output.count("had non-finite gradients") == 1  # rank 1 does not warn
    assert 'MANIFEST {"total_rows": 36, "nonfinite_total": 4}' in output
    # rows and statistics are a single process's on the same samples; the ids are the same ones
    assert_same_index(two, one, shards=False)
    with ld.GradientStore(one) as store:
        assert store.nonfinite_counts == [4] and store.nonfinite_ids().tolist() == NAN


def test_inspect_shows_the_count_and_the_first_ids(two_ranks):
    facts = inspect_index(two_ranks[0])
    assert facts["status"] == "usable", facts["problems"]
    assert facts["nonfinite_samples"] == facts["nonfinite_in_manifest"] == 4
    assert facts["nonfinite_first"] == NAN
    assert [(s["nonfinite_samples"], s["nonfinite_first"]) for s in facts["shards"]] == [(2, [4, 6]), (2, [13, 27])]
    page = render(facts)
    assert "non-finite samples left out: 4, ids [4, 6, 13, 27] (all of them in each shard's dataset" in page
    assert re.search(r"rank +1 +18 rows .*, 2 non-finite left out", page), page


def test_a_count_that_disagrees_with_the_shard_is_refused(two_ranks, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(two_ranks[0], index)
    m = _manifest(index)
    m["shards"][1]["nonfinite_count"], m["nonfinite_total"] = 1, 3
    (index / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ld.IndexFormatError, match=r"rank-00001\.h5: holds 2 non-finite ids, but the manifest's field"):
        ld.GradientStore(index)
    m["nonfinite_total"] = 4
    (index / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ld.IndexFormatError, match=r"nonfinite_total is 4 but its shard entries count 3"):
        ld.GradientStore(index)
    m["shards"][1]["nonfinite_count"] = "2"
    (index / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ld.IndexFormatError, match=r"field 'shards': nonfinite_count is \[2, '2'\]"):
        ld.GradientStore(index)


def test_resume_after_a_killed_rank_keeps_the_ids_in_their_shards(two_ranks, tmp_path):
    """Rank 1 is killed inside its 2nd commit: its record is the 1st one (11 rows, id 13 left
    out), 27 was met after it; the resumed job keeps 13 from the record and meets 27 again: the
    shards hold the same ids as the uninterrupted job's, each once."""
    out = tmp_path / "index"
    nan = ["--nan-id", *map(str, NAN)]
    killed = torchrun(MLP_WORKER, "--out", str(out), *nan, fault="kill_in_commit:2@1")
    assert killed.returncode != 0 and (out / "shards" / "rank-00001.partial").is_dir(), killed.stderr[-3000:]
    (rank1,) = [s for s in inspect_index(out)["shards"] if s["rank"] == 1]
    assert rank1["path"].endswith(".partial") and rank1["rows_committed"] == 11 and rank1["nonfinite_first"] == [13]
    resumed = torchrun(MLP_WORKER, "--out", str(out), *nan, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "4 sample(s) had non-finite gradients" in resumed.stderr
    assert [s["nonfinite_count"] for s in _manifest(out)["shards"]] == [2, 2]
    assert _shard_ids(out, 0) == [4, 6] and _shard_ids(out, 1) == [13, 27]
    assert_same_index(out, two_ranks[0])


# -- format version 3 -------------------------------------------------------------------------------
def test_a_version_3_index_is_read_with_its_ids_from_the_shards(tmp_path):
    m = _manifest(V3)
    assert m["format_version"] == 3 and m["nonfinite_ids"] == [7] and "nonfinite_count" not in m["shards"][0]
    with ld.GradientStore(V3) as store:
        assert store.manifest["nonfinite_total"] == 1 and "nonfinite_ids" not in store.manifest
        assert store.nonfinite_counts == [0, 1] and store.nonfinite_ids().tolist() == [7]
        assert sorted(store.ids.tolist()) == [i for i in range(12) if i != 7]
        rows = store[:]
    facts = inspect_index(V3)
    assert facts["status"] == "usable", facts["problems"]
    assert facts["nonfinite_samples"] == facts["nonfinite_in_manifest"] == 1 and facts["nonfinite_first"] == [7]
    # scored by this version: the scores are the rows' own (preconditioned query . row)
    scorer = ld.Scorer(mlp_worker.model(), V3, mode="dot")
    X, Y = mlp_worker.data(3)
    with scorer.capture(torch.arange(3)):
        scorer.backward(torch.nn.functional.cross_entropy(scorer.model(X), Y, reduction="sum"))
    scores = scorer.scores()
    top = scorer.topk(2)
    scorer.close()
    assert scores.shape == (3, len(rows)) and np.isfinite(scores).all()
    np.testing.assert_array_equal(top.scores, -np.sort(-scores, axis=1)[:, :2])
    # a version 3 manifest whose list disagrees with the shards is refused
    bad = tmp_path / "bad"
    shutil.copytree(V3, bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "nonfinite_ids": [7, 9]}))
    with pytest.raises(ld.IndexFormatError, match=r"nonfinite_total is 2 but the shards' 'nonfinite_ids' .* hold 1"):
        ld.GradientStore(bad)


def test_resuming_a_finished_version_3_index_changes_nothing(tmp_path):
    """A finalized v3 index resumed by this version (2 ranks, as it was written): adopted as it
    is, no file rewritten; rank 0 warns with the count from the v3 list and its own ids (none)."""
    index = tmp_path / "v3"
    shutil.copytree(V3, index)
    files = ["manifest.json", "stats.h5", "shards/rank-00000.h5", "shards/rank-00001.h5"]
    before = {p: (index / p).read_bytes() for p in files}
    proc = torchrun(MLP_WORKER, "--out", str(index), "--nan-id", "7", "--samples", "12", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"RuntimeWarning: 1 sample\(s\) had non-finite .* rank 0's shard holds none", proc.stderr)
    assert 'MANIFEST {"total_rows": 11, "nonfinite_total": 1}' in proc.stdout
    assert {p: (index / p).read_bytes() for p in files} == before


@pytest.mark.parametrize("storage", ["int8", "int4", "sign"])
def test_a_batch_whose_every_sample_is_nonfinite_appends_no_rows(tmp_path, storage):
    """Batch [4, 5] is all NaN: the quantized codecs encode an empty block (they failed on 0 rows)."""
    with pytest.warns(RuntimeWarning, match=r"2 sample\(s\) had non-finite gradients .* ids \[4, 5\]"):
        mlp_worker.run(mlp_args(tmp_path, "--storage-dtype", storage, "--batch", "2", "--nan-id", "4", "5"))
    with ld.GradientStore(tmp_path) as store:
        assert sorted(store.ids.tolist()) == [i for i in range(N) if i not in (4, 5)]
        assert store.nonfinite_ids().tolist() == [4, 5] and np.isfinite(store[:]).all()
