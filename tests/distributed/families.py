"""Tiny causal LMs of every family transformers names or ties differently, saved as local
checkpoints (`save_pretrained`), for the model-family matrix (test_model_families.py).

Why these: Llama/Mistral/Qwen2 (the common layout, Qwen2 with q/k/v biases), GPT-NeoX (`gpt_neox.`
prefix, `embed_out` head, fused qkv), GPT-2 (Conv1D layers, head tied to `wte`), Gemma (tied
head, scaled embeddings), Phi (`dense` output, partial rotary), and two MoEs (Mixtral: experts
stored one by one, fused in the model; Qwen2-MoE: the same plus a shared expert). Widths are
multiples of 2 so every parameter splits over 2 ranks, and small enough that the whole matrix
runs in seconds per rank."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 260
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)


def _configs():
    import transformers as tf

    llama_like = dict(_COMMON, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0)
    return {
        "llama": tf.LlamaConfig(**llama_like, tie_word_embeddings=False),
        "mistral": tf.MistralConfig(**llama_like, sliding_window=None),
        "qwen2": tf.Qwen2Config(**llama_like, tie_word_embeddings=True),
        "gpt_neox": tf.GPTNeoXConfig(**_COMMON, intermediate_size=64, num_hidden_layers=2, pad_token_id=0),
        "gpt2": tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "gemma": tf.GemmaConfig(**llama_like, head_dim=8),
        "phi": tf.PhiConfig(**_COMMON, intermediate_size=64, num_hidden_layers=2, pad_token_id=0),
        "mixtral": tf.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(
            **llama_like,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
        ),
    }


FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "gpt2", "gemma", "phi", "mixtral", "qwen2_moe")


def save_family(name: str, path: str | Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[name]
    for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return Path(path)


def save_all(root: str | Path) -> dict[str, Path]:
    return {name: save_family(name, Path(root) / name) for name in FAMILIES}
