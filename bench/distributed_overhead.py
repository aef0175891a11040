"""Figure 5: distributed overhead, logging under DeepSpeed ZeRO-3 on 2 ranks vs 1 plain process.

Status: the DeepSpeed engine adapter (`logra_dist.engines.deepspeed`) is on another branch. Until
it is importable, `run()` returns {"status": "pending"} and nothing is launched. Once it exists,
the same command measures it:

    python bench/distributed_overhead.py            # prints the JSON result

Both jobs log the same N samples of the embedded corpus on the large bench model (k=16,
hessian="kfac"), the 1-process job as a bare module, the 2-rank job through a ZeRO-3 engine
(torch SGD optimizer, gloo, the shm op build skipped). Reported: samples/s of each and their
ratio; on a 2-core machine the 2 ranks share the cores, so the ideal ratio is ~1.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
N_SAMPLES = 64


def adapter_available() -> bool:
    sys.path.insert(0, str(HERE.parent))
    try:
        return importlib.util.find_spec("logra_dist.engines.deepspeed") is not None
    except ModuleNotFoundError:
        return False


def worker(mode: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from common import large_config, build_model, fixed_batches, log_step_fn, tokenizer

    import logra_dist
    from logra_dist import LoGraConfig

    tok = tokenizer()
    model = build_model(large_config(tok))
    batch_size = 4
    target = model
    rank, world = 0, 1
    if mode == "zero3":
        import importlib

        import deepspeed

        # skip the 45 s shm op JIT compile (see shared notes: bind DeepSpeed's module, not torch)
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        ds_config = {"train_micro_batch_size_per_gpu": batch_size, "zero_optimization": {"stage": 3},
                     "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True}
        target, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                          config=ds_config)
    batches = fixed_batches(tok, batch_size, 128, N_SAMPLES // batch_size)[rank::world]
    logger = logra_dist.attach(target, LoGraConfig(k_in=16, k_out=16, hessian="kfac"), out / "index")
    step = log_step_fn(logger)
    step(batches[0])  # warm-up (not logged twice: it is part of the rank's share)
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    elapsed = time.perf_counter() - t0
    logger.finalize()
    if rank == 0:
        timed = (len(batches) - 1) * batch_size * world
        (out / "result.json").write_text(json.dumps({"mode": mode, "world_size": world, "samples_timed": timed,
                                                     "seconds": elapsed, "samples_per_s": timed / elapsed}))


def _launch(mode: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    script = [str(Path(__file__).resolve()), "--worker", mode, str(out)]
    if mode == "zero3":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *script]
    else:
        cmd = [sys.executable, *script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} job failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "result.json").read_text())


def run(quick: bool = False) -> dict[str, Any]:
    if not adapter_available():
        return {"status": "pending", "reason": "logra_dist.engines.deepspeed (the DeepSpeed engine adapter, "
                                              "branch `dist`) is not merged yet; this script runs once it is"}
    with tempfile.TemporaryDirectory(prefix="logra-dist-bench-") as tmp:
        single = _launch("single", Path(tmp) / "single")
        zero3 = _launch("zero3", Path(tmp) / "zero3")
    return {"status": "measured", "single": single, "zero3_2ranks": zero3,
            "throughput_ratio_zero3_over_single": zero3["samples_per_s"] / single["samples_per_s"]}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]))
    else:
        print(json.dumps(run(), indent=1))
