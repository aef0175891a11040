"""Load a local Hugging Face causal LM straight into an engine, sharded where the engine shards.

- zero3: the model is built inside `deepspeed.zero.Init` (each parameter partitioned as soon as
  its module is constructed), then filled one parameter at a time: rank 0 reads that tensor from
  the memory-mapped checkpoint inside `GatheredParameters(modifier_rank=0)`, which re-partitions
  it on exit. At no point does any rank hold more than one full tensor.
- fsdp2: parameters are built on the meta device (buffers real), `fully_shard` is applied, the
  shards are allocated with `to_empty`, and every rank reads only ITS rows of every tensor from
  the checkpoint (safetensors slices). No rank ever holds a full tensor; no communication.
- fsdp1: every rank loads the full model into host memory (memory-mapped reads), then FSDP1
  keeps its shard and frees the rest: accelerator memory only ever holds shards, host memory
  briefly holds the full model per rank. Prefer fsdp2 (or zero3) when that does not fit.
- zero0-2, ddp and none keep full weights on every rank by design, so every rank loads fully.

Every path returns the model in eval mode (no dropout: gradients logged must be reproducible);
`checkpoint_for_logging` then turns on activation checkpointing where asked.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logra_dist.engines.checkpoint import (
    HFCheckpoint,
    WeightSource,
    causal_lm_class,
    construct_uninitialized,
    persistent_buffers,
    weight_sources,
)
from logra_dist.engines.dsconfig import hidden_size_of, resolve_job_autos, resolve_model_autos
from logra_dist.engines.launch import DistInfo, init_distributed, skip_deepspeed_shm_build
from logra_dist.engines.spec import (
    EngineConfigError,
    EngineSpec,
    deepspeed_config_for,
    default_spec,
    parse_dtype,
    read_spec,
    spec_from_dict,
)


@dataclass
class LoadedModel:
    wrapped: Any  # what to pass to logra_dist.attach: module, DDP, FSDP module or DeepSpeed engine
    module: nn.Module  # the Hugging Face model inside (its .config, generation, ...)
    engine: str
    dtype: torch.dtype
    device: torch.device
    dist: DistInfo


def _hf_config(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    config.dtype = dtype
    return config


def wrap_targets(model: nn.Module, wrap: str | list[str]) -> list[nn.Module]:
    """Modules to shard as separate units: the model's `_no_split_modules` (decoder layers) when
    wrap="auto", else the named classes."""
    names = set(getattr(model, "_no_split_modules", None) or []) if wrap == "auto" else set(wrap)
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise EngineConfigError(
            f"wrap={wrap!r}: no module of {type(model).__name__} has a class named "
            f"{sorted(names)}; name the decoder-layer class in the FSDP config"
        )
    return found


def _load_none(path: Path, spec: EngineSpec, info: DistInfo) -> tuple[Any, nn.Module]:
    model = causal_lm_class(_hf_config(path, spec.dtype)).from_pretrained(str(path), dtype=spec.dtype)
    model = model.to(info.device).eval()
    if spec.engine == "none":
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    return ddp, model


def _load_zero3_weights(model: nn.Module, ckpt: HFCheckpoint, rank: int) -> None:
    import deepspeed

    for _, source, param in weight_sources(model, ckpt):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    param.copy_(source.get())
    with torch.no_grad():
        for name, buf in persistent_buffers(model, ckpt):
            buf.copy_(ckpt.get(name))


def _check_deepspeed_dtype(dtype: torch.dtype) -> None:
    """DeepSpeed's CPU accelerator refuses fp16 deep inside `initialize`; say so up front."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if dtype == torch.float16 and not accelerator.is_fp16_supported():
        raise EngineConfigError(
            f"dtype float16 (fp16.enabled or --dtype float16) was asked for, but DeepSpeed's "
            f"{accelerator.device_name()} accelerator does not support fp16; use bfloat16 (bf16.enabled) or float32"
        )


def resolved_ds_config(ds_config: dict[str, Any], dtype: torch.dtype, path: Path) -> dict[str, Any]:
    """The DeepSpeed config DeepSpeed is given: precision switches set for `dtype`, HF-style
    "auto" values resolved from the job and the checkpoint's hidden size (dsconfig.py)."""
    where = "the DeepSpeed config"
    hidden = hidden_size_of(json.loads((path / "config.json").read_text()))
    return resolve_model_autos(resolve_job_autos(deepspeed_config_for(ds_config, dtype), where), where, hidden)


def training_ds_config(
    ds_config: dict[str, Any] | str | Path, micro_batch_size: int, dtype: Any = None, hidden_size: int | None = None
) -> dict[str, Any]:
    """A Trainer-style DeepSpeed config (configs/zero3.json: "auto" values) made concrete for a
    training script of one's own, as the Trainer would fill it: precision from the config or
    `dtype` (contradictions refused), micro batch `micro_batch_size`, accumulation 1, an "auto"
    clipping 0.0, bucket sizes from `hidden_size`. Optimizer and scheduler sections are kept;
    "auto" inside them is refused (the script chooses its learning rate)."""
    where = str(ds_config) if isinstance(ds_config, (str, Path)) else "the DeepSpeed config"
    data = json.loads(Path(ds_config).read_text()) if isinstance(ds_config, (str, Path)) else ds_config
    chosen = spec_from_dict(data, where, dtype).dtype
    ds = resolve_job_autos(deepspeed_config_for(data, chosen), where, micro_batch_size, logging=False)
    return resolve_model_autos(ds, where, hidden_size)


