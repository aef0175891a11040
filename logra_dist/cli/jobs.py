"""The pieces every `logra-dist` job shares (engine and data loading, the tracker) and the `log` job.

Both jobs run unchanged on one process (`python launch/log.py`) or under a launcher
(`deepspeed`, `torchrun`, `mpiexec`): the engine config (`--config`) picks ZeRO-3, FSDP or DDP,
and every rank takes its strided share of the samples (or queries).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from logra_dist import comm
from logra_dist.cli.parser import check_args
from logra_dist.config import MODEL_FISHERS, PRESETS, ConfigError, LoGraConfig
from logra_dist.core.curvature import CURVATURES
from logra_dist.data import (
    Batch,
    DataSpec,
    RankShare,
    data_summary,
    pad_token_id,
    plan_identity,
)
from logra_dist.engines.launch import init_distributed

EMBEDDED = "embedded"


# -- shared job pieces --------------------------------------------------------------------------
def load_engine(args: argparse.Namespace):
    """(model or engine for attach, tokenizer, model path). The only place the CLI touches a
    training stack: `engines.loading.build` loads the checkpoint sharded per `--config`, in the
    precision `--dtype` and the config agree on, with the config's "auto" values resolved."""
    from logra_dist.embedded import load_tokenizer
    from logra_dist.engines.loading import build

    model_path = Path(args.model) if args.model else default_model_path()
    check_context(model_path, args.max_length)
    tokenizer_path = Path(getattr(args, "tokenizer", None) or model_path)
    if not any((tokenizer_path / f).is_file() for f in TOKENIZER_FILES):
        raise SystemExit(f"{tokenizer_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); pass --tokenizer DIR")
    engine, _device = build(None, model_path, args.config, args.dtype)
    return engine, load_tokenizer(tokenizer_path), str(model_path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def compute_dtype(model_or_engine) -> str:
    """The dtype the engine really computes in (its bf16/fp16 switch, FSDP mixed precision, or
    the weights'): what the index records, not what was asked for."""
    from logra_dist.engines import wrap

    return str(wrap(model_or_engine).compute_dtype).removeprefix("torch.")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (96 bits) over the sorted vocabulary and the special tokens with their ids: recorded
    in the manifest (`metadata.tokenizer`), and checked by `score` against the index's."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    text = json.dumps({"vocab": vocab, "special": special, "pad": tokenizer.pad_token_id}, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def check_context(model_path: Path, max_length: int) -> None:
    """--max-length must fit the model's context: read from config.json before loading weights."""
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"--model {model_path}: no config.json (expected a local Hugging Face checkpoint)")
    cfg = json.loads(config_file.read_text())
    context = next(
        (
            cfg[k]
            for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
            if isinstance(cfg.get(k), int)
        ),
        None,
    )
    if context is not None and max_length > context:
        raise SystemExit(
            f"--max-length {max_length} exceeds the context of {model_path} "
            f"(max_position_embeddings={context}); use --max-length {context} or less"
        )


def default_model_path() -> Path:
    """Rank 0 trains the bundled model on first use; the others wait (ensure_default_model locks)."""
    from logra_dist.embedded import ensure_default_model

    return ensure_default_model()


def logra_config(args: argparse.Namespace) -> LoGraConfig:
    base: dict[str, Any] = {}
    if args.logra:  # a JSON file, or an index whose config to reuse
        path = Path(args.logra)
        base = (
            json.loads((path / "manifest.json").read_text())["config"]
            if path.is_dir()
            else json.loads(path.read_text())
        )
    if getattr(args, "preset", None):  # the recipe, then the flags on top of it
        base = {**base, **PRESETS[args.preset], "preset": args.preset}
    keys = (
        "k_in",
        "k_out",
        "ranks",
        "init",
        "hessian",
        "fisher",
        "fisher_samples",
        "storage_dtype",
        "damping",
        "seed",
        "include",
        "exclude",
        "layer_types",
        "optimizer_state",
    )
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    config = LoGraConfig.from_dict(base)
    if config.fisher == "exact":  # the log job trains on text: a next-token softmax over the vocabulary
        raise ConfigError(
            "fisher='exact' sums over a classifier's classes; a causal LM's vocabulary per token is too "
            "large: use --fisher true --fisher-samples S (or the Python API with a classifier)"
        )
    return config


def say(*parts: Any) -> None:
    if comm.rank() == 0:
        print(*parts, flush=True)


def make_tracker(args: argparse.Namespace, job: str, config: dict[str, Any], total: int):
    """Timers, progress and the job's W&B run (rank 0; offline without an API key)."""
    from logra_dist.tracking import Tracker, start_wandb
    from logra_dist.version import versions

    wandb_config = {
        "job": job,
        "args": {k: v for k, v in vars(args).items() if k != "local_rank"},
        "world_size": comm.world_size(),
        "versions": versions(),
        **config,
    }
    run = start_wandb(job, wandb_config, no_wandb=args.no_wandb, project=args.wandb_project, rank=comm.rank())
    return Tracker(job, total=total, log_every=args.log_every, wandb_run=run)


