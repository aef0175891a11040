"""Figure 9: figures 1, 2 and 6 on one CUDA GPU with a ~1B-parameter Llama-style model (bf16,
built from a config, random init), in under 10 minutes. Not part of CI; nothing else needs a GPU.

    python bench/gpu.py --out bench/results/gpu.json            # on a CUDA machine
    python bench/gpu.py --smoke --device cpu --out /tmp/g.json  # tiny model: checks the code runs
    python bench/gpu.py --smoke --device cpu --dtype bfloat16 --out /tmp/g.json  # ... in the GPU run's dtype

Records, against the same references as on CPU (plain training step, the frozen-weights floor),
tokens/s and peak GPU memory of every variant, and the naive per-sample-gradient baseline
(measured per-sample gradients on a sub-batch, dense projection extrapolated from a slice).
Figure 6 runs bench/scorer_throughput.py when it exists, else says pending.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import copy_model, floor_step_fn, interleaved, log_step_fn, machine, ratio, train_step_fn, write_json  # noqa: E402

import logra_dist  # noqa: E402
from logra_dist import LoGraConfig  # noqa: E402
from logra_dist.data import Batch  # noqa: E402

SIZES = {  # Llama-3.2-1B-like (~1.0B with its 32k vocab) / tiny for --smoke
    "full": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        batch_size=8,
        seq_len=512,
    ),
    "smoke": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=300,
        batch_size=2,
        seq_len=32,
    ),
}


def build(size: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, list[Batch], dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SIZES[size])
    b, t = s.pop("batch_size"), s.pop("seq_len")
    cfg = LlamaConfig(**s, max_position_embeddings=max(1024, t), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):
        ids = torch.randint(0, s["vocab_size"], (b, t), generator=gen)
        batches.append(
            Batch(torch.arange(i * b, (i + 1) * b), ids.to(device), torch.ones_like(ids).to(device), ids.to(device))
        )
    return (
        model,
        batches,
        {
            "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": b,
            "seq_len": t,
            "dtype": str(dtype),
            **s,
        },
    )


def synced(fn: Callable, device: torch.device) -> Callable:
    def step(batch) -> None:
        fn(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def peak_memory(fn: Callable, batch, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(batch)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def figure1(model, batches, info, device, reps: int, tmp: Path, smoke: bool = False) -> dict[str, Any]:
    tokens = info["batch_size"] * info["seq_len"]
    steps = {
        "train": synced(train_step_fn(copy_model(model)), device),
        "floor": synced(floor_step_fn(copy_model(model)), device),
    }
    loggers = {}
    for k in (16, 64):
        for h in ("none", "kfac", "raw"):
            lg = logra_dist.attach(copy_model(model), LoGraConfig(k_in=k, k_out=k, hessian=h), tmp / f"{k}-{h}")
            loggers[f"k{k}-{h}"] = lg
            steps[f"k{k}-{h}"] = synced(log_step_fn(lg), device)
    mem = {n: peak_memory(s, batches[0], device) for n, s in steps.items()}
    # Raw Fisher GEMMs run every FISHER_GEMM_ROWS rows: time whole buffers.
    from logra_dist.core import curvature as st

    block = 1 if smoke else max(1, -(-getattr(st, "FISHER_GEMM_ROWS", 1) // info["batch_size"]))
    res = interleaved(steps, batches, reps=reps, warmup=1, block=block)
    out = {"tokens_per_step": tokens, "block_steps": block, "variants": {}}
    for n in steps:
        out["variants"][n] = {
            "step_s": res["median_s"][n],
            "tokens_per_s": tokens / res["median_s"][n],
            "peak_memory_bytes": mem[n],
        }
        if n != "floor":
            out["variants"][n]["vs_floor"] = ratio(res, n, "floor")
        if n not in ("train", "floor"):
            out["variants"][n]["vs_train"] = ratio(res, n, "train")
            out["variants"][n]["width_D"] = loggers[n].width
    for lg in loggers.values():
        lg.close()
    return out


def figure2(
    model, batches, info, device, reps: int, tmp: Path, naive_batch: int, slice_bytes: int = 4 << 30
) -> dict[str, Any]:
    from naive_baseline import per_sample_grad_fn

    out = []
    for k in (16, 64):
        lg = logra_dist.attach(copy_model(model), LoGraConfig(k_in=k, k_out=k, hessian="none"), tmp / f"n{k}")
        names, D = [f"{s.name}.weight" for s in lg.specs], lg.width
        P = sum(s.d_in * s.d_out for s in lg.specs)
        psg = per_sample_grad_fn(model, names)
        sub = [
            Batch(
                b.ids[:naive_batch], b.input_ids[:naive_batch], b.attention_mask[:naive_batch], b.labels[:naive_batch]
            )
            for b in batches
        ]
        log_step = synced(log_step_fn(lg), device)

        def naive(batch) -> None:
            g = psg(batch)
            del g

        naive = synced(naive, device)
        ts_log, ts_naive = [], []
        for r in range(reps + 1):
            for fn, b, ts in ((log_step, batches[r % 4], ts_log), (naive, sub[r % 4], ts_naive)):
                t0 = time.perf_counter()
                fn(b)
                if r:
                    ts.append(time.perf_counter() - t0)
        lg.close()
        # dense projection (naive_batch x P) @ (P x D), on a slice of P rows that fits in slice_bytes
        p_slice = max(1, min(P, slice_bytes // (D * 2)))
        proj = torch.randn(p_slice, D, device=device, dtype=torch.bfloat16)
        flat = torch.randn(naive_batch, p_slice, device=device, dtype=torch.bfloat16)
        tp = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            flat @ proj
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            tp.append(time.perf_counter() - t0)
        del proj, flat
        per_sample_logra = statistics.median(ts_log) / info["batch_size"]
        per_sample_naive = (statistics.median(ts_naive) + statistics.median(tp[1:]) * P / p_slice) / naive_batch
        out.append(
            {
                "k": k,
                "D": D,
                "P": P,
                "naive_batch": naive_batch,
                "logra_s_per_sample": per_sample_logra,
                "naive_s_per_sample": per_sample_naive,
                "speedup": per_sample_naive / per_sample_logra,
                "projection": "measured" if p_slice == P else f"extrapolated from {p_slice / P:.2%} of P",
            }
        )
    return {"results": out}


def figure6(quick: bool, out: Path) -> dict[str, Any]:
    script = HERE / "scorer_throughput.py"
    if not script.exists():
        return {"status": "pending", "reason": "bench/scorer_throughput.py (branch `scorer`) not merged yet"}
    import json

    target = out.with_name("gpu_scorer.json")
    with tempfile.TemporaryDirectory(prefix="logra-gpu-scorer-") as index:
        args = [
            sys.executable,
            str(script),
            "--out",
            str(Path(index) / "index"),
            "--rows",
            "2000" if quick else "1000000",
            "--rounds",
            "1" if quick else "3",
        ]
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=300 if quick else 900,
            env={**os.environ, "PYTHONPATH": str(HERE.parent)},
        )
    if proc.returncode != 0:
        return {"status": "failed", "stderr": proc.stderr[-2000:]}
    target.write_text(proc.stdout)
    # the scorer computes on the CPU (it streams rows from disk): this figure is the host's
    return {"status": "measured", "file": target.name, **json.loads(proc.stdout)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny model: a crash check, runs on CPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--dtype", choices=["auto", "bfloat16", "float32"], default="auto", help="auto: bfloat16 on CUDA, else float32"
    )
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device (use --smoke --device cpu to check the code on CPU)")
    size = "smoke" if a.smoke else "full"
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if a.dtype == "auto" else getattr(torch, a.dtype)  # bfloat16 on CPU: the GPU run's dtype paths
    t0 = time.perf_counter()
    model, batches, info = build(size, device, dtype)
    reps = 1 if a.smoke else a.reps
    if device.type == "cpu":
        torch.set_num_threads(1)
    result: dict[str, Any] = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": info,
        "smoke": a.smoke,
        "dtype": str(dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory(prefix="logra-gpu-") as tmp:
        result["figure1_logging"] = figure1(model, batches, info, device, reps, Path(tmp), a.smoke)
        result["figure2_naive"] = figure2(
            model,
            batches,
            info,
            device,
            reps,
            Path(tmp),
            naive_batch=2,
            slice_bytes=(16 << 20) if a.smoke else (4 << 30),
        )
    result["figure6_scorer"] = figure6(a.smoke, Path(a.out))
    result["wall_s"] = time.perf_counter() - t0
    write_json(Path(a.out), result)
    return result


if __name__ == "__main__":
    main()