def load_zero3_model(path: str | Path, dtype: torch.dtype, ds_config: dict[str, Any], rank: int) -> nn.Module:
    """The model partitioned by ZeRO-3 from construction on, weights loaded, not yet wrapped: for a
    user who passes it, with their optimizer, to `deepspeed.initialize` themselves. `ds_config`
    may hold HF-style "auto" values (the one file their Trainer uses)."""
    skip_deepspeed_shm_build()
    _check_deepspeed_dtype(dtype)
    config = _hf_config(Path(path), dtype)
    cls = causal_lm_class(config)
    ckpt = HFCheckpoint(path)
    zero3_config = resolved_ds_config(ds_config, dtype, Path(path))
    model = construct_uninitialized(cls, config, dtype, zero3_config=zero3_config)
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}
    if wrong:
        raise RuntimeError(f"zero.Init built {sorted(wrong)} parameters, {dtype} was asked for")
    _load_zero3_weights(model, ckpt, rank)
    ckpt.close()
    return model.eval()


def _load_deepspeed(path: Path, spec: EngineSpec, info: DistInfo) -> tuple[Any, nn.Module]:
    import deepspeed

    skip_deepspeed_shm_build()
    _check_deepspeed_dtype(spec.dtype)
    if spec.engine == "zero3":
        model = load_zero3_model(path, spec.dtype, spec.ds_config, info.rank)
    else:
        model = causal_lm_class(_hf_config(path, spec.dtype)).from_pretrained(str(path), dtype=spec.dtype).eval()
    ds = spec.ds_config  # resolved: no optimizer or scheduler section (dsconfig.py)
    if spec.engine in ("zero1", "zero2"):
        # Stages 1-2 partition only optimizer state and gradients, and DeepSpeed refuses them
        # without an optimizer; a logging job has neither, so it runs exactly as stage 0.
        ds = {**ds, "zero_optimization": {**ds["zero_optimization"], "stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    return engine, model


def _mixed_precision(options: dict[str, Any]) -> dict[str, torch.dtype] | None:
    mp = options.get("mixed_precision")
    return None if mp is None else {k: parse_dtype(v) for k, v in mp.items()}


def _snapshot_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if b.device.type != "meta"}


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor], device: torch.device) -> None:
    modules = dict(model.named_modules())
    for name, value in saved.items():
        owner, _, leaf = name.rpartition(".")
        modules[owner]._buffers[leaf] = value.to(device)