# -- log ------------------------------------------------------------------------------------------
def stream_samples(session, samples, count: int, batch_size: int, pad_id: int, tracker=None, statistics=None) -> int:
    """`session.run_samples` over a stream of `count` samples: batches made as they come."""
    import itertools

    import torch

    from logra_dist.data import collate
    from logra_dist.session import lm_loss, run_batches, statistics_capture
    from logra_dist.tracking import NULL_TRACKER

    def pairs():
        it = iter(samples)
        while block := list(itertools.islice(it, batch_size)):
            batch = collate(block, pad_id)
            yield batch.ids, batch

    shadow = Batch(
        torch.zeros(0, dtype=torch.long),
        torch.full((1, 2), pad_id),
        torch.ones(1, 2, dtype=torch.long),
        torch.full((1, 2), pad_id),
    )
    before = None if statistics is None else statistics_capture(statistics, tracker or NULL_TRACKER)
    count = -(-count // batch_size)
    return run_batches(session, pairs(), lm_loss, count=count, shadow=shadow, tracker=tracker, before=before)


def data_share(args: argparse.Namespace, tokenizer) -> RankShare:
    """This rank's share of --data (or the bundled corpus), read and tokenized as it is logged."""
    embedded = not args.data or args.data == [EMBEDDED]
    spec = DataSpec(
        None if embedded else list(args.data),
        args.max_length,
        args.max_samples,
        chunk=getattr(args, "chunk", False),
        stride=getattr(args, "stride", None),
        skip_bad=getattr(args, "skip_bad", False),
    )
    return RankShare(spec, tokenizer, comm.rank(), comm.world_size(), bundled_items() if embedded else None)


def bundled_items():
    """The bundled corpus as a reader's (where, record) stream, for `data.streaming`."""
    from logra_dist.embedded import load_corpus

    return lambda: ((f"bundled corpus: record {i}", r) for i, r in enumerate(load_corpus()))


def run_log(args: argparse.Namespace) -> dict[str, Any]:
    from logra_dist.logger import attach

    check_args(args)
    config = logra_config(args)  # validated before any work starts
    init_distributed()
    model, tokenizer, model_path = load_engine(args)
    dtype = compute_dtype(model)
    if args.dtype is not None and dtype != args.dtype:  # spec.py refuses this first; never record a wish
        raise SystemExit(f"--dtype {args.dtype} was asked for but the engine computes in {dtype}")
    if args.activation_checkpointing:
        from logra_dist.engines import wrap
        from logra_dist.engines.loading import checkpoint_for_logging

        checkpoint_for_logging(wrap(model).root)
    share = data_share(args, tokenizer)
    # collective (one small all-reduce); bad records raise here, before any shard
    plan, data, report = plan_identity(share, comm.all_reduce_sum, model_dtype=dtype)
    say(data_summary(report, args.max_length))
    metadata = {
        "data": list(args.data) if args.data else EMBEDDED,
        "max_samples": args.max_samples,
        "max_length": args.max_length,
        "model_path": model_path,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": dtype,  # the model's compute dtype
        "tokenizer_path": str(args.tokenizer) if getattr(args, "tokenizer", None) else None,
        "activation_checkpointing": bool(args.activation_checkpointing),  # memory, not the rows
    }
    tracker = make_tracker(args, "log", {"logra": config.to_dict(), "metadata": metadata}, plan.samples)
    logger = attach(model, config, args.out, resume=args.resume, metadata=metadata, data=data, tracker=tracker)
    try:
        from logra_dist.data.table import write_table

        write_table(args.out, comm.rank(), plan)
        logger.metadata["data_report"] = report  # recorded in the manifest at finalize
        pad_id = pad_token_id(tokenizer)
        todo = plan.samples - len(set(plan.table.sample_id) & logger.done_ids)
        if logger.needs_pca_pass:
            with logger.pca_pass():
                stream_samples(logger, share.samples(logger.done_ids), todo, args.batch_size, pad_id)
        start = time.perf_counter()
        statistics = None
        if config.fisher in MODEL_FISHERS and CURVATURES.get(config.hessian).needs_statistics:
            statistics = logger.fisher_targets()  # text: "model" draws fisher_samples next tokens
        samples = share.samples(logger.done_ids)
        tokens = stream_samples(logger, samples, todo, args.batch_size, pad_id, tracker, statistics=statistics)
        elapsed = time.perf_counter() - start
        start_finalize = time.perf_counter()
        with tracker.phase("finalize"):
            manifest = logger.finalize()
        finalize_s = time.perf_counter() - start_finalize
    finally:
        logger.close()  # unfinalized (error, SIGINT/SIGTERM): the partial shard is kept for --resume
    tracker.finish(
        {
            "index/total_rows": manifest["total_rows"],
            "index/width": manifest["width"],
            "index/shards": len(manifest["shards"]),
        },
        metrics_dir=args.out,  # metrics.json beside the index
    )
    say(
        f"logged {manifest['total_rows']} samples into {args.out} ({len(manifest['shards'])} shard(s), "
        f"D={manifest['width']}); rank 0: {tokens} tokens in {elapsed:.2f}s = "
        f"{tokens / max(elapsed, 1e-9):.0f} tokens/s; finalize {finalize_s:.2f}s"
    )
    return manifest
