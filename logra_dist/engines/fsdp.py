"""PyTorch FSDP: FSDP1 (`FullyShardedDataParallel`) and FSDP2 (`fully_shard`).

Both run the forward through the wrapped module itself: its hooks all-gather each unit's
weights for the forward and again for the backward (activation gradients still need them).
With the weights frozen no unit produces a weight gradient, so FSDP skips its reduce-scatter
entirely; `sync_disabled` is therefore a no-op rather than FSDP1's `no_sync()`, which for
SHARD_GRAD_OP would keep whole unsharded weights alive between batches for nothing.
FSDP1 inserts `_fsdp_wrapped_module` into module names; `FSDP1Engine.canonical_name` drops it,
so layer names equal the bare model's. FSDP2 keeps names unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from logra_dist.engines.base import FSDP1_SEGMENT, Engine


class FSDP1Engine(Engine):
    kind = "fsdp1"
    wrapper_segments = (*Engine.wrapper_segments, FSDP1_SEGMENT)

    def __init__(self, fsdp: nn.Module):
        # freeze() acts on whatever `parameters()` yields: FlatParameters with
        # use_orig_params=False, the original parameters with True; FSDP honours either.
        super().__init__(fsdp, fsdp, fsdp)

    @property
    def compute_dtype(self) -> torch.dtype:
        """MixedPrecision(param_dtype=...) computes in that dtype whatever the stored weights'."""
        mp = getattr(self.wrapped, "mixed_precision", None)
        return getattr(mp, "param_dtype", None) or super().compute_dtype

    @contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """FSDP1's wrapper has no `generate`; the inner model's does, but calling it skips the
        root unit's unshard. So the root unit's own weights (embeddings, final norm, head) are
        gathered for the duration (recurse=False: the nested units still gather per forward)."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(self.wrapped, writeback=False, recurse=False):
            yield self.wrapped.module


class FSDP2Engine(Engine):
    kind = "fsdp2"

    def __init__(self, module: nn.Module):
        super().__init__(module, module, module)

    @property
    def compute_dtype(self) -> torch.dtype:
        """MixedPrecisionPolicy(param_dtype=...) computes in that dtype whatever the shards'."""
        state = getattr(self.root, "_get_fsdp_state", None)
        policy = getattr(state(), "_mp_policy", None) if state is not None else None
        return getattr(policy, "param_dtype", None) or super().compute_dtype

    def model_class(self) -> type:
        """`fully_shard` swaps in a generated subclass "FSDP<Name>": name the user's class under it."""
        return next(c for c in type(self.root).__mro__ if not c.__name__.startswith("FSDP"))

    @property
    def device(self) -> torch.device:
        for p in self.root.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.device.type != "meta":
                return local.device
        return super().device