def _load_local_shards(model: nn.Module, ckpt: HFCheckpoint, sources: list[tuple[str, WeightSource]]) -> None:
    """Copy into each DTensor's local shard exactly its block of the stored tensor. `sources` are
    planned before `fully_shard`: it renames the class (FSDP<Name>), and transformers finds a
    model's checkpoint renamings (GPT-NeoX `embed_out`) by class name."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    with torch.no_grad():
        for name, source in sources:
            param = model.get_parameter(name)
            if isinstance(param, DTensor):
                local = param.to_local()
                shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                if local.numel():
                    block = tuple(slice(o, o + s) for o, s in zip(offset, shape))
                    local.copy_(source.get_slice(block))
            else:
                param.copy_(source.get())
        for name, buf in persistent_buffers(model, ckpt):
            buf.copy_(ckpt.get(name))


def _load_fsdp2(path: Path, spec: EngineSpec, info: DistInfo) -> tuple[Any, nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    config = _hf_config(path, spec.dtype)
    model = construct_uninitialized(causal_lm_class(config), config, spec.dtype)
    ckpt = HFCheckpoint(path)
    sources = [(name, source) for name, source, _ in weight_sources(model, ckpt)]
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = _mixed_precision(spec.options)
    kwargs = {"mesh": mesh, "reshard_after_forward": spec.options["reshard_after_forward"]}
    if mp is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(**mp)
    for unit in wrap_targets(model, spec.options["wrap"]):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)
    buffers = _snapshot_buffers(model)
    model.to_empty(device=info.device)
    _restore_buffers(model, buffers, info.device)
    _load_local_shards(model, ckpt, sources)
    ckpt.close()
    return model.eval(), model


def _load_fsdp1(path: Path, spec: EngineSpec, info: DistInfo) -> tuple[Any, nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    # Every rank reads the full (memory-mapped) checkpoint into host memory, then FSDP keeps
    # only its shard. FSDP1's alternative (rank 0 loads, sync_module_states broadcasts) refuses
    # CPU tensors, so it could not run on the gloo test machines; FSDP2 avoids both.
    model = causal_lm_class(_hf_config(path, spec.dtype)).from_pretrained(str(path), dtype=spec.dtype)
    mp = _mixed_precision(spec.options)
    units = {type(m) for m in wrap_targets(model, spec.options["wrap"])}
    fsdp = FSDP(
        model,
        auto_wrap_policy=ModuleWrapPolicy(units),
        device_id=info.device,
        sharding_strategy=ShardingStrategy[spec.options["sharding_strategy"]],
        use_orig_params=spec.options["use_orig_params"],
        mixed_precision=MixedPrecision(**mp) if mp is not None else None,
    )
    return fsdp.eval(), model


_LOADERS = {
    "none": _load_none,
    "ddp": _load_none,
    "fsdp1": _load_fsdp1,
    "fsdp2": _load_fsdp2,
    "zero0": _load_deepspeed,
    "zero1": _load_deepspeed,
    "zero2": _load_deepspeed,
    "zero3": _load_deepspeed,
}


def load_causal_lm(
    path: str | Path,
    engine: str = "none",
    dtype: Any = None,
    ds_config: dict[str, Any] | None = None,
    spec: EngineSpec | None = None,
) -> LoadedModel:
    """Load the checkpoint folder `path` into `engine` ("none", "ddp", "fsdp1", "fsdp2", "zero0".."zero3").
    `ds_config` (a DeepSpeed config dict) or a full `spec` (see spec.py) override the defaults;
    HF-style "auto" values in a DeepSpeed config are resolved (dsconfig.py). Initializes the
    process group from the launcher's environment if that is not done yet."""
    if spec is None:
        if ds_config is not None:
            spec = spec_from_dict(ds_config, "ds_config", dtype)
            if engine not in ("none", spec.engine):
                raise EngineConfigError(f"engine={engine!r} but ds_config selects {spec.engine!r}")
        else:
            spec = default_spec(engine, dtype)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EngineConfigError(f"{path}: not a local Hugging Face checkpoint folder (no config.json)")
    info = init_distributed(require_group=spec.engine.startswith("zero") or spec.engine.startswith("fsdp"))
    if spec.engine == "ddp" and info.backend is None:
        raise EngineConfigError("engine 'ddp' needs a launcher (torchrun, deepspeed or mpiexec); use 'none'")
    if spec.ds_config is not None:
        spec = dataclasses.replace(spec, ds_config=resolved_ds_config(spec.ds_config, spec.dtype, path))
    wrapped, module = _LOADERS[spec.engine](path, spec, info)
    return LoadedModel(wrapped, module, spec.engine, spec.dtype, info.device, info)


def build(
    engine: str | None,
    model_path: str | Path,
    config_path: str | Path | None = None,
    dtype: Any = None,
) -> tuple[Any, torch.device]:
    """For the CLI: (object to pass to attach, device for the batches). The engine comes from
    `config_path` (a DeepSpeed or our JSON config) or, without one, from `engine`; an explicit
    `engine` must agree with the config. `dtype` (None: the config's) must agree with the
    config's precision where it states one (spec.py)."""
    if config_path is not None:
        spec = read_spec(config_path, dtype)
        agrees = engine in (None, spec.engine) or (engine == "deepspeed" and spec.engine.startswith("zero"))
        if not agrees:
            raise EngineConfigError(f"{config_path}: configures engine {spec.engine!r} but {engine!r} was asked for")
    else:
        spec = default_spec(engine or "none", dtype)
    loaded = load_causal_lm(model_path, spec=spec)
    return loaded.wrapped, loaded.device


def enable_checkpointing(module: nn.Module, reentrant: bool = False) -> None:
    """Switch on a Hugging Face model's activation checkpointing (torch's checkpoint, reentrant or
    not), under either name: transformers 5 renamed gradient_checkpointing_enable to
    activation_checkpointing_enable. Modes are left as they are."""
    if not getattr(module, "supports_gradient_checkpointing", False):
        raise EngineConfigError(
            f"--activation-checkpointing: {type(module).__name__} does not support activation checkpointing"
        )
    kwargs = {"use_reentrant": reentrant}
    if hasattr(module, "activation_checkpointing_enable"):
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_for_logging(module: nn.Module) -> None:
    """Turn on a Hugging Face model's activation checkpointing (non-reentrant) for a logging
    pass. It runs only where a decoder layer is in train mode, so only those layers train; the
    model stays in eval mode, and the layers' own rates and their nn.Dropout children's p are set
    to 0 (a layer in train mode applies them), so the rows are the eval-mode model's."""
    from logra_dist.core.capture import checkpointing_modules, rate_attributes

    enable_checkpointing(module)
    module.eval()
    for layer in checkpointing_modules(module)[1]:
        layer.training = True  # this module only: its children keep their eval mode
        for name in rate_attributes(layer):
            setattr(layer, name, 0.0)
        for child in layer.children():
            if isinstance(child, nn.modules.dropout._DropoutNd):
                child.p = 0.0
