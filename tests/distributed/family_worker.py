"""One rank of the model-family matrix: loads every family's checkpoint sharded by ONE engine
config (ZeRO-3 `zero.Init` or FSDP2 meta-device), logs the same samples as the single-process
reference (`log_family` with engine "none", in the test's own process), and writes each family's
index under OUT/<family>/index. All families in one process group: one launch per engine (a
launch costs ~15-25 s of imports and rendezvous on CPU).

argv: --models DIR (a checkpoint folder per family) --out DIR --config configs/X.json --families a,b@bfloat16
(`family@dtype`: that family loaded with that --dtype, into OUT/family@dtype; `family@ckpt` and
`family@ckpt-reentrant`: with Hugging Face activation checkpointing on, non-reentrant / reentrant)
A family that fails to load or log leaves OUT/<family>/error-rank<R>.txt and the loop goes on, so
the test reports the whole pass/fail table, not only the first failure."""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))
import worker  # noqa: E402
from reference import enable_checkpointing  # noqa: E402

from logra_dist import LoGraConfig, attach  # noqa: E402
from logra_dist.engines import launch  # noqa: E402

N_SAMPLES, BATCH = 5, 2


def family_config() -> LoGraConfig:
    # Every Linear, Qwen2-MoE's shared expert included: it runs on tokens flattened to (batch x
    # tokens, d), which the capture maps back to their samples; its d_out=1 shared_expert_gate logs
    # at k_out=1. Routed experts are fused 3-D parameters, not layers; the rows still depend on every
    # expert weight through the backward, so the matrix also checks the experts' sharded loading.
    return LoGraConfig(k_in=4, k_out=4, seed=3, storage_dtype="float32", hessian="raw")


def log_family(wrapped, device, out: Path, rank: int = 0, world: int = 1) -> dict:
    """Log samples 0..N_SAMPLES-1 (this rank's uneven share) into `out`; returns the manifest."""
    logger = attach(wrapped, family_config(), out)
    data = worker.samples(N_SAMPLES)
    mine = worker.assignment(N_SAMPLES, world, rank, "uneven")
    chunks = [mine[i : i + BATCH] for i in range(0, len(mine), BATCH)]
    try:
        for step in range(logger.engine.lockstep_batches(len(chunks))):
            ids = chunks[step] if step < len(chunks) else []
            input_ids, mask = worker.batch([data[i] for i in ids] if ids else [torch.tensor([1])], device)
            with logger.capture(torch.tensor(ids, dtype=torch.int64), mask=mask if ids else None):
                logits = logger.model(input_ids=input_ids, attention_mask=mask).logits
                logger.backward(worker.summed_loss(logits, input_ids, mask))
        return logger.finalize()
    finally:
        logger.close()


def main() -> None:
    from logra_dist.engines.loading import load_causal_lm
    from logra_dist.engines.spec import read_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--families", required=True)
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args()
    info = launch.init_distributed(require_group=True, timeout_s=120)
    for entry in args.families.split(","):
        family, _, variant = entry.partition("@")
        dtype = None if variant.startswith("ckpt") else variant or None
        out = Path(args.out) / entry
        out.mkdir(parents=True, exist_ok=True)
        try:
            loaded = load_causal_lm(Path(args.models) / family, spec=read_spec(args.config, dtype))
            if variant.startswith("ckpt"):
                enable_checkpointing(loaded.module, reentrant=variant == "ckpt-reentrant")
            log_family(loaded.wrapped, loaded.device, out / "index", info.rank, info.world_size)
            del loaded
        except Exception:  # recorded per family; the ranks meet again at the barrier below
            (out / f"error-rank{info.rank}.txt").write_text(traceback.format_exc())
        gc.collect()
        dist.barrier()
    launch.destroy_distributed()
    launch.exit_process(0)


if __name__ == "__main__":
    main()
