"""Command line: `logra-dist log|score ...` (and `launch/log.py`, `launch/score.py`, thin wrappers).

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

import numpy as np
import torch

from . import comm
from .config import LoGraConfig
from .data import Document, batches, rank_samples, read_documents, summed_lm_loss, tokenize

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logra-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    log = sub.add_parser("log", help="log projected per-sample gradients of a corpus into an index")
    _add_common(log)
    log.add_argument("--data", nargs="*", default=None, help="jsonl or text files (default: bundled corpus)")
    log.add_argument("--out", default="runs/index", help="index directory")
    log.add_argument("--max-samples", type=int, default=None, help="log only the first N samples")
    log.add_argument("--logra", default=None, help="LoGraConfig as a JSON file (flags below override it)")
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
    score.add_argument("--queries", required=True, help="jsonl: {\"text\"} or {\"prompt\", \"completion\"}")
    score.add_argument("--topk", type=int, default=10)
    score.add_argument("--mode", default="relatif", choices=["dot", "relatif", "cosine"])
    score.add_argument("--damping", type=float, default=None, help="override the index's damping factor")
    score.add_argument("--out", default=None, help="directory for topk.h5 and the listing (default: print)")
    return parser


# -- shared job pieces --------------------------------------------------------------------------
def load_engine(args: argparse.Namespace):
    """(model or engine for attach, tokenizer). The only place the CLI touches a training stack."""
    from .embedded import ensure_default_model, load_model_and_tokenizer

    model_path = Path(args.model) if args.model else _default_model_path()
    check_context(model_path, args.max_length)
    dtype = getattr(torch, args.dtype)
    if args.config is None:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=dtype)
        return model.eval(), tokenizer, str(model_path)
    from .engines.loading import build_engine

    engine, tokenizer = build_engine(args.config, model_path, dtype)
    return engine, tokenizer, str(model_path)


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
    base = json.loads(Path(args.logra).read_text()) if args.logra else {}
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
    logger = attach(model, config, args.out, resume=args.resume, metadata=metadata)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    todo = [s for s in mine if s.id not in logger.done_ids]
    if logger.needs_pca_pass:
        with logger.pca_pass():
            for batch in batches(todo, args.batch_size, pad_id):
                _capture(logger, batch)
    start, tokens = time.perf_counter(), 0
    for batch in batches(todo, args.batch_size, pad_id):
        _capture(logger, batch)
        tokens += int(batch.attention_mask.sum())
    elapsed = time.perf_counter() - start
    manifest = logger.finalize()
    logger.close()
    _say(f"logged {manifest['total_rows']} samples into {args.out} ({len(manifest['shards'])} shard(s), "
         f"D={manifest['width']}); rank 0: {tokens} tokens in {elapsed:.2f}s = {tokens / max(elapsed, 1e-9):.0f} tokens/s")
    return manifest


def _capture(session, batch) -> None:
    batch = batch.to(session.device)
    with session.capture(batch.ids, mask=batch.attention_mask):
        out = session.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        session.backward(summed_lm_loss(out.logits, batch.labels))


# -- score ----------------------------------------------------------------------------------------
def run_score(args: argparse.Namespace):
    from .reader import read_manifest
    from .scorer import Scorer

    check_args(args)
    _init_distributed()
    queries = read_documents(args.queries)
    index = Path(args.index)
    manifest = read_manifest(index / "manifest.json")
    if args.model is None and manifest.get("metadata", {}).get("model_path"):
        args.model = manifest["metadata"]["model_path"]
    model, tokenizer, _ = load_engine(args)
    scorer = Scorer(model, index, mode=args.mode, damping=args.damping)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for batch in batches(tokenize(queries, tokenizer, args.max_length), args.batch_size, pad_id):
        _capture(scorer, batch)
    result = scorer.topk(args.topk)
    scorer.close()
    if comm.rank() == 0:
        train_docs = {d.id: d for d in load_documents(_training_data(manifest))}
        listing = _listing(result, {q.id: q for q in queries}, train_docs)
        if args.out:
            _write_results(Path(args.out), result, listing, args.index)
        print(_markdown(listing, result.mode, result.damping))
    return result


def _training_data(manifest: dict) -> list[str] | None:
    data = manifest.get("metadata", {}).get("data", EMBEDDED)
    return None if data == EMBEDDED else data


def _listing(result, queries: dict[int, Document], train: dict[int, Document]) -> list[dict]:
    out = []
    for row, qid in enumerate(result.query_ids):
        q = queries[int(qid)]
        out.append({"query_id": int(qid), "prompt": q.prompt, "completion": q.text,
                    "top": [{"train_id": int(t), "score": float(s),
                             "text": train[int(t)].full_text if int(t) in train else None}
                            for t, s in zip(result.train_ids[row], result.scores[row])]})
    return out


def _markdown(listing: list[dict], mode: str, damping: float) -> str:
    lines = [f"# Top training examples (mode={mode}, damping={damping})", ""]
    for item in listing:
        query = (item["prompt"] + item["completion"]).replace("\n", " ")
        lines.append(f"## query {item['query_id']}: {query[:200]}")
        for rank, t in enumerate(item["top"], 1):
            text = (t["text"] or "").replace("\n", " ")
            lines.append(f"{rank}. [{t['train_id']}] score={t['score']:.4g}  {text[:160]}")
        lines.append("")
    return "\n".join(lines)


def _write_results(out: Path, result, listing: list[dict], index: str) -> None:
    import h5py

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "topk.h5.tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("scores", data=result.scores.astype(np.float32))
        f.create_dataset("train_ids", data=result.train_ids.astype(np.int64))
        f.create_dataset("query_ids", data=result.query_ids.astype(np.int64))
        f.attrs.update({"mode": result.mode, "damping": result.damping, "index": str(index)})
    tmp.replace(out / "topk.h5")
    (out / "topk.jsonl").write_text("".join(json.dumps(item) + "\n" for item in listing))
    (out / "topk.md").write_text(_markdown(listing, result.mode, result.damping))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    if args.command == "log":
        run_log(args)
    elif args.command == "score":
        run_score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
