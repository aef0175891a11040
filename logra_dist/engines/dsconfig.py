"""Hugging Face style `"auto"` values in a DeepSpeed config, resolved for a logging job.

One DeepSpeed file should serve a user's `transformers.Trainer` run and `logra-dist log`. The
Trainer fills `"auto"` from its `TrainingArguments` and the model (transformers'
`HfTrainerDeepSpeedConfig.trainer_config_process` / `trainer_config_finalize`); DeepSpeed itself
refuses `"auto"`. This module fills the same keys the same way from what a logging job knows:

- precision (`bf16.enabled`, `fp16.enabled`): from the job's dtype (spec.py decides it, and
  refuses a dtype that disagrees with an explicit true/false);
- batch keys: `train_micro_batch_size_per_gpu` and `gradient_accumulation_steps` = 1, an "auto"
  `train_batch_size` left to DeepSpeed to derive: a logging job never calls the engine's step or
  its data loader, so these values cannot change a row;
- `gradient_clipping`: 0.0 (a logging job never steps; DeepSpeed's default would be 1.0);
- `zero_optimization.reduce_bucket_size` = hidden^2, `stage3_prefetch_bucket_size` =
  0.9 hidden^2, `stage3_param_persistence_threshold` = 10 hidden (transformers' formulas; hidden
  = the checkpoint's `hidden_size`, or the largest of `hidden_sizes`);
- `optimizer` and `scheduler` sections are dropped whole: logging freezes the weights and never
  steps, so they cannot change a row, and building them would compile DeepSpeed's fused Adam.

Any other `"auto"` is refused with its key path: only the Trainer knows what it means.
"""

from __future__ import annotations

import copy
from typing import Any

AUTO = "auto"
HIDDEN_KEYS = {  # zero_optimization key -> its value as a function of the hidden size
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}
NEVER_USED = ("optimizer", "scheduler")


class AutoValueError(ValueError):
    """An `"auto"` a logging job cannot resolve; the message names the key and the fix."""


def auto_keys(node: Any, path: str = "") -> list[str]:
    """Dotted paths of every `"auto"` value in a config."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in auto_keys(v, f"{path}.{key}" if path else key)]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in auto_keys(v, f"{path}[{i}]")]
    return [path] if node == AUTO else []


def hidden_size_of(model_config: Any) -> int | None:
    """The hidden size transformers uses for the bucket keys (a config object or its dict)."""
    get = model_config.get if isinstance(model_config, dict) else lambda k: getattr(model_config, k, None)
    for source in (get, _text_config(get)):
        if source is None:
            continue
        if isinstance(source("hidden_size"), int):
            return source("hidden_size")
        if source("hidden_sizes"):
            return max(source("hidden_sizes"))
    return None


def _text_config(get):
    text = get("text_config")
    if text is None:
        return None
    return text.get if isinstance(text, dict) else lambda k: getattr(text, k, None)


def resolve_job_autos(
    ds: dict[str, Any], where: str, micro_batch_size: int = 1, logging: bool = True
) -> dict[str, Any]:
    """A copy of `ds` with the "auto" values that do not depend on the model filled (see the
    module doc); for a logging job (`logging`) the optimizer and scheduler sections dropped."""
    ds = {k: copy.deepcopy(v) for k, v in ds.items() if not (logging and k in NEVER_USED)}
    for key, value in (("train_micro_batch_size_per_gpu", micro_batch_size), ("gradient_accumulation_steps", 1)):
        if ds.get(key) == AUTO:
            ds[key] = value
    if ds.get("train_batch_size") == AUTO:
        del ds["train_batch_size"]  # DeepSpeed derives it: micro batch x accumulation x world size
    if ds.get("gradient_clipping") == AUTO:
        ds["gradient_clipping"] = 0.0
    return ds


def resolve_model_autos(ds: dict[str, Any], where: str, hidden_size: int | None) -> dict[str, Any]:
    """A copy of `ds` with the zero_optimization bucket sizes filled from the model's hidden size;
    any "auto" left after that is refused, naming its key."""
    ds = copy.deepcopy(ds)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        need = [k for k in HIDDEN_KEYS if zero.get(k) == AUTO]
        if need and hidden_size is None:
            raise AutoValueError(
                f'{where}: zero_optimization.{need[0]} is "auto", which is computed from the model\'s '
                "hidden_size, but the checkpoint's config has none; set an integer"
            )
        for key in need:
            zero[key] = HIDDEN_KEYS[key](hidden_size)
    left = auto_keys(ds)
    if left:
        raise AutoValueError(
            f'{where}: {left[0]} is "auto", which only the Hugging Face Trainer resolves (a logging job '
            "fills batch sizes, precision, gradient_clipping and the zero_optimization bucket sizes); set a value"
        )
    return ds
