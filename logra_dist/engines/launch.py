"""Launcher-agnostic process-group setup: torchrun, the deepspeed launcher, MPI, or one process.

torchrun and the deepspeed launcher export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. `mpiexec` exports only its own variables (Open MPI's OMPI_COMM_WORLD_*, MPICH's
PMI_*), so under MPI the torch variables are derived with mpi4py first: rank and size from
COMM_WORLD, the local rank from the shared-memory sub-communicator, and the address and a free
port chosen by rank 0 and broadcast. `rank` is always the GLOBAL rank (it names the shard file);
`local_rank` only picks the GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

_TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    backend: str | None  # None: a single process without a process group
    launcher: str  # "torchrun" | "deepspeed" | "mpi" | "single"
    device: torch.device


def detect_launcher(env: dict[str, str] | None = None) -> str:
    """Which launcher started this process, judged from its environment variables only."""
    env = dict(os.environ if env is None else env)
    if all(v in env for v in _TORCH_VARS):
        if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env:
            return "torchrun"
        return "deepspeed"  # or any launcher exporting the torch variables (slurm scripts, ...)
    if any(v in env for v in _MPI_SIZE_VARS):
        return "mpi"
    return "single"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def export_mpi_environment() -> None:
    """Set the torch.distributed variables from MPI (mpi4py), as torchrun would have."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("started by mpiexec but mpi4py is not installed: pip install mpi4py") from e
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    addr, port = None, None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or (
            "127.0.0.1" if size == local_size else socket.gethostbyname(socket.gethostname())
        )
        port = os.environ.get("MASTER_PORT") or str(_free_port())
    addr, port = comm.bcast((addr, port), root=0)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_size),
        MASTER_ADDR=addr,
        MASTER_PORT=port,
    )


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a CPU shared-memory all-reduce op (about 45 s) on its first
    process-group init; it serves CPU inference only. Replace the builder before DeepSpeed's
    backend is created. (`import deepspeed.comm.torch as m` would bind torch itself, hence
    sys.modules.)"""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` (/proc/<pid>/stat field 4); None when it is gone."""
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def exit_with_launcher(poll_s: float = 0.5, grace_s: float = 30.0) -> None:
    """A rank must not outlive its launcher, or it keeps writing an index a new job may resume.
    SIGTERM (then, after `grace_s`, SIGKILL) this process when its parent dies (Linux
    parent-death signal, plus a watchdog) and, under the deepspeed runner, when the runner dies:
    it returns at once on SIGINT/SIGTERM, orphaning its per-node `deepspeed.launcher.launch`
    with the ranks still running (measured). A killed rank leaves a resumable partial shard.
    Off with LOGRA_DIST_EXIT_WITH_LAUNCHER=0."""
    if os.environ.get("LOGRA_DIST_EXIT_WITH_LAUNCHER", "1") == "0":
        return
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the watchdog alone
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    # the runner, when the parent is its per-node launch: the launch's parent changes when it dies
    runner = _parent_of(parent) if "deepspeed.launcher.launch" in _cmdline(parent) else None

    def watch() -> None:
        while os.getppid() == parent and (runner is None or _parent_of(parent) == runner):
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="logra-dist-launcher-watchdog", daemon=True).start()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def _timeout(timeout_s: float | None) -> timedelta:
    if timeout_s is None:
        timeout_s = float(os.environ.get("LOGRA_DIST_TIMEOUT_S", 1800))
    return timedelta(seconds=timeout_s)


def init_distributed(
    backend: str | None = None, *, require_group: bool = False, timeout_s: float | None = None
) -> DistInfo:
    """Initialize torch.distributed from whatever launcher started this process (idempotent).

    A single process gets no process group unless `require_group` (DeepSpeed needs one even for
    one rank): then a world of one on a free local port. backend: "gloo" on CPU, "nccl" with GPUs.
    If DeepSpeed is already imported, its shm-op compile is skipped.
    """
    launcher = detect_launcher()
    if launcher == "mpi":
        export_mpi_environment()
    elif launcher == "single" and require_group and not dist.is_initialized():
        os.environ.update(
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()),
        )
    if "deepspeed" in sys.modules:
        skip_deepspeed_shm_build()
    if launcher in ("torchrun", "deepspeed") and not dist.is_initialized():
        exit_with_launcher()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():
        backend = dist.get_backend()
    elif "WORLD_SIZE" in os.environ:
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=_timeout(timeout_s))
    else:
        backend = None
    if backend is None:
        return DistInfo(
            0, 0, 1, None, launcher, torch.device("cuda", 0) if default_backend() == "nccl" else torch.device("cpu")
        )
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    info = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), backend, launcher, device)
    env_rank = os.environ.get("RANK")
    if env_rank is not None and int(env_rank) != info.rank:
        raise RuntimeError(f"process group rank {info.rank} differs from RANK={env_rank} set by {launcher}")
    return info


_HAD_GROUP = False  # a process group existed in this process (exit_process skips teardown then)


def destroy_distributed() -> None:
    global _HAD_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
        _HAD_GROUP = True


def exit_process(code: int) -> NoReturn:
    """End a launched rank whose job is done, without interpreter teardown when it had a process
    group: gloo's worker threads can still hold work objects whose destruction during
    finalization aborts a finished rank with SIGABRT ("terminate called without an active
    exception", pytorch#190489; seen here in about 1 of 3 runs of a 2-rank scoring job under
    load, after `destroy_process_group`). Everything the job writes is closed before this;
    stdio is flushed. A process that never had a group exits normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _HAD_GROUP or dist.is_initialized():
        os._exit(code)
    sys.exit(code)
