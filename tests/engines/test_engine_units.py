"""Engine plumbing that needs no second process: config files, launcher detection, checkpoint
reading, meta construction, the bare-module engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logra_dist.engines import Engine, wrap
from logra_dist.engines.checkpoint import (
    CheckpointError,
    HFCheckpoint,
    causal_lm_class,
    construct_uninitialized,
    parameters_on_meta,
    weight_sources,
)
from logra_dist.engines.launch import detect_launcher, init_distributed
from logra_dist.engines.spec import EngineConfigError, read_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name,engine,ds",
    [
        ("zero3.json", "zero3", True),
        ("zero2.json", "zero2", True),
        ("fsdp2.json", "fsdp2", False),
        ("fsdp1.json", "fsdp1", False),
        ("ddp.json", "ddp", False),
    ],
)
def test_shipped_configs_parse(name, engine, ds):
    spec = read_spec(REPO / "configs" / name)
    assert spec.engine == engine and spec.dtype == torch.float32
    assert (spec.ds_config is not None) == ds
    if ds:
        assert spec.ds_config["gradient_clipping"] == 0.0
        assert spec.ds_config["bf16"]["enabled"] is False


def test_dtype_override_switches_deepspeed_precision():
    spec = read_spec(REPO / "configs" / "zero3.json", dtype="bfloat16")
    assert spec.dtype == torch.bfloat16
    assert spec.ds_config["bf16"]["enabled"] is True and spec.ds_config["fp16"]["enabled"] is False
    assert json.loads((REPO / "configs" / "zero3.json").read_text())["bf16"]["enabled"] == "auto"  # file untouched


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"engine": "fsdp2", "reshard": True}, "unknown key(s) ['reshard']"),
        ({"engine": "fsdp3"}, "engine='fsdp3'"),
        ({"engine": "fsdp1", "sharding_strategy": "FULL"}, "sharding_strategy='FULL'"),
        ({"engine": "fsdp2", "mixed_precision": {"param_dtype": "float8"}}, "mixed_precision.param_dtype"),
        ({"engine": "fsdp2", "wrap": "LlamaDecoderLayer"}, "wrap must be"),
        ({"engine": "fsdp2", "reshard_after_forward": "yes"}, "reshard_after_forward must be"),
        ({"zero_optimization": {"stage": 4}}, "stage=4"),
        ({"optimizer": {"type": "SGD"}}, "neither a DeepSpeed config"),
    ],
)
def test_bad_engine_configs_name_file_and_key(data, needle, tmp_path):
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(EngineConfigError) as err:
        read_spec(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_unreadable_config_is_a_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EngineConfigError, match=r"bad\.json: not valid JSON"):
        read_spec(tmp_path / "bad.json")
    with pytest.raises(EngineConfigError, match=r"missing\.json: cannot read"):
        read_spec(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "env,expected",
    [
        (
            {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x"},
            "torchrun",
        ),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_RANK": "1"}, "deepspeed"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "mpi"),
        ({"PMI_SIZE": "2", "PMI_RANK": "1"}, "mpi"),
        ({}, "single"),
    ],
)
def test_detect_launcher(env, expected):
    assert detect_launcher(env) == expected


def test_single_process_needs_no_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend, info.launcher) == (0, 1, None, "single")
    assert not torch.distributed.is_initialized()


def _llama_config(tied: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=50,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A tied-embedding Llama saved in several safetensors shards (with an index file)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(tied=True)).eval()
    path = tmp_path_factory.mktemp("tied")
    model.save_pretrained(str(path), max_shard_size="20KB")
    return path, model


def test_checkpoint_reads_sharded_index_and_slices(tied_checkpoint):
    path, model = tied_checkpoint
    assert (path / "model.safetensors.index.json").is_file()
    ckpt = HFCheckpoint(path)
    assert len({ckpt.file_of[k] for k in ckpt.keys()}) > 1
    w = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(ckpt.get("model.layers.0.mlp.up_proj.weight"), w)
    assert torch.equal(ckpt.get_slice("model.layers.0.mlp.up_proj.weight", (slice(5, 9), slice(0, 32))), w[5:9])


def test_tied_parameter_is_loaded_once_under_its_stored_name(tied_checkpoint):
    path, model = tied_checkpoint
    listed = weight_sources(model, HFCheckpoint(path))
    assert len(listed) == len(list(model.parameters()))
    stored = {s.keys for _, s, p in listed if p is model.lm_head.weight}
    assert stored == {("model.embed_tokens.weight",)}


def test_missing_parameters_are_named(tied_checkpoint, tmp_path):
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(_llama_config(tied=False))  # has an untied lm_head the checkpoint lacks
    with pytest.raises(CheckpointError, match=r"lm_head.weight"):
        weight_sources(other, HFCheckpoint(tied_checkpoint[0]))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        HFCheckpoint(tmp_path)


def test_meta_construction_keeps_buffers_real(tied_checkpoint):
    config = _llama_config(tied=True)
    model = construct_uninitialized(causal_lm_class(config), config, torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    inv_freq = dict(model.named_buffers())["model.rotary_emb.inv_freq"]
    assert inv_freq.device.type == "cpu"
    torch.testing.assert_close(inv_freq, dict(tied_checkpoint[1].named_buffers())["model.rotary_emb.inv_freq"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tying survives
    with parameters_on_meta():
        lin = torch.nn.Linear(3, 4)
    assert lin.weight.device.type == "meta" and torch.nn.Linear(3, 4).weight.device.type == "cpu"


def test_none_engine_loads_the_checkpoint(tied_checkpoint):
    from logra_dist.engines.loading import load_causal_lm

    path, model = tied_checkpoint
    loaded = load_causal_lm(path, "none")
    assert loaded.engine == "none" and not loaded.module.training
    x = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(loaded.wrapped(input_ids=x).logits, model(input_ids=x).logits)
    bf16 = load_causal_lm(path, "none", dtype="bfloat16")
    assert next(bf16.module.parameters()).dtype == torch.bfloat16


def test_loader_errors_are_clear(tied_checkpoint, tmp_path, monkeypatch):
    from logra_dist.engines.loading import build, load_causal_lm

    for k in ("RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(EngineConfigError, match=r"no config\.json"):
        load_causal_lm(tmp_path, "none")
    with pytest.raises(EngineConfigError, match="needs a launcher"):
        load_causal_lm(tied_checkpoint[0], "ddp")
    with pytest.raises(EngineConfigError, match="configures engine 'fsdp2' but 'zero3'"):
        build("zero3", tmp_path, REPO / "configs" / "fsdp2.json")
    with pytest.raises(EngineConfigError, match="is not one of"):
        build("fsdp3", tmp_path)


def test_bare_module_engine():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4))
    engine = wrap(model)
    assert type(engine) is Engine and engine.kind == "module" and engine.model is model
    assert not engine.forward_is_collective and engine.lockstep_batches(3) == 3
    engine.freeze()
    assert not any(p.requires_grad for p in model.parameters())
    engine.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="attach\\(\\) needs"):
        wrap(object())


def test_spec_from_dict_dtype_default():
    assert spec_from_dict({"engine": "none"}).dtype == torch.float32
    assert spec_from_dict({"engine": "fsdp2", "dtype": "bf16"}).dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2_moe", "gpt2"])
def test_weight_sources_map_checkpoint_names_as_from_pretrained(family, tmp_path):
    """GPT-NeoX stores `embed_out` for the model's `lm_head`; Qwen2-MoE stores experts one by one
    for the model's fused `experts.gate_up_proj` / `down_proj`; GPT-2 ties its head. Every
    parameter of a model built on the meta device gets a source whose tensor equals the one
    `from_pretrained` loads (the sharded loaders read only these sources)."""
    import sys

    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from families import save_family

    path = save_family(family, tmp_path / family)
    whole = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    config = whole.config
    meta = construct_uninitialized(causal_lm_class(config), config, torch.float32)
    ckpt = HFCheckpoint(path)
    sources = weight_sources(meta, ckpt)
    expected = dict(whole.named_parameters())
    assert {name for name, _, _ in sources} == set(expected)
    for name, source, _ in sources:
        assert torch.equal(source.get(), expected[name]), name
        rows = slice(0, max(1, expected[name].shape[0] // 2))
        assert torch.equal(source.get_slice((rows,)), expected[name][rows]), name
    if family == "gpt_neox":
        assert dict((n, s.keys) for n, s, _ in sources)["lm_head.weight"] == ("embed_out.weight",)
    if family == "qwen2_moe":
        fused = dict((n, s) for n, s, _ in sources)["model.layers.0.mlp.experts.gate_up_proj"]
        assert fused.converter is not None and len(fused.keys) == 2 * config.num_experts
