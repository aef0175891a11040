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

from logra_dist.engines.dsconfig import resolve_job_autos

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
    dtype: torch.dtype  # the weights' dtype as loaded
    ds_config: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the forward and backward run in (what the logged gradients are made in):
        FSDP mixed precision computes in its param_dtype, every other engine in `dtype`."""
        mp = self.options.get("mixed_precision")
        return parse_dtype(mp["param_dtype"]) if mp and "param_dtype" in mp else self.dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: Any, where: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value in DTYPES:
        return DTYPES[value]
    raise EngineConfigError(f"{where}: {value!r} is not one of {sorted(DTYPES)}")


def _ds_dtype(ds: dict[str, Any], where: str) -> torch.dtype | None:
    """The precision a DeepSpeed config states: bf16 or fp16 when enabled, float32 when a section
    says `"enabled": false` and none is enabled; None when it leaves it open (`"auto"` or no
    bf16/fp16 section), for the job's dtype to decide."""
    stated = {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        section = ds.get(key, {})
        enabled = section.get("enabled", "auto") if isinstance(section, dict) else section
        if enabled not in (True, False, "auto"):
            raise EngineConfigError(f'{where}: {key}.enabled must be true, false or "auto", got {enabled!r}')
        stated[key] = (enabled, dtype)
    on = [k for k, (e, _) in stated.items() if e is True]
    if len(on) == 2:
        raise EngineConfigError(f"{where}: both bf16.enabled and fp16.enabled are true; enable one")
    if on:
        return stated[on[0]][1]
    return torch.float32 if any(e is False for e, _ in stated.values()) else None


def _agreed_dtype(stated: torch.dtype | None, asked: Any, where: str, what: str, fix: str) -> torch.dtype:
    """The job's dtype: the one asked for (--dtype) or the config's; both given and different is
    refused (never silently changed), naming both and the fix."""
    asked = parse_dtype(asked, f"{where}: dtype") if asked is not None else None
    if asked is not None and stated is not None and asked != stated:
        raise EngineConfigError(
            f"{where}: dtype {dtype_name(asked)} was asked for (--dtype) but {what} {dtype_name(stated)}; "
            f"drop --dtype to use the config's, or {fix}"
        )
    return asked or stated or torch.float32


def deepspeed_config_for(ds: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A copy of a DeepSpeed config whose precision section agrees with `dtype`, with the batch
    size keys DeepSpeed insists on (they do not matter for logging: we never call its step)."""
    ds = copy.deepcopy(ds)
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        stated = _ds_dtype({key: ds.get(key, {})}, "deepspeed config")
        if stated is not None and (stated != torch.float32) != on:
            raise EngineConfigError(
                f"the DeepSpeed config sets {key}.enabled={str(not on).lower()} but dtype is {dtype_name(dtype)}"
            )
        ds[key] = {**(ds[key] if isinstance(ds.get(key), dict) else {}), "enabled": on}
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
        stated = _ds_dtype(data, where)
        what = "the config disables bf16 and fp16:" if stated == torch.float32 else "the config enables"
        fix = 'set bf16.enabled and fp16.enabled to "auto" so --dtype decides'
        chosen = _agreed_dtype(stated, dtype, where, what, fix)
        return EngineSpec(f"zero{stage}", chosen, resolve_job_autos(deepspeed_config_for(data, chosen), where))
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
    stated = data.get("dtype", "auto")
    stated = None if stated == "auto" else parse_dtype(stated, f"{where}: dtype")
    chosen = _agreed_dtype(stated, dtype, where, "its dtype is", 'set "dtype": "auto" so --dtype decides')
    spec = EngineSpec(engine, chosen, None, options)
    mp = options.get("mixed_precision")
    if dtype is not None and mp and "param_dtype" in mp and spec.compute_dtype != parse_dtype(dtype):
        asked = dtype_name(parse_dtype(dtype))
        raise EngineConfigError(
            f"{where}: dtype {asked} was asked for (--dtype) but mixed_precision computes in "
            f"{mp['param_dtype']}; drop --dtype, or set mixed_precision.param_dtype to {asked}"
        )
    return spec


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
