"""PyTorch FSDP: FSDP1 (`FullyShardedDataParallel`) and FSDP2 (`fully_shard`).

Both run the forward through the wrapped module itself: its hooks all-gather each unit's
weights for the forward and again for the backward (activation gradients still need them).
With the weights frozen no unit produces a weight gradient, so FSDP skips its reduce-scatter
entirely; `sync_disabled` is therefore a no-op rather than FSDP1's `no_sync()`, which for
SHARD_GRAD_OP would keep whole unsharded weights alive between batches for nothing.
FSDP1 inserts `_fsdp_wrapped_module` into module names; `capture.canonical_name` drops it, so
layer names equal the bare model's. FSDP2 keeps names unchanged.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .base import Engine


class FSDP1Engine(Engine):
    kind = "fsdp1"

    def __init__(self, fsdp: nn.Module):
        super().__init__(fsdp, fsdp, fsdp)

    def parameters_to_freeze(self) -> Iterator[nn.Parameter]:
        # use_orig_params=False exposes FlatParameters, True exposes the original ones (and the
        # flat ones stay hidden): freezing whichever `parameters()` yields is what FSDP honours.
        yield from self.root.parameters()

    @property
    def forward_is_collective(self) -> bool:
        return True


class FSDP2Engine(Engine):
    kind = "fsdp2"

    def __init__(self, module: nn.Module):
        super().__init__(module, module, module)

    @property
    def device(self) -> torch.device:
        for p in self.root.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.device.type != "meta":
                return local.device
        return super().device

    @property
    def forward_is_collective(self) -> bool:
        return True
