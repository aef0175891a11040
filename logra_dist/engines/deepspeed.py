"""DeepSpeed engines of any ZeRO stage (0-3), with or without an optimizer.

Logging runs the forward through `engine.module` and a plain `loss.backward()`, never
`engine.backward`: the engine's backward scales the loss, runs the ZeRO gradient epilogue and
its reductions, and without an optimizer (a `DeepSpeedZeRoOffload` engine) it is refused. With
the weights frozen no weight gradient exists, so ZeRO's reduce hooks never fire; under ZeRO-3
the module hooks DeepSpeed installed at `initialize` still gather each layer's weights for the
forward and again for the activation-gradient backward, and that is the only traffic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from logra_dist.engines.base import Engine


class DeepSpeedEngineAdapter(Engine):
    kind = "deepspeed"

    def __init__(self, engine: Any):
        module = getattr(engine, "module", None)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"{type(engine).__name__} has no `.module`; attach() expects the engine "
                "returned by deepspeed.initialize"
            )
        super().__init__(engine, module, module)
        self.stage = int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage") else 0
        self.kind = f"deepspeed-zero{self.stage}"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The engine's bf16 / fp16 switch (it casts the module), else its parameters' dtype."""
        for enabled, dtype in (("bfloat16_enabled", torch.bfloat16), ("fp16_enabled", torch.float16)):
            check = getattr(self.wrapped, enabled, None)
            if callable(check) and check():
                return dtype
        return super().compute_dtype

    def parameter_count(self) -> int:
        """ZeRO-3 partitions leave each rank an empty tensor; `ds_numel` is the full size."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.root.parameters())

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.stage == 3:
            self._release_leftovers()

    def _release_leftovers(self) -> None:
        """Re-partition every weight still gathered after a logging backward. ZeRO-3 keeps a
        weight gathered after the forward when its trace says the backward will use it; with the
        weights frozen, modules whose input carries no gradient (embedding, layer-0 attention)
        never run that backward, so without this they would stay gathered for the whole job
        (measured on an engine that had trained before attach). Local: no communication.
        DeepSpeed's documented remedy (`partition_all_parameters`, what `empty_partition_cache`
        calls, minus its gc.collect)."""
        opt = getattr(self.wrapped, "optimizer", None)
        offload = getattr(opt, "parameter_offload", opt)  # Stage3 optimizer, or the offload itself
        release = getattr(offload, "partition_all_parameters", None)
        if release is not None:
            release()

    @contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """`engine.module.generate`: ZeRO-3's module hooks gather each layer per forward. Afterwards,
        any weight left gathered is re-partitioned, as after a logging backward (none was left on
        a freshly loaded engine, measured; a trained engine's prefetch trace may keep some)."""
        try:
            yield self.root
        finally:
            if self.stage == 3:
                self._release_leftovers()

    @property
    def device(self) -> torch.device:
        device = getattr(self.wrapped, "device", None)
        return torch.device(device) if device is not None else super().device
