"""Figure 3: LoGra logging (logra_dist) vs LogIX, the LoGra authors' library (PyPI `logix-ai`
0.1.1), on the same model, batches and rank, interleaved in one process.

Needs the separate venv made by `bash bench/setup_logix.sh` (LogIX must not enter the product
venv); `bench/run.py` calls this script with that venv's python, or marks the figure pending.

What each side does per step (both: projected per-sample gradients to disk, float16):
- LogIX: its `add_lora` wraps every Linear in A (d_in -> r, random), B (r x r, zero), C
  (r -> d_out, random); hooks on B give per-sample gradients = outer products of B's input and
  output gradient summed over tokens; `{"grad": ["log"]}` with `save(True)` buffers rows and
  writes them to its memory-mapped files every `flush_threshold` numbers.
- logra_dist: `attach` + `capture` (hessian="none"), asynchronous HDF5 writer.
Both flush to disk every 2 steps, so disk writes happen inside the timed window; each side's
final flush (LogIX finalize / our finalize) is timed separately.
The secondary comparison adds the raw projected Fisher on both sides (LogIX `covariance` on
grad, per-batch update; logra_dist hessian="raw"), float32 rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import copy_model, floor_step_fn, interleaved, log_step_fn, make_bench, ratio, write_json  # noqa: E402
from logging_speed import SIZES, logra_config  # noqa: E402

import logra_dist  # noqa: E402
from logra_dist.data import summed_lm_loss  # noqa: E402

FLUSH_STEPS = 2


def logix_session(
    model: torch.nn.Module,
    k: int,
    root: Path,
    layer_names: list[str],
    width: int,
    batch_size: int,
    covariance: bool = False,
):
    """(LogIX run, step function) on `model` (modified in place by LogIX's LoRA wrapping)."""
    import logix
    import yaml
    from logix.utils import get_logger

    get_logger().setLevel(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "logix.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "root_dir": str(root),
                "logging": {
                    "flush_threshold": FLUSH_STEPS * batch_size * width - 1,
                    "num_workers": 1,
                    "log_dtype": "none" if covariance else "float16",
                },
                "lora": {"init": "random", "rank": k},
            }
        )
    )
    run = logix.LogIX(project="bench", config=str(cfg))
    run.watch(model, name_filter=layer_names)
    run.add_lora(name_filter=layer_names)
    run.setup({"grad": ["log", "covariance"] if covariance else ["log"]})
    run.save(True)

    def step(batch) -> None:
        with run(data_id=batch.ids.tolist(), mask=batch.attention_mask):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            summed_lm_loss(logits, batch.labels).backward()

    return run, step


def compare(model_name: str, k: int, reps: int, tmp: Path, covariance: bool = False) -> dict[str, Any]:
    b, t = SIZES[model_name]
    bench = make_bench(model_name, b, t)
    hessian = "raw" if covariance else "none"
    ours = logra_dist.attach(
        copy_model(bench.model),
        logra_config(
            model_name, k, hessian, flush_rows=FLUSH_STEPS * b, storage_dtype="float32" if covariance else "float16"
        ),
        tmp / f"ours-{model_name}-{k}-{hessian}",
    )
    names = [s.name for s in ours.specs]
    theirs_model = copy_model(bench.model)
    run, theirs = logix_session(
        theirs_model, k, tmp / f"logix-{model_name}-{k}-{hessian}", names, ours.width, b, covariance
    )
    theirs_width = sum(m.logix_lora_B.weight.numel() for m in theirs_model.modules() if hasattr(m, "logix_lora_B"))
    # The floor (frozen weights, activation gradients) bounds what any hook-based logger can
    # gain: logix/floor is the most logra_dist could be faster than LogIX on this model.
    floor = floor_step_fn(copy_model(bench.model))
    res = interleaved(
        {"logra_dist": log_step_fn(ours), "logix": theirs, "floor": floor},
        bench.batches,
        reps=reps,
        warmup=1,
        block=2 if model_name == "embedded" else 1,
    )
    t0 = time.perf_counter()
    ours.finalize()
    ours_final = time.perf_counter() - t0
    t0 = time.perf_counter()
    run.finalize()
    theirs_final = time.perf_counter() - t0
    r = ratio(res, "logix", "logra_dist")
    return {
        "model": model_name,
        "k": k,
        "hessian": hessian,
        "D_ours": ours.width,
        "D_logix": theirs_width,
        "layers": len(names),
        "batch_size": b,
        "seq_len": t,
        "step_s": res["median_s"],
        "logix_time_over_ours": r,
        "logix_over_floor": ratio(res, "logix", "floor"),
        "ours_over_floor": ratio(res, "logra_dist", "floor"),
        "throughput_ours_over_logix": r["ratio"],
        "finalize_s": {"logra_dist": ours_final, "logix": theirs_final},
    }


def run_all(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 5
    out: dict[str, Any] = {
        "logix_version": _version("logix-ai"),
        "torch": torch.__version__,
        "results": [],
        "flush_every_steps": FLUSH_STEPS,
    }
    with tempfile.TemporaryDirectory(prefix="logra-logix-") as tmp:
        for m in ["large"] if quick else ["embedded", "large"]:
            for k in (16, 64):
                out["results"].append(compare(m, k, reps, Path(tmp)))
        if not quick:
            # Raw Fisher on both sides at rank 16 only: at rank 64 logra_dist's commit point (every
            # flush_rows rows, here every 2 steps to put row writes inside the timed window)
            # snapshots the whole Fisher in float64 (7.6 GB for this model) into the writer
            # queue, which ran the machine out of memory; see logging_speed.json "commit".
            out["results"].append(compare("large", 16, max(3, reps // 2), Path(tmp), covariance=True))
            out["skipped"] = {
                "large, rank 64, raw Fisher on both": "commit snapshots of the 7.6 GB Fisher "
                "every 2 steps exhaust memory"
            }
    from memory import measure

    out["memory"] = [
        measure(mode, "large", k, python=sys.executable) for k in (16, 64) for mode in ("log-none", "logix")
    ]
    return out


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")
    write_json(Path(a.out), run_all(a.quick))


if __name__ == "__main__":
    main()
