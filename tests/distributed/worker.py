"""One process of a distributed logging test: runs several cases in ONE process group.

Launched by test_engines.py under `deepspeed --num_gpus 2`, `torchrun`, `mpiexec` or two
multi-node `torchrun`s; `log_case` also runs in-process (engine "none") as the single-process
reference. Per case and rank it writes `<out>/<case>/report-rank<R>.json`: the collectives seen
while logging and at finalize (torch profiler: every c10d op, whichever library issued it),
batch counts, projection checks, throughput and peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from logra_dist import LoGraConfig, attach
from logra_dist.engines import launch

VOCAB = 260
REPO = Path(__file__).resolve().parents[2]
# name -> (config under configs/ or engine name, dtype override, data split, how it is made,
#          option overrides). how: "load" = our loader; "train" = a user's training engine with
#          its own optimizer, stepped before and after logging; "module" = the bare module inside
#          a ZeRO-3 engine (sharded weights, no wrapper).
CASES = {
    "none": ("none", None, "even", "load", {}),
    "zero3": ("zero3.json", None, "even", "load", {}),
    "zero3-empty": ("zero3.json", None, "empty", "load", {}),
    "zero3-bf16": ("zero3.json", "bfloat16", "even", "load", {}),
    "zero3-trained": ("zero3.json", None, "uneven", "train", {}),
    "zero3-module": ("zero3.json", None, "uneven", "module", {}),
    "zero2-trained": ("zero2.json", None, "uneven", "train", {}),
    "zero1-trained": ("zero1", None, "even", "train", {}),
    "zero0": ("zero0", None, "uneven", "load", {}),
    "fsdp2": ("fsdp2.json", None, "even", "load", {}),
    "fsdp2-empty": ("fsdp2.json", None, "empty", "load", {}),
    "fsdp2-trained": ("fsdp2.json", None, "uneven", "train", {}),
    "fsdp1": ("fsdp1.json", None, "uneven", "load", {}),
    "fsdp1-flat-trained": ("fsdp1.json", None, "empty", "train", {"use_orig_params": False}),
    "ddp": ("ddp.json", None, "even", "load", {}),
    "ddp-empty": ("ddp.json", None, "empty", "load", {}),
}


# sharded loading of a tied-embedding checkpoint: name -> (config, dtype, option overrides)
LOAD_CHECKS = {
    "zero3": ("zero3.json", None, {}),
    "zero3-bf16": ("zero3.json", "bfloat16", {}),
    "fsdp2": ("fsdp2.json", None, {}),
    "fsdp2-mixed": ("fsdp2.json", None, {"mixed_precision": {"param_dtype": "bfloat16", "reduce_dtype": "float32"}}),
    "fsdp1": ("fsdp1.json", None, {}),
}


def load_check(model_path: str, names: list[str], rank: int) -> dict[str, dict]:
    """Load with each engine and compare logits with a plain from_pretrained model."""
    from transformers import AutoModelForCausalLM

    from logra_dist.engines.loading import load_causal_lm
    from logra_dist.engines.spec import read_spec

    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids, mask = batch(samples(3, seed=5), "cpu")
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    out = {}
    for name in names:
        source, dtype, options = LOAD_CHECKS[name]
        spec = read_spec(REPO / "configs" / source, dtype)
        spec.options.update(options)
        loaded = load_causal_lm(model_path, spec=spec)
        forward = loaded.wrapped.module if spec.engine.startswith("zero") else loaded.wrapped
        with torch.no_grad():
            got = forward(input_ids=ids, attention_mask=mask).logits.float()
        out[name] = {
            "rel_err": float((got - expected).abs().max() / expected.abs().max()),
            "local_param_numel": local_param_numel(loaded.module),
            "param_dtypes": sorted({str(p.dtype) for p in loaded.module.parameters()}),
        }
        del loaded, forward
        gc.collect()
    return out


def case_spec(name: str):
    from logra_dist.engines.spec import default_spec, read_spec

    source, dtype, _, _, options = CASES[name]
    spec = read_spec(REPO / "configs" / source, dtype) if source.endswith(".json") else default_spec(source, dtype)
    spec.options.update(options)
    return spec


def save_tiny_llama(path: str | Path, seed: int = 0, tied: bool = False, shard_size: str | None = None) -> Path:
    """The test model: a Llama small enough for CPU, saved as a local Hugging Face checkpoint
    (tied: lm_head shares the embedding; shard_size: several safetensors files + index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    LlamaForCausalLM(cfg).save_pretrained(str(path), **kwargs)
    return Path(path)


def logra_config(flush_rows: int = 4) -> LoGraConfig:
    # flush_rows=4: several commit points per shard, so partial-stat commits run too
    return LoGraConfig(
        k_in=4, k_out=4, seed=3, storage_dtype="float32", compute_dtype="float32", hessian="raw", flush_rows=flush_rows
    )


def samples(n: int, seed: int = 0, min_len: int = 4, max_len: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    return [torch.randint(1, VOCAB, (int(n_),), generator=gen) for n_ in lengths]


def assignment(n: int, world: int, rank: int, split: str) -> list[int]:
    """Global ids this rank logs. uneven: rank r gets a share proportional to (world - r);
    empty: the last rank gets none."""
    ids = list(range(n))
    if split == "even":
        return ids[rank::world]
    if split == "empty":
        return [] if rank == world - 1 else ids[rank :: max(world - 1, 1)]
    weights = [world - r for r in range(world)]
    bounds = [round(n * sum(weights[:r]) / sum(weights)) for r in range(world + 1)]
    return ids[bounds[rank] : bounds[rank + 1]]


def batch(seqs: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids.to(device), mask.to(device)


def summed_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample token losses summed (not averaged), then summed over the batch."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (nll * mask[:, 1:]).sum()


def _collectives(prof) -> dict[str, int]:
    return dict(Counter(e.name for e in prof.events() if e.name.startswith("c10d::")))


def _profile():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def make_engine(name: str, model_path: str):
    """("load") our sharded loader, or ("train") a user's training engine: built with its own
    optimizer and stepped once at lr=0 (weights unchanged, so rows still match the reference).
    Returns (object for attach, device, a training step to run after logging or None)."""
    from logra_dist.engines.loading import load_causal_lm, load_zero3_model

    spec, how = case_spec(name), CASES[name][3]
    if how in ("load", "module"):
        loaded = load_causal_lm(model_path, spec=spec)
        return loaded.module if how == "module" else loaded.wrapped, loaded.device, None
    device = torch.device("cpu")
    if spec.engine.startswith("zero"):  # as a user would: own optimizer, engine.backward/step
        import deepspeed
        from transformers import AutoModelForCausalLM

        ds = dict(spec.ds_config, zero_allow_untested_optimizer=True)
        if spec.engine == "zero3":
            model = load_zero3_model(model_path, spec.dtype, ds, dist.get_rank())
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=spec.dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        wrapped, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        step = lambda loss: (wrapped.backward(loss), wrapped.step())  # noqa: E731
    else:
        wrapped = load_causal_lm(model_path, spec=spec).wrapped
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
        step = lambda loss: (loss.backward(), opt.step(), opt.zero_grad())  # noqa: E731
    train_step(wrapped, step, device)
    return wrapped, device, lambda: train_step(wrapped, step, device)


def local_param_numel(root: torch.nn.Module) -> int:
    """Weight elements this rank actually holds (ZeRO-3 partition, FSDP local shard)."""
    total = 0
    for p in root.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel()  # the partition; p itself is empty unless gathered
        elif hasattr(p, "to_local"):
            total += p.to_local().numel()
        else:
            total += p.numel()
    return total


def train_step(wrapped, step, device) -> None:
    ids, mask = batch(samples(2, seed=99), device)
    step(wrapped(input_ids=ids, attention_mask=mask).logits.float().square().mean())


def projections_plain(logger) -> bool:
    """Every projection is a plain, full-size tensor held by the logger: not a parameter or
    buffer of the model, not a ZeRO-partitioned (ds_id) or FSDP (DTensor) tensor."""
    owned = {id(t) for t in list(logger.engine.root.parameters()) + list(logger.engine.root.buffers())}
    for s in logger.specs:
        p_in, p_out = logger.projections[s.name]
        for t, shape in ((p_in, (s.k_in, s.d_in)), (p_out, (s.k_out, s.d_out))):
            if type(t) is not torch.Tensor or hasattr(t, "ds_id") or id(t) in owned or tuple(t.shape) != shape:
                return False
    return True


def log_case(
    model_or_engine,
    device,
    out: Path,
    split: str,
    n: int,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    max_len: int = 16,
    profile: bool = True,
    flush_rows: int = 4,
) -> dict:
    """Log samples 0..n-1 (this rank's share) to `out`; returns the report."""
    logger = attach(model_or_engine, logra_config(flush_rows), out)
    data = samples(n, max_len=max_len)
    mine = assignment(n, world, rank, split)
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    steps = logger.engine.lockstep_batches(len(chunks))
    tokens, shadow = 0, 0
    t0 = time.perf_counter()
    with _profile() if profile else nullcontext() as prof:
        for step in range(steps):
            ids = chunks[step] if step < len(chunks) else []
            shadow += not ids
            input_ids, mask = batch([data[i] for i in ids] if ids else [torch.tensor([1])], device)
            with logger.capture(torch.tensor(ids, dtype=torch.int64), mask=mask if ids else None):
                logits = logger.model(input_ids=input_ids, attention_mask=mask).logits
                logger.backward(summed_loss(logits, input_ids, mask))
            tokens += int(mask.sum()) if ids else 0
    elapsed = time.perf_counter() - t0
    logging_ops = _collectives(prof) if profile else None
    with _profile() as prof:
        manifest = logger.finalize()
    root = logger.engine.root
    report = {
        "rank": rank,
        "world": world,
        "ids": mine,
        "batches": len(chunks),
        "steps": steps,
        "shadow_batches": shadow,
        "logging_collectives": logging_ops,
        "finalize_collectives": _collectives(prof),
        "layers": [s.name for s in logger.specs],
        "projections_plain": projections_plain(logger),
        "engine_kind": logger.engine.kind,
        "manifest_shards": manifest["shards"],
        "local_param_numel": local_param_numel(root),
        "weight_grads": sum(p.grad is not None for p in root.parameters()),
        "tokens": tokens,
        "zero3_gathered_numel": sum(p.numel() for p in root.parameters() if hasattr(p, "ds_tensor")),
        "seconds": elapsed,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    logger.close()
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", required=True, help="comma-separated names from CASES")
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=16, help="longest sample, tokens")
    ap.add_argument("--flush-rows", type=int, default=4)
    ap.add_argument("--no-profile", action="store_true", help="for timing: no collective counting")
    ap.add_argument("--load-check", default=None, help="MODEL_DIR:name,name (see LOAD_CHECKS)")
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args()
    info = launch.init_distributed(require_group=True, timeout_s=120)
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.load_check:
        model_path, names = args.load_check.split(":")
        result = load_check(model_path, names.split(","), info.rank)
        (Path(args.out) / f"load-check-rank{info.rank}.json").write_text(json.dumps(result))
    for name in args.cases.split(","):
        t0 = time.perf_counter()
        wrapped, device, after = make_engine(name, args.model)
        out = Path(args.out) / name
        report = log_case(
            wrapped,
            device,
            out,
            CASES[name][2],
            args.samples,
            args.batch_size,
            info.rank,
            info.world_size,
            args.max_len,
            not args.no_profile,
            args.flush_rows,
        )
        if after is not None:
            after()  # the user's training continues after logging: requires_grad was restored
        report.update(
            case_seconds=time.perf_counter() - t0,
            launcher=info.launcher,
            local_rank=info.local_rank,
            env=env,
            trained_after=after is not None,
        )
        (out / f"report-rank{info.rank}.json").write_text(json.dumps(report))
        del wrapped, after
        gc.collect()
        dist.barrier()
    launch.destroy_distributed()
    launch.exit_process(0)


if __name__ == "__main__":
    main()
