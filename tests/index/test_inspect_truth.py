"""`logra-dist inspect` tells the truth: the readers' checks, every problem listed, exit codes
0 usable / 1 unfinished but resumable / 2 damaged (real files, real processes for the CLI)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import ROOT, run_mlp

import logra_dist as ld
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import stats_attrs, write_stats
from logra_dist.index.inspect import inspect_index, render
from logra_dist.index.writer import write_index

SPECS = [LayerSpec("a", "linear", 4, 4, 2, 3), LayerSpec("b", "linear", 4, 4, 3, 2)]


def _index(out: Path, seed: int = 0) -> Path:
    """A finalized 2-rank index: shards, manifest and a stats.h5 with real statistics."""
    cfg = ld.LoGraConfig(k_in=2, k_out=2, seed=seed, storage_dtype="float32", flush_rows=4).to_json()
    rng = np.random.default_rng(seed)
    shards = [[(np.arange(r, 16, 2), rng.standard_normal((8, 12)))] for r in range(2)]
    manifest = write_index(out, SPECS, cfg, shards)
    state = {f"{s.name}/evals": rng.standard_normal(4096) for s in SPECS}
    write_stats(out / "stats.h5", "raw", 1.0, state, stats_attrs(manifest, 16))
    return out


def _cli(index: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "logra_dist.cli", "inspect", "--json", str(index)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _index(tmp_path_factory.mktemp("good") / "index")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    return _index(tmp_path_factory.mktemp("foreign") / "index", seed=1)


def _damage(case: str, index: Path, foreign: Path) -> None:
    shards = index / "shards"
    if case in ("truncated-stats", "all"):
        os.truncate(index / "stats.h5", (index / "stats.h5").stat().st_size // 2)
    if case == "swapped":
        os.rename(shards / "rank-00000.h5", shards / "tmp.h5")
        os.rename(shards / "rank-00001.h5", shards / "rank-00000.h5")
        os.rename(shards / "tmp.h5", shards / "rank-00001.h5")
    if case in ("unlisted", "all"):
        shutil.copy(shards / "rank-00001.h5", shards / "rank-00002.h5")
    if case in ("foreign", "all"):
        shutil.copy(foreign / "shards" / "rank-00001.h5", shards / "rank-00001.h5")


EXPECT = {
    "truncated-stats": [r"stats\.h5: unreadable statistics \(truncated or corrupted\?\)"],
    "swapped": [
        r"rank-00000\.h5: written by another job: its rank is '1', the manifest's is '0'",
        r"rank-00001\.h5: written by another job: its rank is '0', the manifest's is '1'",
    ],
    "unlisted": [r"rank-00002\.h5: a shard the manifest does not list"],
    "foreign": [r"rank-00001\.h5: written by another job: its config_rows is .*'seed': 1"],
}
EXPECT["all"] = EXPECT["truncated-stats"] + EXPECT["unlisted"] + EXPECT["foreign"]


def test_a_good_index_is_usable_and_exits_0(good):
    facts = inspect_index(good)
    assert facts["status"] == "usable" and facts["exit_code"] == 0 and facts["problems"] == [], facts["problems"]
    assert "COMPLETE (exit code 0)" in render(facts)
    proc = _cli(good)
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "usable", proc.stderr[-2000:]


@pytest.mark.parametrize("case", list(EXPECT))
def test_each_damage_is_listed_and_the_index_is_damaged(tmp_path, good, foreign, case):
    import re

    index = tmp_path / "index"
    shutil.copytree(good, index)
    _damage(case, index, foreign)
    start = time.monotonic()
    facts = inspect_index(index)
    print(f"{case}: {time.monotonic() - start:.2f}s")
    assert facts["status"] == "damaged" and facts["exit_code"] == 2 and not facts["complete"]
    for pattern in EXPECT[case]:
        assert any(re.search(pattern, p) for p in facts["problems"]), (pattern, facts["problems"])
    assert len(facts["problems"]) >= len(EXPECT[case])
    assert "DAMAGED" in render(facts)
    if case == "all":  # the CLI: same list, exit code 2
        proc = _cli(index)
        assert proc.returncode == 2 and json.loads(proc.stdout)["problems"] == facts["problems"], proc.stderr[-2000:]


def test_a_killed_job_is_resumable_and_exits_1(tmp_path):
    out = tmp_path / "index"
    killed = run_mlp(out, "--flush-rows", "4", fault="kill_after_batches:5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    proc = _cli(out)
    facts = json.loads(proc.stdout)
    assert proc.returncode == 1 and facts["status"] == "partial", (proc.stderr[-2000:], facts["problems"])
    assert any("rank-00000.partial: incomplete" in p for p in facts["problems"])
    # the same partial with its commit record damaged: resume would refuse it
    (out / "shards" / "rank-00000.partial" / "commit.npz").write_bytes(b"not a record")
    facts = inspect_index(out)
    assert facts["exit_code"] == 2 and any(
        "rank-00000.partial: unreadable commit record" in p for p in facts["problems"]
    )


def test_a_finalize_killed_before_the_manifest_is_resumable_until_its_statistics_go(tmp_path):
    out = tmp_path / "index"
    killed = run_mlp(out, "--flush-rows", "4", fault="kill_before_manifest")
    assert killed.returncode == -9, killed.stderr[-2000:]
    facts = inspect_index(out)
    assert facts["exit_code"] == 1 and facts["shards"][0]["complete"], facts["problems"]
    (out / "shards" / "rank-00000.stats.npz").unlink()  # resume could not re-run the finalize now
    facts = inspect_index(out)
    assert facts["exit_code"] == 2 and any("its finalize cannot be re-run" in p for p in facts["problems"])
