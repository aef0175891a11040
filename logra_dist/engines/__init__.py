"""The only part of logra_dist that knows DeepSpeed, FSDP or DDP.

`wrap(obj)` picks the adapter for a user's model or engine. Detection goes by class and module
name first, so a bare-module user never imports DeepSpeed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from logra_dist.engines.base import DDPEngine, Engine


def wrap(obj: Any) -> Engine:
    if isinstance(obj, Engine):
        return obj
    cls = type(obj)
    module = cls.__module__ or ""
    if module.startswith("deepspeed"):
        from logra_dist.engines.deepspeed import DeepSpeedEngineAdapter

        return DeepSpeedEngineAdapter(obj)
    if cls.__name__ == "FullyShardedDataParallel":
        from logra_dist.engines.fsdp import FSDP1Engine

        return FSDP1Engine(obj)
    if any(c.__name__ == "FSDPModule" for c in cls.__mro__):
        from logra_dist.engines.fsdp import FSDP2Engine

        return FSDP2Engine(obj)
    if cls.__name__ == "DistributedDataParallel":
        return DDPEngine(obj)
    if isinstance(obj, nn.Module):
        return Engine(obj, obj)
    raise TypeError(f"attach() needs an nn.Module, DDP, FSDP or DeepSpeed engine, got {cls.__module__}.{cls.__name__}")


__all__ = ["Engine", "wrap"]
