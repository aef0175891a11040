"""What the orchestrators need from a training stack, and the bare-module implementation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from logra_dist import comm

FSDP1_SEGMENT = "_fsdp_wrapped_module"  # what FullyShardedDataParallel inserts into module names


class Engine:
    """Adapter over a user's model or engine.

    root: the module whose named submodules are the layers (hooks go there).
    model: what to call for a forward pass during logging and query capture.
    Subclasses override `sync_disabled` (and, if needed, `backward`) so that a logging backward
    moves no gradient across ranks.
    """

    kind = "module"
    # Segments that wrappers insert into module names (activation checkpointing, torch.compile);
    # engines add their own, so layer names, projection seeds and layouts match the bare model's.
    wrapper_segments: ClassVar[tuple[str, ...]] = ("_checkpoint_wrapped_module", "_orig_mod")

    def __init__(self, wrapped: Any, root: nn.Module, model: Callable | None = None):
        self.wrapped, self.root = wrapped, root
        self.model = model if model is not None else wrapped
        self._saved_requires_grad: list[tuple[torch.nn.Parameter, bool]] | None = None
        self._segments = set(self.wrapper_segments)
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in root.modules()):
            self._segments.add(FSDP1_SEGMENT)  # FSDP1 units inside a model handed over bare

    def canonical_name(self, raw_name: str) -> str:
        """A module name of `root` without wrapper segments: the same under every engine."""
        return ".".join(part for part in raw_name.split(".") if part not in self._segments)

    @property
    def device(self) -> torch.device:
        for t in list(self.root.parameters()) + list(self.root.buffers()):
            if t.device.type != "meta":
                return t.device
        return torch.device("cpu")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model's forward and backward run in, so the dtype the logged gradients
        are made in (recorded in the manifest): that of its floating parameters; engines with
        mixed precision override it."""
        for p in self.root.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def parameter_count(self) -> int:
        """The model's full parameter count (sharding adapters count the unsharded sizes)."""
        return sum(p.numel() for p in self.root.parameters())

    def model_class(self) -> type:
        """The user's model class (adapters that substitute a generated class name the original)."""
        return type(self.root)

    def model_identity(self) -> dict[str, Any]:
        """Class, Hugging Face name_or_path and parameter count: what an index records of its model."""
        cls, cfg = self.model_class(), getattr(self.root, "config", None)
        return {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "parameters": self.parameter_count(),
        }

    def parameters_to_freeze(self) -> Iterator[torch.nn.Parameter]:
        yield from self.root.parameters()

    def freeze(self) -> None:
        """Weights stop requiring grad: no weight-gradient GEMMs, nothing for the engine to
        reduce. Activation gradients still flow (see capture's anchor)."""
        if self._saved_requires_grad is None:
            params = {id(p): p for p in self.parameters_to_freeze()}
            self._saved_requires_grad = [(p, p.requires_grad) for p in params.values()]
            for p, _ in self._saved_requires_grad:
                p.requires_grad_(False)

    def unfreeze(self) -> None:
        if self._saved_requires_grad is not None:
            for p, flag in self._saved_requires_grad:
                p.requires_grad_(flag)
            self._saved_requires_grad = None

    @property
    def forward_is_collective(self) -> bool:
        """True when every forward/backward gathers weights across ranks (ZeRO-3, FSDP): then all
        ranks must run the same number of batches, a rank out of data running shadow batches
        (`capture` with no ids on any dummy input). Judged from the weights themselves, so a
        sharded model handed over without its wrapper (e.g. `engine.module`) is handled too."""
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in self.root.modules()):
            return True
        return any(hasattr(p, "ds_id") or hasattr(p, "device_mesh") for p in self.root.parameters())

    def lockstep_batches(self, local_batches: int) -> int:
        """How many batches this rank must run: its own count, or the maximum over ranks when the
        forward is collective (one all-reduce, once per job)."""
        if not self.forward_is_collective or not comm.is_distributed():
            return local_batches
        counts = torch.zeros(comm.world_size(), dtype=torch.float64)
        counts[comm.rank()] = local_batches
        return int(comm.all_reduce_sum(counts).max())

    def sync_disabled(self) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        with self.sync_disabled():
            loss.backward()

    @property
    def synced_generation(self) -> bool:
        """Whether `generate` must keep stepping until every rank is done (Hugging Face's
        `synced_gpus`): with collective forwards a rank that stopped early would hang its peers."""
        return self.forward_is_collective and comm.is_distributed()

    @contextmanager
    def generation(self) -> Iterator[nn.Module]:
        """The module whose `.generate(...)` runs with this engine's weights (sharded engines
        gather each layer inside its forward, as for logging). Use under torch.no_grad()."""
        yield self.root


class DDPEngine(Engine):
    """torch DistributedDataParallel: forward through `.module`, so the reducer never runs."""

    kind = "ddp"

    def __init__(self, ddp: nn.Module):
        super().__init__(ddp, ddp.module, ddp.module)

    def sync_disabled(self) -> AbstractContextManager:
        return self.wrapped.no_sync()
