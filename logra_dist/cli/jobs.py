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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from logra_dist import comm
from logra_dist.cli.parser import check_args
from logra_dist.config import PRESETS, ConfigError, LoGraConfig
from logra_dist.core.curvature import CURVATURES
from logra_dist.core.fisher import FisherTargets
from logra_dist.data import DataIdentity, Document, pad_token_id, rank_samples, read_documents, tokenize
from logra_dist.engines.launch import init_distributed
from logra_dist.session import run_samples

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
    engine, _device = build(None, model_path, args.config, args.dtype)
    return engine, load_tokenizer(model_path), str(model_path)


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


def load_documents(data: Sequence[str] | None) -> list[Document]:
    if not data or data == [EMBEDDED]:
        from logra_dist.embedded import load_corpus

        return [Document(int(r["id"]), r["text"]) for r in load_corpus()]
    return read_documents(list(data))


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


def training_data(manifest: dict) -> list[str] | None:
    data = manifest.get("metadata", {}).get("data", EMBEDDED)
    return None if data == EMBEDDED else data


# -- log ------------------------------------------------------------------------------------------
def run_log(args: argparse.Namespace) -> dict[str, Any]:
    from logra_dist.logger import attach

    check_args(args)
    config = logra_config(args)  # validated before any work starts
    init_distributed()
    docs = load_documents(args.data)
    model, tokenizer, model_path = load_engine(args)
    samples = tokenize(docs, tokenizer, args.max_length)
    mine = rank_samples(samples, comm.rank(), comm.world_size(), args.max_samples)
    dtype = compute_dtype(model)
    if args.dtype is not None and dtype != args.dtype:  # spec.py refuses this first; never record a wish
        raise SystemExit(f"--dtype {args.dtype} was asked for but the engine computes in {dtype}")
    metadata = {
        "data": list(args.data) if args.data else EMBEDDED,
        "max_samples": args.max_samples,
        "max_length": args.max_length,
        "model_path": model_path,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "dtype": dtype,  # the model's compute dtype
    }
    data = DataIdentity.of(  # every rank digests every logged sample: the same identity everywhere
        samples[: args.max_samples],
        args.data if args.data and args.data != [EMBEDDED] else None,
        max_length=args.max_length,
        max_samples=args.max_samples,
        model_dtype=dtype,
    )
    tracker = make_tracker(args, "log", {"logra": config.to_dict(), "metadata": metadata}, len(mine))
    logger = attach(model, config, args.out, resume=args.resume, metadata=metadata, data=data, tracker=tracker)
    try:
        pad_id = pad_token_id(tokenizer)
        todo = [s for s in mine if s.id not in logger.done_ids]
        if logger.needs_pca_pass:
            with logger.pca_pass():
                run_samples(logger, todo, args.batch_size, pad_id)
        start = time.perf_counter()
        statistics = None
        if config.fisher == "true" and CURVATURES.get(config.hessian).needs_statistics:
            statistics = FisherTargets.for_config(config)
        tokens = run_samples(logger, todo, args.batch_size, pad_id, tracker, statistics=statistics)
        elapsed = time.perf_counter() - start
        with tracker.phase("finalize"):
            manifest = logger.finalize()
    finally:
        logger.close()  # unfinalized (error, SIGINT/SIGTERM): the partial shard is kept for --resume
    tracker.finish(
        {
            "index/total_rows": manifest["total_rows"],
            "index/width": manifest["width"],
            "index/shards": len(manifest["shards"]),
        }
    )
    say(
        f"logged {manifest['total_rows']} samples into {args.out} ({len(manifest['shards'])} shard(s), "
        f"D={manifest['width']}); rank 0: {tokens} tokens in {elapsed:.2f}s = "
        f"{tokens / max(elapsed, 1e-9):.0f} tokens/s"
    )
    return manifest
