"""SIGINT and SIGTERM in every phase of a logging job (rows queued, inside a commit, building the
HDF5 shard, stats.h5, the manifest): the process ends within seconds, non-zero, and the same
command with --resume completes the index exactly. One process, the CLI, and 2 ranks under
torchrun signalled as a process group (docs/reliability.md, the fault table)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    CLI_WORKER,
    MLP_WORKER,
    TORCHRUN,
    assert_same_index,
    env,
    free_port,
    mlp_args,
    mlp_worker,
)

from logra_dist.cli.main import main

RAW = ["--nan-id", "13"]
EXIT_WITHIN_S = 10.0  # from the signal to the exit of every process


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref-raw")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        mlp_worker.run(mlp_args(out, *RAW))
    return out


def _run(cmd: list[str], fault: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run in a new session (its own process group); the seconds from the hook's signal to the exit."""
    proc = subprocess.Popen(
        cmd, env=env(fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    ended = time.time()
    _wait_group_gone(proc.pid)
    sent = [float(line.split()[1]) for line in err.splitlines() if line.startswith("SIGNAL_SENT")]
    assert sent, f"the hook never signalled: {err[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), ended - min(sent)


def _wait_group_gone(pgid: int, within: float = EXIT_WITHIN_S) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError(f"processes of group {pgid} still alive {within} s after the launcher exited")


PHASES = [
    ("batch", "INT"),
    ("batch", "TERM"),
    ("commit", "TERM"),
    ("build", "INT"),
    ("build", "TERM"),
    ("stats", "INT"),
    ("manifest", "TERM"),
]


@pytest.mark.parametrize("phase,sig", PHASES, ids=[f"{p}-SIG{s}" for p, s in PHASES])
def test_signal_in_each_phase_exits_within_seconds_then_resumes(tmp_path, reference, phase, sig):
    out = tmp_path / "index"
    proc, seconds = _run([sys.executable, str(MLP_WORKER), "--out", str(out), *RAW], f"signal_in:{phase}:{sig}")
    assert proc.returncode != 0 and f"Interrupted: SIG{sig}" in proc.stderr, proc.stderr[-3000:]
    assert seconds < EXIT_WITHIN_S, f"{seconds:.1f} s from SIG{sig} to the exit"
    print(f"{phase} SIG{sig}: exited {seconds:.2f} s after the signal")
    assert not (out / "manifest.json").exists()
    if phase == "build":  # the half-built shard under its temporary name, the partial kept
        assert (out / "shards" / "rank-00000.h5.partial").exists() and (out / "shards" / "rank-00000.partial").is_dir()
    with pytest.warns(RuntimeWarning, match=r"ids \[13\]"):
        mlp_worker.run(mlp_args(out, *RAW, "--resume"))
    assert sorted(os.listdir(out / "shards")) == ["rank-00000.h5"]
    assert_same_index(out, reference)


@pytest.mark.parametrize("phase,sig", [("build", "TERM"), ("batch", "INT"), ("commit", "TERM")])
def test_cli_interrupted_says_so_in_one_line_then_resumes(tmp_path, phase, sig):
    """`python launch/log.py` (through the fault worker) given a signal while building the shard,
    while rows are queued (the writer drops them on close), or in a commit that takes a minute
    (close waits ABANDON_WAIT_S for it, not a minute): exit status 128 + the signal, the last
    line says how to resume; the same command plus --resume finishes."""
    cfg = tmp_path / "logra.json"
    cfg.write_text(json.dumps({"k_in": 4, "k_out": 4, "flush_rows": 4, "storage_dtype": "float32"}))
    common = ["--max-samples", "16", "--batch-size", "2", "--max-length", "32", "--logra", str(cfg)]
    out, ref = tmp_path / "index", tmp_path / "ref"
    cmd = [sys.executable, str(CLI_WORKER), "log", "--out", str(out), *common]
    proc, seconds = _run(cmd, f"signal_in:{phase}:{sig}")
    signum = getattr(signal, f"SIG{sig}")
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert seconds < EXIT_WITHIN_S
    print(f"CLI {phase} SIG{sig}: exited {seconds:.2f} s after the signal")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"logra-dist log: interrupted by SIG{sig}; what was committed in {out} is kept: "
        "rerun the same command with --resume to finish the index"
    )
    assert main(["log", "--out", str(out), *common, "--resume"]) == 0
    assert main(["log", "--out", str(ref), *common]) == 0
    assert_same_index(out, ref)


@pytest.mark.parametrize("phase", ["batch", "build"])
def test_torchrun_process_group_interrupted_then_resumed(tmp_path, reference, phase):
    """2 ranks under torchrun; rank 0 sends SIGINT to the whole process group (Ctrl-C in a
    terminal): launcher and ranks all gone within seconds; torchrun + --resume completes it."""
    out = tmp_path / "index"
    launch = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port"]
    args = [str(MLP_WORKER), "--out", str(out), *RAW]
    proc, seconds = _run([*launch, str(free_port()), *args], f"signal_in:{phase}:INT:group@0")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert seconds < EXIT_WITHIN_S, f"{seconds:.1f} s from SIGINT to the last exit"
    print(f"torchrun {phase} SIGINT: every process gone {seconds:.2f} s after the signal")
    assert not (out / "manifest.json").exists()
    resumed = subprocess.run(
        [*launch, str(free_port()), *args, "--resume"], env=env(), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(out / "shards")) == ["rank-00000.h5", "rank-00001.h5"]
    assert_same_index(out, reference, rtol=1e-4, shards=False)
