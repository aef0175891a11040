"""Finalize time against world size, and as a share of the logging time (issue 13, item 4).

    python bench/finalize.py                      # both parts, JSON to bench/results/finalize.json
    python bench/finalize.py --layers '.*'        # part 1 on all 57 layers (~3.8 GB per rank, long)

1. hessian="raw", k=64 on the large bench model (25M parameters, bench/common.py): the same
   samples logged by 1 rank with 2 threads and by 2 ranks with 1 thread each (`torchrun
   --standalone`, gloo; the same 2 cores), then `Logger.finalize()` timed: the reduction onto
   the owner ranks, the per-layer eigh, the transfer to rank 0 and rank 0 writing stats.h5. By
   default only the layers matching LAYERS (block 0 and lm_head: 8 layers of 4096 x 4096
   Fishers; each eigh takes ~10-20 s here, all 57 would take over 10 minutes on 1 rank).
   Target: 2 ranks <= 0.6x of 1 rank.
2. The bench run at k=16 (bench/distributed_overhead.py's: 2 ranks, 64 samples, B=4 per rank,
   T=128, every layer), with hessian="raw" (the costliest finalize): finalize time / logging time.
   Target: <= 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS = r"model\.layers\.0\.|lm_head"
BATCH, SEQ = 4, 128


def worker(args) -> None:
    import torch

    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from common import build_model, fixed_batches, large_config, tokenizer

    import logra_dist
    from logra_dist import LoGraConfig, comm
    from logra_dist.data import summed_lm_loss
    from logra_dist.engines.launch import destroy_distributed, init_distributed

    init_distributed()
    rank, world = comm.rank(), comm.world_size()
    torch.set_num_threads(max(1, args.threads // world))
    tok = tokenizer()
    model = build_model(large_config(tok))
    batches = fixed_batches(tok, BATCH, SEQ, args.samples // BATCH)[rank::world]
    config = LoGraConfig(k_in=args.k, k_out=args.k, hessian="raw", include=[args.layers], compute_dtype="float32")
    logger = logra_dist.attach(model, config, args.index, commit_seconds=1e9)
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        ids = torch.arange(i * BATCH, (i + 1) * BATCH) + rank * 10_000
        with logger.capture(ids, mask=batch.attention_mask):
            logits = logger.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logger.backward(summed_lm_loss(logits, batch.labels))
    comm.barrier()
    logging_s = time.perf_counter() - start
    start = time.perf_counter()
    logger.finalize()
    finalize_s = time.perf_counter() - start
    report = logger.finalize_report
    parts = comm.all_gather_objects(report.figures() if report else {})  # every rank's, to see who waits
    logger.close()
    if rank == 0:
        out = {
            "world": world,
            "threads_per_rank": torch.get_num_threads(),
            "layers": len(logger.specs),
            "k": args.k,
            "samples": args.samples,
            "logging_s": logging_s,
            "finalize_s": finalize_s,
            "finalize_parts_rank0": parts[0],
            "finalize_parts_per_rank": parts,
            "float64_layers": report.float64_layers if report else [],
        }
        Path(args.result).write_text(json.dumps(out))
    destroy_distributed()


def launch(world: int, k: int, layers: str, samples: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        cmd += [__file__, "--worker", "--index", f"{tmp}/index", "--result", str(result), "--k", str(k)]
        cmd += ["--layers", layers, "--samples", str(samples), "--threads", str(threads)]
        env = dict(os.environ, PYTHONPATH=str(HERE.parent), WANDB_MODE="disabled", OMP_NUM_THREADS=str(threads))
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: a spinning 2-thread BLAS stalls (figure 5)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index")
    ap.add_argument("--result")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layers", default=LAYERS, help="regex of the layers of part 1")
    ap.add_argument("--samples", type=int, default=32, help="part 1 (finalize's cost does not depend on it)")
    ap.add_argument("--threads", type=int, default=2, help="cores shared by the ranks")
    ap.add_argument("--out", default=str(HERE / "results" / "finalize.json"))
    ap.add_argument("--skip-share", action="store_true", help="part 1 only")
    ap.add_argument("--repeat", type=int, default=1, help="part 1: pairs of 1- and 2-rank runs, interleaved")
    ap.add_argument("--entry", default="world_size", help="part 1's key in --out (other keys are kept)")
    args, _ = ap.parse_known_args()
    if args.worker:
        worker(args)
        return
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    pairs = [pair(args) for _ in range(args.repeat)]
    ratios = sorted(p["ratio_2_over_1"] for p in pairs)
    eigh = sorted(p["eigh_phase_ratio_2_over_1"] for p in pairs)
    median = ratios[len(ratios) // 2]
    result[args.entry] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "cd bench && python " + " ".join(sys.argv),
        "pairs": pairs,
        "ratio_2_over_1": median,
        "ratio_range": [ratios[0], ratios[-1]],
        "eigh_phase_ratio_median": eigh[len(eigh) // 2],
        "target": 0.6,
        "met": median <= 0.6,
    }
    if not args.skip_share:
        run = launch(2, 16, ".*", 64, args.threads)
        share = run["finalize_s"] / run["logging_s"]
        result["share_k16"] = {"run": run, "finalize_over_logging": share, "target": 0.10, "met": share <= 0.10}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result[args.entry], indent=2))


def pair(args) -> dict:
    """One 1-rank and one 2-rank run back to back, with the load average around each; ratios of
    the whole finalize and of its eigh phase (rank 0: its eighs, the round waits, the transfers)."""
    runs: dict = {}
    for world in (1, 2):
        before = os.getloadavg()
        runs[str(world)] = launch(world, args.k, args.layers, args.samples, args.threads)
        runs[str(world)]["load_average_before_after"] = [before, os.getloadavg()]

    def eigh_phase(run: dict) -> float:
        parts = run["finalize_parts_rank0"]
        return sum(parts[f"time/finalize-{p}"] for p in ("eigh", "wait", "transfer"))

    runs["ratio_2_over_1"] = runs["2"]["finalize_s"] / runs["1"]["finalize_s"]
    runs["eigh_phase_ratio_2_over_1"] = eigh_phase(runs["2"]) / eigh_phase(runs["1"])
    print(json.dumps({k: v for k, v in runs.items() if "ratio" in k}), flush=True)
    return runs


if __name__ == "__main__":
    main()
