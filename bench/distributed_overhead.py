"""Figure 5: distributed overhead, logging under DeepSpeed ZeRO-3 on 2 ranks (1 thread each) vs
one process with 2 threads, the same samples, and where each step's time goes.

    python bench/distributed_overhead.py            # prints the JSON result

Both jobs log the same N samples of the embedded corpus on the large bench model (25M
parameters, B=4 per rank, T=128, k=16, hessian="kfac"). The 1-process job runs the bare model,
timing 2 threads and 1 thread interleaved step by step (1 thread: the per-rank reference, a
check on the ZeRO-3 ranks' compute); the 2-rank job runs a ZeRO-3 engine (torch SGD optimizer,
gloo, launched with `torchrun --standalone`, DeepSpeed's shm op build skipped). Every rank logs
all of its share once after one untimed warm-up step. On 2 cores the ideal ratio is ~1.

Breakdown (same run as the throughput, `phase_timers.py`): exclusive main-thread timers split
every step into model compute (forward/backward minus everything below), ZeRO-3 weight
gathering (all-gather post, waiting on it, fetch bookkeeping, release, DeepSpeed's other hook
work), LoGra's hooks, its statistics, and rows + hand-off to the writer; they sum to the
step's wall time. The HDF5 writer thread's own time (overlapped) and every torch.distributed
collective called in the timed steps are reported beside.
"""

from __future__ import annotations

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
BATCH = 4
# exclusive timer phases -> the figure's parts
PARTS = {
    "compute": ("forward", "backward"),
    "weight gathering": ("allgather-post", "allgather-wait", "zero3-fetch", "zero3-release", "zero3-hooks"),
    "other collectives": ("other-collectives",),
    "logra hooks": ("logra-hooks",),
    "logra statistics": ("statistics",),
    "rows + write hand-off": ("rows", "batch-end"),
    "other": ("step",),
}


