"""Starting real multi-process jobs from tests: the deepspeed launcher or torchrun, a clean
environment (no inherited rank variables, W&B off, one thread per rank), a hard timeout that kills
the whole process group, and the output tail in the failure message."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return env


def deepspeed_cmd(script: str | Path, *args: str, ranks: int = 2) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    launcher = str(launcher) if launcher.exists() else (shutil.which("deepspeed") or "deepspeed")
    return [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *map(str, args)]


def run_job(cmd: list[str], log: Path, timeout_s: float = 240) -> float:
    """Run one job to completion (asserting exit 0); returns its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=job_env(), cwd=REPO, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"timeout after {timeout_s:.0f} s"
    assert rc == 0, f"{' '.join(cmd)}\nexit {rc}:\n{log.read_text()[-5000:]}"
    return time.perf_counter() - start
