"""What a user sees when a command fails: the real CLI in subprocesses (`python -m logra_dist.cli`
and launch/*.py, i.e. `run()`), one or two lines naming what is wrong and where, exit status
non-zero, no traceback unless --debug; under a launcher each rank says which rank it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed.jobs import REPO, free_port, job_env

from logra_dist.cli.main import run
from logra_dist.index.format import index_lock_path, shard_lock_path
from logra_dist.index.lockfile import LockFile


def _start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "logra_dist.cli", *args]
    env = {**job_env(), **env}  # job_env drops inherited rank variables: these are the test's own
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str]]:
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        out[name] = (p.returncode, stdout + stderr)
    return out


def _one_error(rc_text: tuple[int, str], *needles: str, rc: int = 1) -> str:
    code, text = rc_text
    lines = [line for line in text.splitlines() if "error:" in line]
    assert code == rc, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert len(lines) == 1 and len(lines[0]) < 1200, text[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _run_here(argv: list[str], capsys) -> tuple[int, str]:
    """`run()` (the entry point itself) in this process: it ends with sys.exit(code)."""
    with pytest.raises(SystemExit) as info:
        run(argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out + captured.err


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text('{"text": "a query"}\n')
    (tmp_path / "bad_utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "bad.json").write_text('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 3,}\n}\n')
    (tmp_path / "logra.json").write_text('{"k_in": 4, "k_out": 4}\n')
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(
        '{"format_version": 2, "config": {}, "layout": [], "shards": [], "world_size": 0}'
    )
    locked = tmp_path / "locked"
    lock = LockFile.acquire(index_lock_path(locked), "the test")  # held by this process while the job starts
    log = ["log", "--max-samples", "4", "--batch-size", "4", "--no-wandb"]
    try:  # in subprocesses: the real command line, and a lock held by another process
        procs = {
            "no index": _start(["score", "--index", "nope", "--queries", "q.jsonl"], tmp_path),
            "debug": _start(
                [str(REPO / "launch/score.py"), "--index", "nope", "--queries", "q.jsonl", "--debug"], tmp_path
            ),
            "locked": _start([*log, "--out", str(locked)], tmp_path),
        }
        here = {  # in this process, through run() too, while those run
            "queries missing": _run_here(["score", "--index", "nope", "--queries", "missing.jsonl"], capsys),
            "queries utf8": _run_here(["score", "--index", "nope", "--queries", "bad_utf8.jsonl"], capsys),
            "bad json": _run_here([*log, "--out", "x", "--config", "bad.json"], capsys),
            "wrong config": _run_here([*log, "--out", "x", "--config", "logra.json"], capsys),
            "logra missing": _run_here([*log, "--out", "x", "--logra", "nothere.json"], capsys),
            "model missing": _run_here([*log, "--out", "x", "--model", str(tmp_path / "no-model")], capsys),
            "old format": _run_here(["score", "--index", "old", "--queries", "q.jsonl"], capsys),
            "inspect": _run_here(["inspect", "q.jsonl"], capsys),
        }
        results = _finish(procs)
    finally:
        lock.release()
    line = _one_error(results["no index"], "logra-dist score: error:", "no index at nope")
    assert "--resume" not in line
    code, text = results["debug"]
    assert code == 1 and "Traceback (most recent call last)" in text and "no index at nope" in text
    _one_error(results["locked"], "locked by another job", f"pid {os.getpid()}", "use another --out")
    _one_error(here["queries missing"], "missing.jsonl")
    _one_error(here["queries utf8"], "bad_utf8.jsonl:2: not valid UTF-8")
    _one_error(here["bad json"], "bad.json", "line 3 column")
    _one_error(here["wrong config"], "logra.json", "neither a DeepSpeed config")
    _one_error(here["logra missing"], "nothere.json", "No such file")
    _one_error(here["model missing"], "no-model", "no config.json")
    _one_error(here["old format"], "old", "version")
    _one_error(here["inspect"], "q.jsonl", "not a directory", rc=2)  # 1 would mean "resumable"


def test_a_command_line_error_is_said_once_by_rank_0(capsys, monkeypatch):
    """The same on every rank (checked before any process group): rank 0 says it; all exit 1."""
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        code, text = _run_here(["log", "--out", "x", "--batch-size", "0"], capsys)
        assert code == 1 and "Traceback" not in text
        assert ("--batch-size must be >= 1, got 0" in text) == (rank == 0), text


def _launch_two(args: list[str], cwd: Path) -> list[tuple[int, str]]:
    """Two ranks with the variables the deepspeed launcher exports (a real gloo group)."""
    port = str(free_port())
    procs = {
        r: _start(args, cwd, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        for r in range(2)
    }
    return [v for _, v in sorted(_finish(procs).items())]


def test_under_a_launcher_each_rank_exits_nonzero_and_says_which_rank(tmp_path):
    """Rank 1's shard lock is held (by this test): rank 1 names its lock, rank 0 names rank 1."""
    index = tmp_path / "idx"
    lock = LockFile.acquire(shard_lock_path(index, 1), "the test")
    try:
        ranks = _launch_two(["log", "--out", "idx", "--max-samples", "4", "--no-wandb"], tmp_path)
    finally:
        lock.release()
    _one_error(ranks[1], "logra-dist log [rank 1/2]: error: rank 1: ", "rank-00001.lock: locked by another job")
    _one_error(ranks[0], "logra-dist log [rank 0/2]: error: ", "rank(s) [1] could not lock the index")


def test_two_rank_job_counts_every_rank_in_progress_summary_and_metrics(tmp_path):
    """Progress estimates all ranks' samples from rank 0's (no collective per batch); the summary
    and metrics.json come from the one gather at the end and hold every rank's own figures."""
    ranks = _launch_two(["log", "--out", "idx", "--max-samples", "9", "--batch-size", "3", "--no-wandb"], tmp_path)
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    out0, out1 = ranks[0][1], ranks[1][1]
    assert "[logra-dist log] 9/9 (100%) samples on 2 ranks" in out0, out0[-2000:]  # the gathered count
    assert "[logra-dist log] done: 9 samples" in out0 and "on 2 rank(s)" in out0 and "finalize" in out0
    assert "peak memory (MiB): r0 " in out0 and ", r1 " in out0
    assert "[logra-dist log]" not in out1  # one console, rank 0's
    m = json.loads((tmp_path / "idx" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["samples"] == 9 and [r["samples"] for r in m["ranks"]] == [5, 4]
    assert m["tokens"] == sum(r["tokens"] for r in m["ranks"]) > 0
    assert all(r["peak_rss_MiB"] > 0 for r in m["ranks"]) and len(m["per_rank"]) == 2
    assert set(m["phases"]) >= {"forward", "backward", "finalize", "all-reduce"}
    assert m["phases"]["finalize"]["max_s"] >= m["phases"]["finalize"]["mean_s"] > 0


def test_our_runtime_errors_are_messages_and_a_librarys_are_unexpected():
    import torch

    from logra_dist.cli.errors import describe
    from logra_dist.scoring.scorer import Scorer

    scorer = object.__new__(Scorer)  # a Scorer made without a model, as far as capture() can tell
    scorer.session = None
    with pytest.raises(RuntimeError) as ours:
        scorer.capture([1])
    with pytest.raises(RuntimeError) as theirs:
        torch.zeros(2) @ torch.zeros(3)
    assert describe(ours.value)[0].startswith("Scorer.capture(): this Scorer was made without a model")
    message = describe(theirs.value)[0]
    assert message.startswith("unexpected RuntimeError: ") and "rerun with --debug" in message
