"""Activation checkpointing while logging: peak memory and step time, plain vs checkpointed.

    PYTHONPATH=. python bench/checkpointing.py --seq-len 512 --batch-size 8 --out bench/results/checkpointing.json

The ~27M-parameter Llama of the bench (8 layers, random init) logs batches of corpus documents
truncated to --seq-len tokens (raw projected Fisher, k = 16), each variant in its own fresh
subprocess (memory.py's protocol: RSS with the model and batches loaded, kernel peak counter
reset, then attach + steps): the peak RSS increment over the loaded model, and the median step
time after one warm-up step. Variants: plain (eval mode), Hugging Face checkpointing
non-reentrant and reentrant (train mode; the model has no dropout). Rows are the same in all
three (tests/core/test_activation_checkpointing.py); what differs is what the backward keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "non-reentrant", "reentrant")


def worker(variant: str, batch_size: int, seq_len: int, steps: int) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(1)
    from common import build_model, fixed_batches, large_config, log_step_fn, tokenizer
    from memory import _reset_peak, _vm

    import logra_dist

    tok = tokenizer()
    torch.manual_seed(0)
    model = build_model(large_config(tok)).eval()
    batches = fixed_batches(tok, batch_size, seq_len, 2)
    if variant != "plain":
        from logra_dist.engines.loading import enable_checkpointing

        enable_checkpointing(model, reentrant=variant == "reentrant")
        model.train()  # Hugging Face checkpoints only in train mode (this model has no dropout)
    gc.collect()
    before = _vm("VmRSS")
    reset = _reset_peak()
    cfg = logra_dist.LoGraConfig(k_in=16, k_out=16, hessian="raw", flush_rows=batch_size)
    step = log_step_fn(logra_dist.attach(model, cfg, Path(tempfile.mkdtemp(prefix="logra-ckpt-")) / "idx"))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step(batches[i % len(batches)])
        times.append(time.perf_counter() - t0)
    peak = _vm("VmHWM")
    return {
        "variant": variant,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "steps": steps,
        "peak_increment_bytes": peak - before,
        "peak_rss_bytes": peak,
        "peak_reset": reset,
        "step_s_median": statistics.median(times[1:]),
    }


def measure(variant: str, batch_size: int, seq_len: int, steps: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "checkpointing.py"),
        "--worker",
        variant,
        str(batch_size),
        str(seq_len),
        str(steps),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"checkpointing worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, nargs="+", default=[512])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [measure(v, args.batch_size, t, args.steps) for t in args.seq_len for v in VARIANTS]
    for r in rows:
        plain = next(p for p in rows if p["variant"] == "plain" and p["seq_len"] == r["seq_len"])
        r["peak_increment_vs_plain"] = r["peak_increment_bytes"] / plain["peak_increment_bytes"]
        r["step_time_vs_plain"] = r["step_s_median"] / plain["step_s_median"]
    out = {
        "command": "PYTHONPATH=. python bench/checkpointing.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "model": "bench/common.large_config (~27M parameters, 8 layers), random init",
        "threads": 1,
        "loadavg_at_start": os.getloadavg(),
        "results": rows,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(HERE))
        res = worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        print(json.dumps(res), flush=True)
        os._exit(0)
    else:
        main()
