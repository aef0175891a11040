"""Precision and DeepSpeed configs (issue 12, section 2), without processes: the engine's precision
decides the job's dtype, a contradicting --dtype is refused naming both sides, HF-style "auto"
values resolve as transformers' Trainer resolves them, and the shipped configs pass the Trainer's
own checks (transformers' HfTrainerDeepSpeedConfig, the code path that rejected them before)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logra_dist.engines.dsconfig import AutoValueError, auto_keys, hidden_size_of, resolve_model_autos
from logra_dist.engines.loading import resolved_ds_config
from logra_dist.engines.spec import EngineConfigError, read_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[2]
DS = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def _ds(**sections):
    return {**DS, **sections}


@pytest.mark.parametrize(
    "sections,asked,expected",
    [
        ({"bf16": {"enabled": True}}, None, torch.bfloat16),  # the engine's precision is honored
        ({"fp16": {"enabled": True}}, None, torch.float16),
        ({"bf16": {"enabled": True}}, "bfloat16", torch.bfloat16),
        ({"bf16": {"enabled": "auto"}}, "bfloat16", torch.bfloat16),
        ({"bf16": {"enabled": "auto"}}, "float16", torch.float16),
        ({"bf16": {"enabled": "auto"}}, None, torch.float32),
        ({}, "bfloat16", torch.bfloat16),  # no precision section: nothing stated, --dtype decides
        ({"bf16": {"enabled": False}}, None, torch.float32),
        ({"bf16": {"enabled": False}}, "float32", torch.float32),
    ],
)
def test_deepspeed_precision_comes_from_the_config_or_agrees_with_it(sections, asked, expected):
    spec = spec_from_dict(_ds(**sections), "ds.json", asked)
    assert spec.dtype == expected == spec.compute_dtype
    assert spec.ds_config["bf16"]["enabled"] is (expected == torch.bfloat16)
    assert spec.ds_config["fp16"]["enabled"] is (expected == torch.float16)


@pytest.mark.parametrize(
    "sections,asked,needles",
    [
        ({"bf16": {"enabled": True}}, "float32", ["dtype float32 was asked for", "enables bfloat16", "drop --dtype"]),
        ({"fp16": {"enabled": True}}, "bfloat16", ["dtype bfloat16", "enables float16"]),
        ({"bf16": {"enabled": False}}, "bfloat16", ["dtype bfloat16", "disables bf16 and fp16: float32", '"auto"']),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, None, ["both bf16.enabled and fp16.enabled"]),
        ({"bf16": {"enabled": "yes"}}, None, ['bf16.enabled must be true, false or "auto"']),
    ],
)
def test_contradicting_precision_is_refused_naming_both_sides(sections, asked, needles):
    with pytest.raises(EngineConfigError) as err:
        spec_from_dict(_ds(**sections), "ds.json", asked)
    assert all(n in str(err.value) for n in ["ds.json", *needles]), str(err.value)


def test_fsdp_dtype_and_mixed_precision_must_agree_with_the_asked_dtype():
    assert spec_from_dict({"engine": "fsdp2", "dtype": "auto"}, "f.json", "float16").dtype == torch.float16
    assert spec_from_dict({"engine": "fsdp2"}, "f.json").dtype == torch.float32
    with pytest.raises(EngineConfigError, match=r"f.json: dtype bfloat16 was asked for .* its dtype is float32"):
        spec_from_dict({"engine": "fsdp2", "dtype": "float32"}, "f.json", "bfloat16")
    mixed = {"engine": "fsdp2", "mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}
    spec = spec_from_dict(mixed, "f.json")  # fp32 weights, bf16 compute: what is recorded is bf16
    assert spec.dtype == torch.float32 and spec.compute_dtype == torch.bfloat16
    with pytest.raises(EngineConfigError, match=r"float32 was asked for .* mixed_precision computes in bfloat16"):
        spec_from_dict(mixed, "f.json", "float32")
    assert spec_from_dict({**mixed, "dtype": "auto"}, "f.json", "bfloat16").compute_dtype == torch.bfloat16


def test_fp16_on_deepspeed_cpu_is_refused_before_deepspeed_fails_deep_inside():
    from deepspeed.accelerator import get_accelerator

    from logra_dist.engines.loading import _check_deepspeed_dtype

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's DeepSpeed accelerator supports fp16")  # not the CPU CI machines
    with pytest.raises(EngineConfigError, match=r"float16 .* does not support fp16; use bfloat16"):
        _check_deepspeed_dtype(torch.float16)
    _check_deepspeed_dtype(torch.bfloat16)


HF_AUTO = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    },
}


def test_hf_auto_values_resolve_like_the_trainer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 48}))
    spec = spec_from_dict(HF_AUTO, "hf.json", "bfloat16")
    ds = resolved_ds_config(spec.ds_config, spec.dtype, tmp_path)
    assert auto_keys(ds) == []
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 1
    assert "train_batch_size" not in ds  # DeepSpeed derives it for the world size
    assert ds["gradient_clipping"] == 0.0
    assert "optimizer" not in ds and "scheduler" not in ds  # logging never steps
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 48 * 48 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 48 * 48)
    assert zero["stage3_param_persistence_threshold"] == 480
    assert HF_AUTO["optimizer"]["params"]["lr"] == "auto"  # the caller's dict untouched


def test_unresolvable_auto_is_refused_naming_the_key():
    with pytest.raises(AutoValueError, match=r"x.json: zero_optimization.sub_group_size is \"auto\""):
        resolve_model_autos({"zero_optimization": {"sub_group_size": "auto"}}, "x.json", 32)
    with pytest.raises(AutoValueError, match=r"reduce_bucket_size is \"auto\".*has none; set an integer"):
        resolve_model_autos({"zero_optimization": {"reduce_bucket_size": "auto"}}, "x.json", None)
    assert hidden_size_of({"hidden_sizes": [8, 32, 16]}) == 32
    assert hidden_size_of({"text_config": {"hidden_size": 24}}) == 24


@pytest.mark.parametrize("name", ["zero3.json", "zero2.json"])
def test_shipped_deepspeed_configs_pass_the_hf_trainer_checks(name):
    """transformers' own resolution (what `TrainingArguments(deepspeed=...)` and the Trainer run):
    with the old configs/zero3.json it raised "DeepSpeed config values that mismatch
    TrainingArguments" (train_micro_batch_size_per_gpu 1 vs 3, gradient_clipping 0.0 vs 1.0)."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=3, bf16=True, use_cpu=True)
    hf = HfTrainerDeepSpeedConfig(json.loads((REPO / "configs" / name).read_text()))
    hf.trainer_config_process(args)
    tiny = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    )
    hf.trainer_config_finalize(args, tiny, num_training_steps=2)
    assert hf.config["train_micro_batch_size_per_gpu"] == 3 and hf.config["bf16"]["enabled"] is True
    # and the same file serves a logging job
    spec = read_spec(REPO / "configs" / name)
    assert spec.dtype == torch.float32 and auto_keys(spec.ds_config) == []


def test_training_scripts_get_the_shipped_config_filled_as_the_trainer_would():
    from logra_dist.engines.loading import training_ds_config

    ds = training_ds_config(REPO / "configs" / "zero3.json", micro_batch_size=3, dtype="bfloat16")
    assert auto_keys(ds) == [] and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.0
    kept = training_ds_config({**DS, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, micro_batch_size=2)
    assert kept["optimizer"] == {"type": "SGD", "params": {"lr": 0.1}}  # a training script keeps its optimizer
    with pytest.raises(AutoValueError, match=r"optimizer.params.lr is \"auto\""):
        training_ds_config({**DS, "optimizer": {"type": "SGD", "params": {"lr": "auto"}}}, micro_batch_size=2)