def worker(mode: str, out: Path, n_samples: int) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from common import build_model, fixed_batches, large_config, tokenizer
    from phase_timers import ExclusiveTimers, TimerTracker, count_collectives, instrument_logra, instrument_zero3

    import logra_dist
    from logra_dist import LoGraConfig
    from logra_dist.data import summed_lm_loss

    timers, collectives, timing = ExclusiveTimers(), {}, [False]
    instrument_logra(timers)
    tok = tokenizer()
    model = build_model(large_config(tok))
    target, rank, world = model, 0, 1
    if mode == "zero3":
        import importlib

        import deepspeed
        import torch.distributed as dist

        torch.set_num_threads(1)
        count_collectives(timers, collectives, lambda: timing[0])
        instrument_zero3(timers)
        # skip the 45 s shm op JIT compile (see shared notes: bind DeepSpeed's module, not torch)
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        ds_config = {
            "train_micro_batch_size_per_gpu": BATCH,
            "zero_optimization": {"stage": 3},
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
        }
        target, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=ds_config
        )
    batches = fixed_batches(tok, BATCH, 128, n_samples // BATCH)[rank::world]
    tracker = TimerTracker(timers)
    logger = logra_dist.attach(target, LoGraConfig(k_in=16, k_out=16, hessian="kfac"), out / "index", tracker=tracker)
    seen = [0]

    def step(batch) -> None:
        with timers.phase("step"):
            ids = torch.arange(seen[0], seen[0] + len(batch.ids))  # fresh ids: batches are logged twice
            seen[0] += len(batch.ids)
            with logger.capture(ids, mask=batch.attention_mask):
                with timers.phase("forward"):
                    logits = logger.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                    loss = summed_lm_loss(logits, batch.labels)
                with timers.phase("backward"):
                    logger.backward(loss)

    settings = [2, 1] if mode == "single" else [1]  # torch threads, interleaved step by step
    runs = {t: {"steps": [], "phases": {}, "writer_s": 0.0, "elapsed": 0.0} for t in settings}
    for t in settings:  # untimed warm-up (ZeRO-3 records its prefetch trace here)
        torch.set_num_threads(t)
        step(batches[0])
    if world > 1:
        dist.barrier()
    timing[0] = True
    before_bytes, before_calls = timers.bytes["allgather"], timers.calls["allgather-post"]
    for i, batch in enumerate(batches):
        for t in settings[i % len(settings) :] + settings[: i % len(settings)]:
            torch.set_num_threads(t)
            s0, w0, t0 = timers.snapshot(), tracker.writer_seconds(), time.perf_counter()
            step(batch)
            dt = time.perf_counter() - t0
            r = runs[t]
            r["steps"].append(dt)
            r["elapsed"] += dt
            r["writer_s"] += tracker.writer_seconds() - w0
            for k, v in timers.snapshot().items():
                r["phases"][k] = r["phases"].get(k, 0.0) + v - s0.get(k, 0.0)
    timing[0] = False
    gathered_bytes = timers.bytes["allgather"] - before_bytes
    gather_calls = timers.calls["allgather-post"] - before_calls
    logger.finalize()
    for t, r in runs.items():
        n = len(r["steps"])
        result = {
            "mode": mode,
            "torch_threads": t,
            "rank": rank,
            "world_size": world,
            "batch_size": BATCH,
            "steps": n,
            "samples": n * BATCH,
            "seconds": r["elapsed"],
            "step_s": r["steps"],
            "phases_s_per_step": {k: v / n for k, v in sorted(r["phases"].items())},
            "writer_thread_s_per_step": r["writer_s"] / n,
            "collective_calls_per_step": {k: v / n for k, v in collectives.items()},
            "allgather_MB_per_step": gathered_bytes / len(batches) / 1e6,
            "allgather_calls_per_step": gather_calls / len(batches),
            "foreign_thread_calls": timers.foreign_calls,
        }
        (out / f"{mode}-{t}t-rank{rank}.json").write_text(json.dumps(result))


def breakdown(res: dict[str, Any]) -> dict[str, Any]:
    """Seconds per step in each part (they sum to the measured step time) and each part's share."""
    ph = res["phases_s_per_step"]
    parts = {name: sum(ph.get(p, 0.0) for p in phases) for name, phases in PARTS.items()}
    unknown = sorted(set(ph) - {p for phases in PARTS.values() for p in phases})
    wall = res["seconds"] / res["steps"]
    return {
        "s_per_step": parts,
        "share": {k: v / wall for k, v in parts.items()},
        "sum_of_parts_s": sum(parts.values()),
        "wall_step_s": wall,
        "unmapped_phases": unknown,
        "weight_gathering_s": {p: ph.get(p, 0.0) for p in PARTS["weight gathering"]},
        "writer_thread_s": res["writer_thread_s_per_step"],
    }


def _launch(mode: str, out: Path, n_samples: int) -> list[dict[str, Any]]:
    threads = "1" if mode == "zero3" else "2"
    # PASSIVE: OpenMP threads sleep at barriers instead of spinning; with the 2 cores shared, a
    # spinning 2-thread process was 3.5x slower (6 s vs 1.7 s a step at load average 4.7).
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE.parent),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": threads,
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    script = [str(Path(__file__).resolve()), "--worker", mode, str(out), str(n_samples)]
    if mode == "zero3":  # --standalone: a free rendezvous port, no clash with other jobs on 29500
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    else:
        cmd = [sys.executable, *script]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} job failed:\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{mode}-*.json"))]


def _throughput(runs: list[dict[str, Any]]) -> float:
    """Samples of all ranks over the slowest rank's time (the job ends with its last rank)."""
    return sum(r["samples"] for r in runs) / max(r["seconds"] for r in runs)


def run(quick: bool = False) -> dict[str, Any]:
    n = 32 if quick else N_SAMPLES
    with tempfile.TemporaryDirectory(prefix="logra-dist-bench-") as tmp:
        single = {r["torch_threads"]: r for r in _launch("single", Path(tmp) / "single", n)}
        zero3 = sorted(_launch("zero3", Path(tmp) / "zero3", n), key=lambda r: r["rank"])
    ref, ref1, z = _throughput([single[2]]), _throughput([single[1]]), _throughput(zero3)
    return {
        "status": "measured",
        "model": "large",
        "k": 16,
        "hessian": "kfac",
        "samples": n,
        "method": "one timed run per job; breakdown from exclusive main-thread timers in the same steps",
        "single_2threads": {**single[2], "samples_per_s": ref, "breakdown": breakdown(single[2])},
        "single_1thread": {**single[1], "samples_per_s": ref1, "breakdown": breakdown(single[1])},
        "zero3_2ranks": {"samples_per_s": z, "ranks": [{**r, "breakdown": breakdown(r)} for r in zero3]},
        "throughput_ratio_zero3_over_single": z / ref,
        "throughput_ratio_zero3_over_single_1thread": z / ref1,
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        print(json.dumps(run("--quick" in sys.argv), indent=1))
