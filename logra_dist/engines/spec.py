"""Engine configuration files: which engine, which dtype, and its options.

Two formats live under configs/ (see docs/engines.md):
- a DeepSpeed config (any file with a `zero_optimization` or batch-size key), passed through to
  `deepspeed.initialize` unchanged except for the dtype switch; the ZeRO stage picks the engine;
- our own small JSON for the other engines: {"engine": "fsdp2" | "fsdp1" | "ddp" | "none", ...}.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ENGINES = ("none", "ddp", "fsdp1", "fsdp2", "zero0", "zero1", "zero2", "zero3")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_DS_KEYS = ("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size")
_OPTIONS = {  # our format: allowed keys per engine and their defaults
    "none": {},
    "ddp": {},
    "fsdp2": {"wrap": "auto", "reshard_after_forward": True, "mixed_precision": None},
    "fsdp1": {"wrap": "auto", "sharding_strategy": "FULL_SHARD", "use_orig_params": True, "mixed_precision": None},
}
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


class EngineConfigError(ValueError):
    """An engine config that cannot be used; the message names the file and the key."""


@dataclass
class EngineSpec:
    engine: str
    dtype: torch.dtype
    ds_config: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_dtype(value: Any, where: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise EngineConfigError(f"{where}: {value!r} is not one of {sorted(DTYPES)}")


def _ds_dtype(ds: dict[str, Any]) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


def deepspeed_config_for(ds: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A copy of a DeepSpeed config whose precision section agrees with `dtype`, with the batch
    size keys DeepSpeed insists on (they do not matter for logging: we never call its step)."""
    ds = copy.deepcopy(ds)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == torch.float16}
    if "train_batch_size" not in ds and "train_micro_batch_size_per_gpu" not in ds:
        ds["train_micro_batch_size_per_gpu"] = 1
    return ds


def _check_fsdp_options(engine: str, opts: dict[str, Any], where: str) -> None:
    wrap = opts.get("wrap")
    if not (wrap == "auto" or (isinstance(wrap, list) and all(isinstance(w, str) for w in wrap))):
        raise EngineConfigError(
            f'{where}: wrap must be "auto" (the model\'s _no_split_modules) or a list of '
            f"module class names, got {wrap!r}"
        )
    mp = opts.get("mixed_precision")
    if mp is not None:
        if not isinstance(mp, dict) or set(mp) - {"param_dtype", "reduce_dtype"}:
            raise EngineConfigError(
                f'{where}: mixed_precision must be null or {{"param_dtype": ..., "reduce_dtype": ...}}, got {mp!r}'
            )
        for k, v in mp.items():
            parse_dtype(v, f"{where}: mixed_precision.{k}")
    if engine == "fsdp1" and opts["sharding_strategy"] not in SHARDING_STRATEGIES:
        raise EngineConfigError(
            f"{where}: sharding_strategy={opts['sharding_strategy']!r} is not one of {list(SHARDING_STRATEGIES)}"
        )
    for key in ("reshard_after_forward", "use_orig_params"):
        if key in opts and not isinstance(opts[key], bool):
            raise EngineConfigError(f"{where}: {key} must be true or false, got {opts[key]!r}")


def spec_from_dict(data: dict[str, Any], where: str = "<engine config>", dtype: Any = None) -> EngineSpec:
    """Validate a parsed config. An explicit `dtype` overrides the file's precision."""
    if not isinstance(data, dict):
        raise EngineConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if "engine" not in data:
        if not any(k in data for k in _DS_KEYS):
            raise EngineConfigError(
                f"{where}: neither a DeepSpeed config (no {'/'.join(_DS_KEYS)}) nor ours "
                f'(no "engine" key; one of {list(_OPTIONS)})'
            )
        stage = data.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise EngineConfigError(f"{where}: zero_optimization.stage={stage!r} is not 0, 1, 2 or 3")
        chosen = parse_dtype(dtype, f"{where}: dtype") if dtype is not None else _ds_dtype(data)
        return EngineSpec(f"zero{stage}", chosen, deepspeed_config_for(data, chosen))
    engine = data["engine"]
    if engine not in _OPTIONS:
        raise EngineConfigError(
            f"{where}: engine={engine!r} is not one of {list(_OPTIONS)} (DeepSpeed engines "
            "are configured by a DeepSpeed config file)"
        )
    allowed = set(_OPTIONS[engine]) | {"engine", "dtype"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise EngineConfigError(f"{where}: unknown key(s) {unknown} for engine {engine!r}; allowed: {sorted(allowed)}")
    options = {**_OPTIONS[engine], **{k: v for k, v in data.items() if k not in ("engine", "dtype")}}
    if engine.startswith("fsdp"):
        _check_fsdp_options(engine, options, where)
    chosen = parse_dtype(dtype if dtype is not None else data.get("dtype", "float32"), f"{where}: dtype")
    return EngineSpec(engine, chosen, None, options)


def read_spec(path: str | Path, dtype: Any = None) -> EngineSpec:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise EngineConfigError(f"{path}: cannot read the engine config: {e}") from e
    except json.JSONDecodeError as e:
        raise EngineConfigError(f"{path}: not valid JSON: {e}") from e
    return spec_from_dict(data, str(path), dtype)


def default_spec(engine: str, dtype: Any = None) -> EngineSpec:
    """The spec of an engine named without a config file (DeepSpeed stages get a minimal config)."""
    if engine not in ENGINES:
        raise EngineConfigError(f"engine {engine!r} is not one of {list(ENGINES)}")
    if engine.startswith("zero"):
        ds = {"zero_optimization": {"stage": int(engine[-1])}, "gradient_clipping": 0.0}
        return spec_from_dict(ds, f"default {engine} config", dtype if dtype is not None else "float32")
    return spec_from_dict({"engine": engine}, f"default {engine} config", dtype)
