"""Command line: `logra-dist log|score|inspect|report ...` (`launch/log.py`, `launch/score.py` wrap the first two).

Both jobs run unchanged on one process (`python launch/log.py`) or under a launcher
(`deepspeed`, `torchrun`, `mpiexec`): the engine config (`--config`) picks ZeRO-3, FSDP or DDP,
and every rank takes its strided share of the samples (or queries).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from . import comm
from .config import LoGraConfig
from .data import (Batch, Document, batches, pad_token_id, rank_samples, read_documents, summed_lm_loss,
                   tokenize)

EMBEDDED = "embedded"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="engine config: DeepSpeed JSON (configs/zero3.json) or "
                   "FSDP/DDP JSON (configs/fsdp2.json); default: a plain module on each process")
    p.add_argument("--model", default=None, help="local Hugging Face causal-LM checkpoint "
                   "(default: the bundled tiny Llama, trained on first use)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample (longer are truncated)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (also WANDB_MODE=disabled); by default "
                   "rank 0 records one, offline unless an API key is configured")
    p.add_argument("--wandb-project", default=None, help="W&B project (default: $WANDB_PROJECT or logra-dist)")
    p.add_argument("--log-every", type=int, default=10, help="batches between W&B figures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logra-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    log = sub.add_parser("log", help="log projected per-sample gradients of a corpus into an index")
    _add_common(log)
    log.add_argument("--data", nargs="*", default=None, help="jsonl or text files (default: bundled corpus)")
    log.add_argument("--out", default="runs/index", help="index directory")
    log.add_argument("--max-samples", type=int, default=None, help="log only the first N samples")
    log.add_argument("--logra", default=None, help="LoGraConfig as a JSON file, or an index directory whose "
                     "config to reuse (e.g. to log queries for `score --query-index`); flags below override it")
    log.add_argument("--k-in", type=int, default=None)
    log.add_argument("--k-out", type=int, default=None)
    log.add_argument("--init", default=None, choices=["random", "pca", "identity"])
    log.add_argument("--hessian", default=None, choices=["raw", "kfac", "none"])
    log.add_argument("--storage-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    log.add_argument("--damping", type=float, default=None)
    log.add_argument("--seed", type=int, default=None)
    log.add_argument("--include", nargs="*", default=None, help="regexes of layer names to log")
    log.add_argument("--exclude", nargs="*", default=None, help="regexes of layer names to skip")
    log.add_argument("--resume", action="store_true", help="continue an interrupted job in --out with the same "
                     "settings and world size; starts fresh if there is nothing to continue")

    score = sub.add_parser("score", help="top-k training examples for each query")
    _add_common(score)
    score.add_argument("--index", required=True, help="index directory written by `log`")
    _add_query_sources(score)
    score.add_argument("--topk", type=int, default=10)
    score.add_argument("--mode", default="relatif", choices=["dot", "relatif", "cosine"])
    score.add_argument("--damping", type=float, default=None, help="override the index's damping factor")
    score.add_argument("--out", default=None, help="directory for topk.h5 and the listing (default: print)")

    inspect = sub.add_parser("inspect", help="what an index holds: shards, rows, layout, completeness, norms, disk use")
    inspect.add_argument("index", help="index directory (complete or partial)")
    inspect.add_argument("--sample-rows", type=int, default=256, help="rows per shard read for the norm summary")
    inspect.add_argument("--json", action="store_true", help="print the facts as JSON")

    report = sub.add_parser("report", help="an HTML page of top-k attributions from a `score --out` directory")
    report.add_argument("results", help="directory holding topk.h5 and topk.jsonl")
    report.add_argument("--out", default=None, help="HTML file (default: RESULTS/report.html)")
    report.add_argument("--max-queries", type=int, default=50)
    report.add_argument("--max-chars", type=int, default=600, help="characters shown per text")
    return parser


# -- shared job pieces --------------------------------------------------------------------------
def load_engine(args: argparse.Namespace):
    """(model or engine for attach, tokenizer, model path). The only place the CLI touches a
    training stack: `engines.loading.build` loads the checkpoint sharded per `--config`."""
    from .embedded import load_tokenizer
    from .engines.loading import build

    model_path = Path(args.model) if args.model else _default_model_path()
    check_context(model_path, args.max_length)
    engine, _device = build(None, model_path, args.config, getattr(torch, args.dtype))
    return engine, load_tokenizer(model_path), str(model_path)


def check_context(model_path: Path, max_length: int) -> None:
    """--max-length must fit the model's context: read from config.json before loading weights."""
    config_file = model_path / "config.json"
    if not config_file.is_file():
        raise SystemExit(f"--model {model_path}: no config.json (expected a local Hugging Face checkpoint)")
    cfg = json.loads(config_file.read_text())
    context = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(cfg.get(k), int)), None)
    if context is not None and max_length > context:
        raise SystemExit(f"--max-length {max_length} exceeds the context of {model_path} "
                         f"(max_position_embeddings={context}); use --max-length {context} or less")


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of the command line, before any process group, model or data is touched."""
    for name, low in (("batch_size", 1), ("max_length", 2), ("max_samples", 1), ("topk", 1)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _default_model_path() -> Path:
    """Rank 0 trains the bundled model on first use; the others wait (ensure_default_model locks)."""
    from .embedded import ensure_default_model

    return ensure_default_model()


def load_documents(data: Sequence[str] | None) -> list[Document]:
    if not data or data == [EMBEDDED]:
        from .embedded import load_corpus

        return [Document(int(r["id"]), r["text"]) for r in load_corpus()]
    return read_documents(list(data))


def _logra_config(args: argparse.Namespace) -> LoGraConfig:
    base: dict[str, Any] = {}
    if args.logra:  # a JSON file, or an index whose config to reuse
        path = Path(args.logra)
        base = json.loads((path / "manifest.json").read_text())["config"] if path.is_dir() \
            else json.loads(path.read_text())
    for key in ("k_in", "k_out", "init", "hessian", "storage_dtype", "damping", "seed", "include", "exclude"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    return LoGraConfig.from_dict(base)


def _say(*parts: Any) -> None:
    if comm.rank() == 0:
        print(*parts, flush=True)


def _init_distributed() -> None:
    from .engines.launch import init_distributed

    init_distributed()


def _tracker(args: argparse.Namespace, job: str, config: dict[str, Any], total: int):
    """Timers, progress and the job's W&B run (rank 0; offline without an API key)."""
    from .logger import versions
    from .tracking import Tracker, start_wandb

    wandb_config = {"job": job, "args": {k: v for k, v in vars(args).items() if k != "local_rank"},
                    "world_size": comm.world_size(), "versions": versions(), **config}
    run = start_wandb(job, wandb_config, no_wandb=args.no_wandb, project=args.wandb_project, rank=comm.rank())
    return Tracker(job, total=total, log_every=args.log_every, wandb_run=run)


