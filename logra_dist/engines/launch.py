"""Process-group setup for every launcher (torchrun, deepspeed, plain python)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the job's process group if a launcher started several processes; no-op otherwise."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
