"""Figure 8 (and the measured memory of figure 2): peak resident memory of one kind of step,
each in its own fresh subprocess so no allocator state or cache carries over.

In the worker: build the model and batches, record the RSS, reset the kernel's peak-RSS counter
(/proc/self/clear_refs = 5), then set the method up (attach the logger: projections, statistics,
writer; or the naive method's dense matrix) and run `steps` steps. Reported: VmHWM (peak) minus
that RSS, i.e. everything the method adds to a loaded model (state and transients), and the
absolute peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Both logging methods flush rows to disk every this many steps in memory runs (LogIX's default
# keeps every row in RAM until finalize; logra_dist's buffers flush_rows=1024 rows by default).
FLUSH_STEPS = 2


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(mode: str, model_name: str, k: int, steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from common import copy_model, floor_step_fn, log_step_fn, make_bench, train_step_fn
    from logging_speed import SIZES, logra_config

    import logra_dist

    b, t = SIZES[model_name]
    bench = make_bench(model_name, b, t)
    tmp = tempfile.mkdtemp(prefix="logra-mem-")
    model = copy_model(bench.model)
    del bench.model
    import gc

    gc.collect()
    before = _vm("VmRSS")  # model and batches only: every method's state and transients count
    reset = _reset_peak()
    if mode == "train":
        step = train_step_fn(model)
    elif mode == "floor":
        step = floor_step_fn(model)
    elif mode.startswith("log-"):
        cfg = logra_config(model_name, k, mode[4:], flush_rows=FLUSH_STEPS * b)
        step = log_step_fn(logra_dist.attach(model, cfg, Path(tmp) / "idx"))
    elif mode == "logix":
        from logix_compare import logix_session

        from logra_dist.core.capture import find_layers
        from logra_dist.engines import wrap

        cfg = logra_config(model_name, k, "none")
        names = wrap(model).canonical_name
        layers = find_layers(model, cfg.include, cfg.exclude, layer_types=cfg.layer_types, canonical_name=names)
        width = sum(min(k, d_in, d_out) ** 2 for _, _, _, d_in, d_out in layers)
        _, step = logix_session(model, k, Path(tmp), [n for n, *_ in layers], width, b)
    elif mode == "naive":
        from naive_baseline import per_sample_grad_fn

        lg = logra_dist.attach(copy_model(model), logra_config(model_name, k, "none"), Path(tmp) / "shape")
        names, D = [f"{s.name}.weight" for s in lg.specs], lg.width
        lg.close()
        P = sum(s.d_in * s.d_out for s in lg.specs)
        proj = torch.randn(P, D).div_(D**0.5)  # the dense projection must be held (or regenerated)
        psg = per_sample_grad_fn(model, names)

        def step(batch) -> None:
            g = psg(batch)
            torch.cat([g[n].reshape(b, -1) for n in names], dim=1) @ proj
    else:
        raise ValueError(mode)
    for i in range(steps):
        step(bench.batches[i % len(bench.batches)])
    peak = _vm("VmHWM")
    return {
        "mode": mode,
        "model": model_name,
        "k": k,
        "steps": steps,
        "rss_model_loaded": before,
        "peak_rss": peak,
        "peak_increment": peak - before,
        "peak_reset": reset,
    }


def measure(mode: str, model_name: str, k: int = 16, steps: int = 2, python: str | None = None) -> dict[str, Any]:
    cmd = [python or sys.executable, str(HERE / "memory.py"), "--worker", mode, model_name, str(k), str(steps)]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {mode} {model_name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"results": []}
    plan = [
        ("train", "large", 16),
        ("floor", "large", 16),
        ("log-none", "large", 16),
        ("log-kfac", "large", 64),
        ("log-raw", "large", 16),
        ("train", "embedded", 16),
        ("log-kfac", "embedded", 16),
        ("naive", "embedded", 16),
    ]
    if quick:
        plan = [p for p in plan if p[0] in ("train", "log-kfac", "naive") and p[1] == "embedded"] + [
            ("train", "large", 16),
            ("log-kfac", "large", 16),
        ]
    for mode, m, k in plan:
        out["results"].append(measure(mode, m, k))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(HERE))
        res = worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        print(json.dumps(res), flush=True)
        os._exit(0)  # the measurement is done: skip closing the logger and interpreter teardown
    else:
        print(json.dumps(run("--quick" in sys.argv), indent=1))