# -- log ------------------------------------------------------------------------------------------
def run_log(args: argparse.Namespace) -> dict[str, Any]:
    from .logger import attach

    check_args(args)
    config = _logra_config(args)  # validated before any work starts
    _init_distributed()
    docs = load_documents(args.data)
    model, tokenizer, model_path = load_engine(args)
    samples = tokenize(docs, tokenizer, args.max_length)
    mine = rank_samples(samples, comm.rank(), comm.world_size(), args.max_samples)
    metadata = {"data": list(args.data) if args.data else EMBEDDED, "max_samples": args.max_samples,
                "max_length": args.max_length, "model_path": model_path}
    tracker = _tracker(args, "log", {"logra": config.to_dict(), "metadata": metadata}, len(mine))
    logger = attach(model, config, args.out, resume=args.resume, metadata=metadata, tracker=tracker)
    pad_id = pad_token_id(tokenizer)
    todo = [s for s in mine if s.id not in logger.done_ids]
    if logger.needs_pca_pass:
        with logger.pca_pass():
            run_batches(logger, todo, args.batch_size, pad_id)
    start = time.perf_counter()
    tokens = run_batches(logger, todo, args.batch_size, pad_id, tracker)
    elapsed = time.perf_counter() - start
    with tracker.phase("finalize"):
        manifest = logger.finalize()
    logger.close()
    tracker.finish({"index/total_rows": manifest["total_rows"], "index/width": manifest["width"],
                    "index/shards": len(manifest["shards"])})
    _say(f"logged {manifest['total_rows']} samples into {args.out} ({len(manifest['shards'])} shard(s), "
         f"D={manifest['width']}); rank 0: {tokens} tokens in {elapsed:.2f}s = {tokens / max(elapsed, 1e-9):.0f} tokens/s")
    return manifest


