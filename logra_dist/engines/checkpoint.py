"""Tensor-at-a-time reading of a local Hugging Face checkpoint, and building a model without
allocating its weights.

Sharded loaders (ZeRO-3, FSDP) must never hold the whole state dict: they ask for one tensor (or
one slice of it) at a time. safetensors files are memory-mapped, so a slice costs only its bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A local checkpoint that cannot be loaded; the message names the folder and the problem."""


class HFCheckpoint:
    """The weight files of a local checkpoint folder: name -> file, read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: not a Hugging Face checkpoint folder (no config.json)")
        self.file_of: dict[str, Path] = {}
        self.format = "safetensors"
        if (self.path / SAFE_INDEX).is_file():
            self._read_index(SAFE_INDEX)
        elif (self.path / SAFE_SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.path / SAFE_SINGLE), framework="pt") as f:
                self.file_of = {k: self.path / SAFE_SINGLE for k in f.keys()}
        elif (self.path / BIN_INDEX).is_file() or (self.path / BIN_SINGLE).is_file():
            self.format = "bin"
            if (self.path / BIN_INDEX).is_file():
                self._read_index(BIN_INDEX)
            else:
                self.file_of = {k: self.path / BIN_SINGLE for k in self._bin(self.path / BIN_SINGLE)}
        else:
            raise CheckpointError(f"{self.path}: no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
        self._open: dict[Path, object] = {}

    def _read_index(self, name: str) -> None:
        index = json.loads((self.path / name).read_text())
        self.file_of = {k: self.path / v for k, v in index["weight_map"].items()}

    @staticmethod
    def _bin(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def _handle(self, path: Path):
        if path not in self._open:
            if self.format == "safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt")
            else:
                self._open[path] = self._bin(path)
        return self._open[path]

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        """One full tensor (mmap-backed where the format allows)."""
        handle = self._handle(self._file(name))
        return handle.get_tensor(name) if self.format == "safetensors" else handle[name]

    def get_slice(self, name: str, slices: tuple[slice, ...]) -> torch.Tensor:
        """Only the requested block of a tensor (safetensors reads just those bytes)."""
        handle = self._handle(self._file(name))
        if self.format == "safetensors":
            return handle.get_slice(name)[slices]
        return handle[name][slices].clone()

    def _file(self, name: str) -> Path:
        if name not in self.file_of:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        return self.file_of[name]

    def close(self) -> None:
        self._open.clear()


def source_names(model: nn.Module, ckpt: HFCheckpoint) -> list[tuple[str, str, nn.Parameter]]:
    """(model name, checkpoint name, parameter) for each distinct parameter. A tied parameter
    (lm_head tied to the embedding) is listed once, under whichever of its names is stored."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), ([], p))[0].append(name)
    out, missing = [], []
    for names, p in by_id.values():
        stored = [n for n in names if n in ckpt]
        if stored:
            out.append((names[0], stored[0], p))
        else:
            missing.append(names[0])
    if missing:
        raise CheckpointError(
            f"{ckpt.path}: {len(missing)} parameter(s) of {type(model).__name__} are not in "
            f"the checkpoint, e.g. {missing[:5]} (stored names look like {ckpt.keys()[:3]})"
        )
    return out


def persistent_buffers(model: nn.Module, ckpt: HFCheckpoint) -> list[tuple[str, torch.Tensor]]:
    """Buffers saved in the checkpoint (non-persistent ones, like rotary frequencies, are
    recomputed by the constructor and never stored)."""
    return [(n, b) for n, b in model.named_buffers() if n in ckpt]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Construct modules with parameters on the meta device but real buffers: a model of any size
    costs no weight memory, and non-persistent buffers (rotary `inv_freq`) keep their values,
    which `torch.device("meta")` would lose."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = getattr(param, "__dict__", {})
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(kwargs)
            module._parameters[name] = meta

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def causal_lm_class(config):
    """The AutoModelForCausalLM class for a config, imported NOW: transformers imports model code
    lazily, and an import inside `deepspeed.zero.Init` (which patches tensor constructors) fails."""
    import torch._dynamo  # noqa: F401  (imported by transformers' masking utilities; same reason)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as e:
        raise CheckpointError(
            f"{type(config).__name__} ({getattr(config, 'model_type', '?')}) has no causal-LM class in transformers"
        ) from e


def _no_init_weights():
    """transformers' switch that skips random weight initialization (we overwrite every weight;
    and its in-place init ops fail on ZeRO-3's empty partitioned parameters)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _keep_arange_dtype():
    """Under zero.Init(dtype=bf16), float constructors are cast to bf16, RoPE's `arange`-based
    frequencies included; transformers ships the guard for it (enter before zero.Init)."""
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:
        return nullcontext()
    return prevent_arange_dtype_change()


def construct_uninitialized(cls, config, dtype: torch.dtype, zero3_config: dict | None = None) -> nn.Module:
    """Build `cls(config)` without initializing weights: partitioned by ZeRO-3 as it is built when
    `zero3_config` is given, else with parameters on the meta device."""
    with ExitStack() as stack:
        stack.enter_context(_no_init_weights())
        if zero3_config is not None:
            import deepspeed

            stack.enter_context(_keep_arange_dtype())
            # dtype comes from the config's bf16/fp16 switches (the caller makes them agree with
            # `dtype`): DeepSpeed 0.19 ignores an explicit dtype= on accelerators without fp16
            # (CPU) and silently builds bf16 partitions.
            stack.enter_context(deepspeed.zero.Init(config_dict_or_path=zero3_config))
        else:
            stack.enter_context(parameters_on_meta())
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the initialization (transformers ties inside init_weights)
    return model
