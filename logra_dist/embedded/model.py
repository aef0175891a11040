"""Tiny Llama-style causal LM trained in seconds on the embedded corpus.

It gives the package a real (if small) transformer checkpoint with the same
layer structure as Llama, so everything downstream runs offline and is tested
on the exact code path a user's Llama checkpoint takes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from logra_dist.data import Document, collate, tokenize
from logra_dist.embedded.corpus import corpus_sha256, load_corpus
from logra_dist.embedded.tokenizer import build_tokenizer

MARKER = "logra_default.json"
DEFAULT_STEPS = 600
BATCH_SIZE = 16
LR = 3e-3
WARMUP = 20


def default_model_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """2-layer, 64-wide Llama with GQA (4 q / 2 kv heads) and SwiGLU: 15 nn.Linear layers."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _lr_factor(step: int, steps: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _train(steps: int, seed: int, max_length: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict]:
    docs = load_corpus()
    tokenizer = build_tokenizer()
    samples = tokenize([Document(int(d["id"]), d["text"]) for d in docs], tokenizer, max_length)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(default_model_config(tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            order += torch.randperm(len(samples), generator=gen).tolist()
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        b = collate([samples[i] for i in batch], tokenizer.pad_token_id)
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-10:] if losses else [float("nan")]
    info = {
        "corpus_sha256": corpus_sha256(docs),
        "steps": steps,
        "seed": seed,
        "final_loss": losses[-1] if losses else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "final_loss_mean10": sum(tail) / len(tail),
        "max_length": max_length,
        "batch_size": BATCH_SIZE,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "torch_version": torch.__version__,
    }
    return model, tokenizer, info


def train_default_model(
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    max_length: int = 128,
    num_threads: int | None = 1,
) -> tuple[LlamaForCausalLM, dict]:
    """Train the tiny Llama deterministically and save an HF checkpoint at ``out_dir``.

    The checkpoint is written to a temporary sibling directory and moved into
    place with ``os.replace`` once complete, so an interrupted run never leaves
    a partial checkpoint. Any existing ``out_dir`` is replaced. The caller's
    RNG state and thread count are left untouched. Returns the trained model
    (eval mode) and the metadata also written to ``out_dir/logra_default.json``.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        with torch.random.fork_rng(devices=[]):
            model, tokenizer, info = _train(steps, seed, max_length)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache may be shared
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "ckpt")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(prev_threads)
    return model, info
