"""One writer per index (docs/reliability.md "One writer per index"), with real processes: a
second job or a `--resume` beside a running job is refused naming the holder and the running
job's index stays intact; a SIGKILLed job's lock is taken over; the reader says whether a job
is running; two ranks agree on a refusal; the deepspeed runner's SIGINT/SIGTERM takes its ranks
with it, leaving a resumable index."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import MLP_WORKER, ROOT, env, rows_by_id, run_mlp, torchrun

import logra_dist as ld
from logra_dist.index.lockfile import LockFile, is_held, read_holder

sys.path.insert(0, str(ROOT / "tests" / "distributed"))
from jobs import deepspeed_cmd


def _start_mlp(out: Path, *args: str, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(MLP_WORKER), "--out", str(out), *args],
        env=env(fault),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _ids_once(index: Path, n: int) -> None:
    ids, _ = rows_by_id(index)  # asserts each id once
    np.testing.assert_array_equal(ids, np.arange(n))


def test_second_job_or_resume_beside_a_running_job_is_refused_naming_it(tmp_path):
    index = tmp_path / "index"
    first = _start_mlp(index, "--n", "80", fault="slow_batches:1000")  # 20 batches, >= 20 s
    try:
        _wait_for(index / "shards" / "rank-00000.partial" / "commit.npz", first)
        holder = read_holder(index / "locks" / "rank-00000.lock")
        assert holder["pid"] == first.pid and holder["host"] and "mlp_worker.py" in holder["command"]
        running = (
            f"a job is running: host {holder['host']} pid {first.pid} since {holder['since']} ({holder['command']})"
        )
        for args in ([], ["--resume"]):
            start = time.monotonic()
            second = run_mlp(index, "--n", "80", *args)
            took = time.monotonic() - start
            assert second.returncode != 0
            assert f"rank 0: {index / 'locks' / 'index.lock'}: locked by another job: {running}" in second.stderr, (
                second.stderr
            )
            assert "wait for it to finish or stop it (then rerun with --resume)" in second.stderr
            assert first.poll() is None, "the refused job disturbed the running one"
            print(f"second job {args} refused in {took:.1f} s (process start included)")
        with pytest.raises(
            ld.IndexFormatError,
            match=f"is not a finalized LoGra index yet: {re.escape(running)}; wait for it to finish$",
        ):
            ld.GradientStore(index)
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    _ids_once(index, 80)  # nothing cut, nothing appended by the refused jobs
    assert sorted(os.listdir(index / "shards")) == ["rank-00000.h5"]  # locks released with the job
    assert not (index / "locks").exists()


def test_cli_job_on_a_running_index_is_refused(tmp_path):
    index = tmp_path / "index"
    holder = LockFile.acquire(index / "locks" / "index.lock", "a test holding the index")
    try:
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launch" / "log.py"), "--out", str(index), "--max-samples", "4"],
            env=env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        took = time.monotonic() - start
    finally:
        holder.release()
    assert proc.returncode != 0
    assert (
        f"locks/index.lock: locked by another job: a job is running: host {os.uname().nodename} pid {os.getpid()}"
        in (proc.stderr)
    ), proc.stderr[-3000:]
    assert not (index / "shards" / "rank-00000.partial").exists()  # refused before anything was written
    print(f"CLI job refused in {took:.1f} s (model load included)")


def test_lock_of_a_sigkilled_job_is_taken_over_and_the_reader_says_interrupted(tmp_path):
    index = tmp_path / "index"
    killed = run_mlp(index, fault="kill_after_batches:3")
    assert killed.returncode == -signal.SIGKILL
    for lock in (index / "locks" / "index.lock", index / "locks" / "rank-00000.lock"):
        assert read_holder(lock)["pid"] > 0 and not is_held(lock)  # the file stays, the flock went with the job
    with pytest.raises(
        ld.IndexFormatError,
        match=r"manifest\.json: missing; .* is not a finalized LoGra index: the job that wrote it was "
        r"interrupted \(no job holds its locks\); rerun it with --resume",
    ):
        ld.GradientStore(index)
    resumed = run_mlp(index, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _ids_once(index, 40)
    assert not (index / "locks").exists()
    with pytest.raises(ld.IndexFormatError, match=r"nothing/manifest\.json: missing; no index at .*nothing$"):
        ld.GradientStore(tmp_path / "nothing")


def test_a_forked_child_does_not_keep_a_dead_holders_lock(tmp_path):
    """A DataLoader worker forked by a rank shares its open lock file; closed in the child at
    fork, the lock still goes with the rank."""
    lock = tmp_path / "rank-00000.lock"
    code = (
        "import os, signal, time, sys\n"
        "from pathlib import Path\n"
        "from logra_dist.index.lockfile import LockFile\n"
        f"LockFile.acquire(Path({str(lock)!r}), 'test')\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60); os._exit(0)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.DEVNULL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmd(int(p)).startswith(sys.executable)]
    child = [p for p in children if code.splitlines()[3] in _cmd(p)]
    try:
        assert child, "the forked child is gone already"
        assert not is_held(lock)
        LockFile.acquire(lock, "the next job").release()
    finally:
        for p in child:
            os.kill(p, signal.SIGKILL)


def _job(index: Path) -> list[int]:
    """Live processes of the job writing `index` (its path is on their command line)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and str(index) in _cmd(int(p))]


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_two_ranks_refuse_together_when_one_rank_is_locked(tmp_path):
    index = tmp_path / "index"
    holder = LockFile.acquire(index / "locks" / "rank-00001.lock", "a test holding rank 1")
    try:
        proc = torchrun(MLP_WORKER, "--out", str(index))
    finally:
        holder.release()
    assert proc.returncode != 0
    me = f"host {os.uname().nodename} pid {os.getpid()}"
    assert f"rank 1: {index}/locks/rank-00001.lock: locked by another job: a job is running: {me}" in proc.stderr
    assert f"{index}: rank(s) [1] could not lock the index: {index}/locks/rank-00001.lock is held by {me}" in (
        proc.stderr
    )
    assert not list((index / "shards").glob("*.partial")) and not (index / "locks" / "index.lock").exists()
    print(f"2-rank job refused in {proc.elapsed:.1f} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_deepspeed_runner_signal_takes_its_ranks_and_leaves_a_resumable_index(tmp_path, sig):
    index = tmp_path / "index"
    cmd = deepspeed_cmd(MLP_WORKER, "--out", index, "--samples", "40")
    runner = subprocess.Popen(
        cmd,
        env=env("stall_after_batches:3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=ROOT,
    )
    try:
        for r in (0, 1):
            _wait_for(index / "shards" / f"rank-{r:05d}.partial" / "commit.npz", runner, timeout=180)
        assert len(_job(index)) == 4  # runner, launch, 2 ranks
        time.sleep(1)  # both ranks stalled after 3 batches, holding their locks
        start = time.monotonic()
        runner.send_signal(sig)
        while any(_job(index)):  # the ranks and deepspeed's per-node launch
            assert time.monotonic() - start < 10, f"{_job(index)} outlived their launcher"
            time.sleep(0.05)
        print(f"{sig.name}: ranks gone {time.monotonic() - start:.1f} s after the signal to the runner")
    finally:
        for p in _job(index):
            os.kill(p, signal.SIGKILL)
        runner.wait(timeout=30)
    resumed = subprocess.run(
        deepspeed_cmd(MLP_WORKER, "--out", index, "--samples", "40", "--resume"),
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _ids_once(index, 40)
    assert json.loads((index / "manifest.json").read_text())["world_size"] == 2


def test_lock_files_naming_another_host_or_a_live_unlocked_holder(tmp_path):
    """What flock cannot see is said: a record of another host is taken over with a warning; a
    record of a live process here whose lock is free (flock not honoured) is refused."""
    from logra_dist.index.lock import IndexLockedError, lock_job
    from logra_dist.index.lockfile import me

    lock = tmp_path / "locks" / "index.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({**me("elsewhere"), "host": "other-host", "pid": 4242}))
    with pytest.warns(RuntimeWarning, match=r"took over the lock of host other-host pid 4242 .*another host"):
        lock_job(tmp_path, 0, 1).release()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        record = {**me("a job"), "pid": sleeper.pid}
        record["process_start_ticks"] = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        lock.parent.mkdir(exist_ok=True)
        lock.write_text(json.dumps(record))
        with pytest.raises(IndexLockedError, match=rf"pid {sleeper.pid} .*yet its lock is free: this file system"):
            lock_job(tmp_path, 0, 1)
    finally:
        sleeper.kill()
        sleeper.wait()
