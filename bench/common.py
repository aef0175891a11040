"""Shared benchmark pieces: models, batches, the reference steps, and interleaved timing.

Timing discipline (the machine is shared and noisy): every figure is the median over
repetitions of steps run INTERLEAVED with their reference in one process (A B A B ..., the order
rotated each round), reported as the median of the per-round ratios. Absolute times are also
recorded, but only ratios are meant to be compared across machines.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` from a clean clone, no install needed
    sys.path.insert(0, str(ROOT))

from logra_dist.data import Document, collate, summed_lm_loss, tokenize  # noqa: E402


# -- models ---------------------------------------------------------------------------------
@dataclass
class Bench:
    """A model (eval mode, float32 unless said otherwise) and fixed batches of equal length."""

    name: str
    model: torch.nn.Module
    batches: list[Any]  # logra_dist.data.Batch, no padding: every sample has exactly seq_len tokens
    batch_size: int
    seq_len: int

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        cfg = getattr(self.model, "config", None)
        out = {
            "name": self.name,
            "parameters": self.params,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "tokens_per_step": self.batch_size * self.seq_len,
        }
        if cfg is not None:
            out.update(
                {
                    k: getattr(cfg, k)
                    for k in (
                        "hidden_size",
                        "intermediate_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "vocab_size",
                    )
                }
            )
        return out


def tokenizer():
    from logra_dist.embedded import build_tokenizer

    return build_tokenizer()


def large_config(tok, hidden: int = 512, layers: int = 8, intermediate: int = 1536, heads: int = 8, kv_heads: int = 4):
    """A Llama-style config of ~27M parameters (same family as the embedded model: GQA,
    SwiGLU, RMSNorm), random init; vocab = the embedded byte tokenizer's so the same corpus
    feeds it."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def build_model(config, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def embedded_model() -> torch.nn.Module:
    """The bundled default (trained once per machine, ~30 s, then cached)."""
    from logra_dist.embedded import ensure_default_model, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(ensure_default_model())
    return model.eval()


def fixed_batches(tok, batch_size: int, seq_len: int, n_batches: int, offset: int = 0) -> list[Any]:
    """Batches of corpus documents at least seq_len tokens long, truncated to exactly seq_len
    (no padding, so every variant does identical work); the mask is still passed, as in use."""
    from logra_dist.embedded import load_corpus

    docs = [Document(d["id"], d["text"]) for d in load_corpus()]
    samples = [s for s in tokenize(docs, tok, seq_len) if len(s.input_ids) == seq_len]
    need = batch_size * n_batches + offset
    if len(samples) < need:
        raise ValueError(f"corpus has {len(samples)} documents of >= {seq_len} tokens, need {need}")
    samples = samples[offset:need]
    return [collate(samples[i : i + batch_size], tok.pad_token_id) for i in range(0, len(samples), batch_size)]


def make_bench(name: str, batch_size: int, seq_len: int, n_batches: int = 4) -> Bench:
    tok = tokenizer()
    if name == "embedded":
        model = embedded_model()
    elif name == "large":
        model = build_model(large_config(tok))
    else:
        raise ValueError(f"unknown bench model {name!r}")
    return Bench(name, model, fixed_batches(tok, batch_size, seq_len, n_batches), batch_size, seq_len)


# -- the steps ------------------------------------------------------------------------------
def train_step_fn(model: torch.nn.Module) -> Callable[[Any], None]:
    """Plain training step without optimizer: forward + backward, all weights requiring grad."""
    for p in model.parameters():
        p.requires_grad_(True)

    def step(batch) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        summed_lm_loss(logits, batch.labels).backward()

    return step


def floor_step_fn(model: torch.nn.Module) -> Callable[[Any], None]:
    """The floor of any hook-based method: forward + backward with the weights frozen and the
    activation gradients flowing (the input embeddings' output is made to require grad)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))

    def step(batch) -> None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        summed_lm_loss(logits, batch.labels).backward()

    return step


def log_step_fn(logger) -> Callable[[Any], None]:
    """One LoGra logging step through the public protocol (rows go to the shard writer)."""

    seen = [0]  # timing loops reuse batches: every step logs fresh ids (an index refuses repeats)

    def step(batch) -> None:
        ids = torch.arange(seen[0], seen[0] + len(batch.ids))
        seen[0] += len(batch.ids)
        with logger.capture(ids, mask=batch.attention_mask):
            logits = logger.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logger.backward(summed_lm_loss(logits, batch.labels))

    return step


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """Each variant gets its own copy: freezing and hooks must not leak between them."""
    return copy.deepcopy(model)


# -- timing ---------------------------------------------------------------------------------
def interleaved(
    steps: dict[str, Callable[[Any], None]],
    batches: list[Any],
    reps: int,
    warmup: int = 1,
    block: int = 1,
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run every step once per round (a round = `block` consecutive calls of one step, so
    periodic work such as a buffered GEMM every N rows is inside each timed unit), rotating the
    order each round; `reps` timed rounds after `warmup` untimed ones. `between` runs once after
    warmup (e.g. to align buffers). Returns per-step times (s per call) for `ratios`."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    cursor = 0
    for r in range(warmup + reps):
        if r == warmup and between is not None:
            between()
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            gc.collect()
            t0 = time.perf_counter()
            calls = block if r >= warmup else 1  # warmup: one call of each step
            for j in range(calls):
                steps[n](batches[(cursor + j) % len(batches)])
            dt = (time.perf_counter() - t0) / calls
            if r >= warmup:
                times[n].append(dt)
        cursor += block if r >= warmup else 1
    return {
        "reps": reps,
        "block": block,
        "times_s": times,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
    }


def ratio(res: dict[str, Any], name: str, reference: str) -> dict[str, Any]:
    """Median over rounds of time[name] / time[reference] (both measured in the same round),
    with the spread of the per-round ratios; also the ratio of the fastest rounds (noise on a
    shared machine only ever adds time)."""
    a_t, b_t = res["times_s"][name], res["times_s"][reference]
    pairs = [a / b for a, b in zip(a_t, b_t)]
    return {
        "ratio": statistics.median(pairs),
        "min": min(pairs),
        "max": max(pairs),
        "rounds": len(pairs),
        "ratio_of_mins": min(a_t) / min(b_t),
        "vs": reference,
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
