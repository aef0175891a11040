"""Where the self-influence cache goes: into the index when writable, else the user cache folder,
else nowhere (a note); a full disk is a note, not an error, and leaves no part file; stale part
files of dead jobs are removed by the next run; --no-cache writes nothing. Read-only indexes are
real read-only mounts (a private mount namespace: tests run as root, where chmod stops nothing),
full disks a file-size limit (RLIMIT_FSIZE) in a subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import FAULTS, env
from scorer_helpers import config, log_index

import logra_dist as ld
from logra_dist.cli.main import main
from logra_dist.scoring import cacheplace

WORKER = FAULTS / "score_worker.py"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache-place")
    log_index(root / "idx", np.random.default_rng(2).permutation(30), config(hessian="kfac"))
    log_index(root / "q", np.arange(1000, 1006))
    return root


@pytest.fixture
def index(built, tmp_path) -> Path:
    """A fresh copy of the index (no cache yet) per test."""
    shutil.copytree(built / "idx", tmp_path / "idx")
    return tmp_path / "idx"


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in sorted(folder.rglob("*"))}


def _score(index: Path, queries: Path, *extra: str, read_only: bool = False, home: Path, **kw):
    cmd = [sys.executable, str(WORKER), str(index), str(queries), *extra]
    if read_only:  # the index folder bind-mounted read-only onto itself, for this process only
        script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(index), *cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env(LOGRA_DIST_HOME=str(home)), capture_output=True, text=True, timeout=120, **kw)
    proc.elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def _read_only_mounts_work(tmp: Path) -> bool:
    tmp.mkdir()
    probe = subprocess.run(
        [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            f'mount --bind -o ro "{tmp}" "{tmp}" && touch "{tmp}/x"',
        ],
        capture_output=True,
        text=True,
    )
    return "Read-only file system" in probe.stderr


def _same(got: dict, want: dict) -> None:
    assert got["ids"] == want["ids"]
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-6)
    np.testing.assert_allclose(got["selfinf"], want["selfinf"], rtol=1e-6)


def test_read_only_index_caches_in_the_user_folder_then_nowhere(built, index, tmp_path):
    if not _read_only_mounts_work(tmp_path / "probe"):
        pytest.skip("no private read-only bind mounts here (needs root and unshare)")
    home = tmp_path / "home"
    writable = tmp_path / "rw"
    shutil.copytree(index, writable)
    want, _ = _score(writable, built / "q", home=home)
    assert (writable / "selfinf.h5").exists() and not home.exists()  # writable: the cache goes into the index

    before = _listing(index)
    got, proc = _score(index, built / "q", read_only=True, home=home)
    _same(got, want)
    assert _listing(index) == before  # nothing written into the read-only index
    user = home / "selfinf" / cacheplace.index_digest(index, _manifest_sha(index))
    assert sorted(os.listdir(user)) == ["selfinf.h5"], os.listdir(user)
    stamp = (user / "selfinf.h5").stat().st_mtime
    again, _ = _score(index, built / "q", read_only=True, home=home)  # read back from the user folder
    _same(again, want)
    assert (user / "selfinf.h5").stat().st_mtime == stamp

    # another index never reads that entry: its folder is another digest
    other = tmp_path / "other"
    shutil.copytree(index, other)
    assert cacheplace.index_digest(other, _manifest_sha(other)) != user.name

    # the user folder not writable either (--cache-dir inside the read-only index): a note, no cache
    fresh = tmp_path / "fresh"
    shutil.copytree(built / "idx", fresh)
    before = _listing(fresh)
    got, proc = _score(fresh, built / "q", "--cache-dir", str(fresh / "cache"), read_only=True, home=home)
    _same(got, want)
    assert "self-influence not cached: neither" in proc.stderr and "--no-cache" in proc.stderr
    assert _listing(fresh) == before
    print(f"read-only index, no writable cache folder: scored with a note in {proc.elapsed:.1f} s")


def _manifest_sha(index: Path) -> str:
    import hashlib

    return hashlib.sha256((index / "manifest.json").read_bytes()).hexdigest()


def test_full_disk_while_writing_the_cache_is_a_note_and_leaves_no_part(built, index, tmp_path):
    home = tmp_path / "home"
    want, _ = _score(index.parent / "idx", built / "q", "--no-cache", home=home)
    got, proc = _score(index, built / "q", "--fsize", "20000", home=home)  # parts need a 48 KiB chunk
    _same(got, want)
    last = [line for line in proc.stderr.strip().splitlines() if "RuntimeWarning" in line][-1]
    assert "self-influence not cached: a rank could not write its part" in last and "File too large" in last, (
        proc.stderr[-2000:]
    )
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(index)) == ["manifest.json", "shards", "stats.h5"]  # no .part, no .tmp, no probe
    print(f"full disk while caching: scored with a note in {proc.elapsed:.1f} s")


def test_stale_parts_of_dead_jobs_are_removed_by_the_next_run(built, index):
    old = time.time() - 2 * cacheplace.STALE_AFTER_S
    dead = index / "selfinf.h5.part-00000000000000aa-rank-00000"
    dead_merge = index / "selfinf.h5.tmp-00000000000000aa"
    fresh = index / "selfinf.h5.part-00000000000000bb-rank-00000"  # a job that just started
    alive = index / "selfinf.h5.part-00000000000000cc-rank-00001"  # an old part its live job still holds
    for p in (dead, dead_merge, fresh, alive):
        p.write_bytes(b"x" * 100)
    for p in (dead, dead_merge, alive):
        os.utime(p, (old, old))
    held = os.open(alive, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        sc = ld.Scorer(None, index, mode="relatif")
        sc.add_query_gradients(built / "q")
        sc.topk(3)
        sc.close()
    finally:
        os.close(held)
    left = sorted(p.name for p in index.iterdir())
    assert left == sorted(["manifest.json", "shards", "stats.h5", "selfinf.h5", fresh.name, alive.name]), left


def test_no_cache_writes_nothing_anywhere(built, index, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LOGRA_DIST_HOME", str(home))
    before = _listing(index)
    assert main(["score", "--index", str(index), "--query-index", str(built / "q"), "--topk", "3", "--no-cache"]) == 0
    sc = ld.Scorer(None, index, mode="cosine", cache_self_influence=False)
    sc.add_query_gradients(built / "q")
    sc.topk(3)
    sc.train_self_influence()
    sc.close()
    assert _listing(index) == before and not home.exists()


def test_cache_dir_option_is_used_when_the_index_is_not_writable(built, index, tmp_path, monkeypatch):
    """In one process: an index whose folder refuses writes (the probe fails) sends the entry to
    --cache-dir, under the index's digest."""
    monkeypatch.setattr(
        cacheplace, "writable", lambda folder, real=cacheplace.writable: folder != index and real(folder)
    )
    before = _listing(index)
    assert (
        main(["score", "--index", str(index), "--query-index", str(built / "q"), "--cache-dir", str(tmp_path / "c")])
        == 0
    )
    assert _listing(index) == before
    (entry,) = (tmp_path / "c").iterdir()
    assert sorted(os.listdir(entry)) == ["selfinf.h5"]
