"""Process-group setup for every launcher (torchrun, deepspeed, plain python)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the job's process group if a launcher started several processes; no-op otherwise."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=collective_timeout())


def collective_timeout() -> timedelta:
    """How long a collective waits for the slowest rank before failing (LOGRA_DIST_TIMEOUT, seconds).
    A rank that dies is noticed at once (its peers' sockets close); this bounds a live but stuck
    one. It also bounds the wait at finalize for ranks still logging, hence torch's 30 min default."""
    return timedelta(seconds=float(os.environ.get("LOGRA_DIST_TIMEOUT") or 1800))
