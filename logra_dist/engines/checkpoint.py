"""Tensor-at-a-time reading of a local Hugging Face checkpoint, and building a model without
allocating its weights.

Sharded loaders (ZeRO-3, FSDP) must never hold the whole state dict: they ask for one tensor (or
one slice of it) at a time. safetensors files are memory-mapped, so a slice costs only its bytes.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class WeightSource:
    """Where one model parameter's value comes from: one stored tensor (possibly under another
    name: GPT-NeoX stores `embed_out.weight` for the model's `lm_head.weight`), or several stored
    tensors that transformers' own converter fuses (MoE experts stored one by one, held by the
    model as one `experts.gate_up_proj`). Built from transformers' conversion mapping, the one
    `from_pretrained` applies, so a checkpoint loads sharded exactly as it loads whole."""

    ckpt: HFCheckpoint
    target: str  # the parameter's name in the model
    keys: tuple[str, ...]  # the stored tensors it is made of
    patterns: tuple[str, ...] = ()  # the converter's source pattern each key matched
    converter: Any = None  # a transformers WeightConverter, or None for a plain (renamed) tensor
    model: Any = None

    def get(self) -> torch.Tensor:
        if self.converter is None:
            return self.ckpt.get(self.keys[0])
        conv = copy.deepcopy(self.converter)
        for key, pattern in zip(self.keys, self.patterns):
            conv.add_tensor(self.target, key, pattern, lambda key=key: self.ckpt.get(key))
        out = conv.convert(self.target, model=self.model, config=getattr(self.model, "config", None))
        if self.target not in out:
            got = sorted(out)
            raise CheckpointError(f"{self.ckpt.path}: converting {list(self.keys)[:3]} gave {got}, not {self.target}")
        return out[self.target]

    def get_slice(self, slices: tuple[slice, ...]) -> torch.Tensor:
        """Only a block: a plain tensor reads just those bytes; a fused one is built whole (one
        parameter at a time) and cut."""
        if self.converter is None:
            return self.ckpt.get_slice(self.keys[0], slices)
        return self.get()[slices].clone()


def _conversions(model: nn.Module):
    """(renamings, converters) transformers applies to this model's checkpoint keys on load;
    ([], []) where transformers has no conversion mapping (4.x: stored names are module names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    mapping = get_model_conversion_mapping(model)
    return (
        [m for m in mapping if isinstance(m, WeightRenaming)],
        [m for m in mapping if isinstance(m, WeightConverter)],
    )


Plan = dict[str, tuple[list[str], list[str], Any]]


def _stored_to_target(model: nn.Module, ckpt: HFCheckpoint, names: set[str]) -> Plan:
    """target parameter name -> (stored keys, their converter patterns, converter or None), as
    `from_pretrained` maps them (renamings first, then at most one converter per key)."""
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return {k: ([k], [k], None) for k in ckpt.keys() if k in names}
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    by_pattern = {p: c for c in converters for p in c.source_patterns}
    known = dict.fromkeys(names, True)
    prefix = getattr(model, "base_model_prefix", None)
    out: Plan = {}
    for key in sorted(ckpt.keys(), key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if target not in names and key in names:
            target, pattern = key, None
        if target in names:
            keys, patterns, _ = out.setdefault(target, ([], [], by_pattern.get(pattern) if pattern else None))
            keys.append(key)
            patterns.append(pattern or key)
    return out


def weight_sources(model: nn.Module, ckpt: HFCheckpoint) -> list[tuple[str, WeightSource, nn.Parameter]]:
    """(model name, source, parameter) for each distinct parameter. A tied parameter (lm_head
    tied to the embedding) is listed once, under whichever of its names the checkpoint holds."""
    by_id: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), ([], p))[0].append(name)
    plan = _stored_to_target(model, ckpt, {n for names, _ in by_id.values() for n in names})
    out, missing = [], []
    for names, p in by_id.values():
        stored = [n for n in names if n in plan]
        if stored:
            keys, patterns, converter = plan[stored[0]]
            out.append((names[0], WeightSource(ckpt, stored[0], tuple(keys), tuple(patterns), converter, model), p))
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