def run_batches(session, samples, batch_size: int, pad_id: int, tracker=None) -> int:
    """Capture this rank's samples batch by batch; returns its token count. Under ZeRO-3/FSDP
    every forward is collective, so a rank with fewer batches than its peers runs shadow batches
    (no ids: hooks fire, nothing is recorded) until all ranks have run the same number."""
    mine = list(batches(samples, batch_size, pad_id))
    steps = session.engine.lockstep_batches(len(mine))
    shadow = Batch(torch.zeros(0, dtype=torch.long), torch.full((1, 2), pad_id), torch.ones(1, 2, dtype=torch.long),
                   torch.full((1, 2), pad_id))
    tokens = 0
    for i in range(steps):
        batch = mine[i] if i < len(mine) else shadow
        _capture(session, batch, tracker)
        tokens += int(batch.attention_mask.sum()) if i < len(mine) else 0
    return tokens


def _capture(session, batch, tracker=None) -> None:
    """One batch through capture; with a tracker: forward/backward timed, samples and tokens counted."""
    from .tracking import NULL_TRACKER

    tracker = tracker or NULL_TRACKER
    tokens = int(batch.attention_mask.sum())  # on the CPU copy: no device sync
    batch = batch.to(session.device)
    with session.capture(batch.ids, mask=batch.attention_mask):
        with tracker.phase("forward"):
            out = session.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            loss = summed_lm_loss(out.logits, batch.labels)
        with tracker.phase("backward"):
            session.backward(loss)
    tracker.step(samples=len(batch.ids), tokens=tokens)


# -- score ----------------------------------------------------------------------------------------
def run_score(args: argparse.Namespace):
    from .reader import read_manifest
    from .scorer import Scorer

    check_args(args)
    if args.query_index is not None or args.prompts is not None:
        from .score_sources import run_score_prompts, run_score_query_index

        return run_score_query_index(args) if args.query_index is not None else run_score_prompts(args)
    _init_distributed()
    queries = read_documents(args.queries)
    index = Path(args.index)
    manifest = read_manifest(index / "manifest.json")
    if args.model is None and manifest.get("metadata", {}).get("model_path"):
        args.model = manifest["metadata"]["model_path"]
    model, tokenizer, _ = load_engine(args)
    tracker = _tracker(args, "score", {"index": str(index), "index_config": manifest.get("config")}, len(queries))
    scorer = Scorer(model, index, mode=args.mode, damping=args.damping, tracker=tracker)
    pad_id = pad_token_id(tokenizer)
    mine = rank_samples(tokenize(queries, tokenizer, args.max_length), comm.rank(), comm.world_size())
    run_batches(scorer, mine, args.batch_size, pad_id, tracker)
    with tracker.phase("score"):  # gemm, topk-reduce and read-wait inside; collective
        result = scorer.topk(args.topk)
    tracker.finish({"score/queries": len(result.query_ids), "score/index_rows": len(scorer.store),
                    "score/k": args.topk})
    from .score_sources import report_scores

    report_scores(args, scorer, result, manifest, {q.id: q.full_text for q in queries})
    scorer.close()
    return result


def _add_query_sources(score: argparse.ArgumentParser) -> None:
    """What to attribute: query texts, a precomputed query index, or the model's own completions."""
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help="jsonl: {\"text\"} or {\"prompt\", \"completion\"}")
    source.add_argument("--query-index", default=None, help="index of query gradients logged by `log --data "
                        "QUERIES --logra <the index's config>`: scored without loading the model")
    source.add_argument("--prompts", default=None, help="jsonl {\"prompt\"} or one prompt per line: the model "
                        "completes each (greedy) and the completion given its prompt is attributed")
    score.add_argument("--max-new-tokens", type=int, default=32, help="with --prompts: tokens generated at most")


def _training_data(manifest: dict) -> list[str] | None:
    data = manifest.get("metadata", {}).get("data", EMBEDDED)
    return None if data == EMBEDDED else data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    if args.command in ("log", "score"):
        from .engines.launch import destroy_distributed

        run_log(args) if args.command == "log" else run_score(args)
        # A gloo group still alive at interpreter exit can abort a finished process ("terminate
        # called without an active exception", pytorch#190489). Only on success: after an error
        # a peer may still sit in a collective, and the launcher tears the job down anyway.
        destroy_distributed()
    elif args.command == "inspect":
        from .inspect_index import inspect_index, render

        facts = inspect_index(args.index, sample_rows=args.sample_rows)
        print(json.dumps(facts, indent=2) if args.json else render(facts))
    elif args.command == "report":
        from .report import write_report

        print(write_report(args.results, args.out, max_queries=args.max_queries, max_chars=args.max_chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
