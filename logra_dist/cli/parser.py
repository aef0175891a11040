"""The `logra-dist` argument parser and the cheap checks made before any work starts.

Choices come from the registries in `config` (curvature kinds, inits, storage codecs, score
modes), so a new kind shows up here without editing the parser.
"""

from __future__ import annotations

import argparse

from logra_dist.config import HESSIANS, INITS, LAYER_TYPES, SCORE_MODES, STORAGE_DTYPES

DESCRIPTION = "LoGra data valuation: log projected per-sample gradients, score queries, inspect and report."


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="engine config: DeepSpeed JSON (configs/zero3.json) or "
        "FSDP/DDP JSON (configs/fsdp2.json); default: a plain module on each process",
    )
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face causal-LM checkpoint (default: the bundled tiny Llama, trained on first use)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample (longer are truncated)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-wandb",
        action="store_true",
        help="no W&B run (also WANDB_MODE=disabled); by default "
        "rank 0 records one, offline unless an API key is configured",
    )
    p.add_argument("--wandb-project", default=None, help="W&B project (default: $WANDB_PROJECT or logra-dist)")
    p.add_argument("--log-every", type=int, default=10, help="batches between W&B figures")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logra-dist", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)

    log = sub.add_parser("log", help="log projected per-sample gradients of a corpus into an index")
    _add_common(log)
    log.add_argument("--data", nargs="*", default=None, help="jsonl or text files (default: bundled corpus)")
    log.add_argument("--out", default="runs/index", help="index directory")
    log.add_argument("--max-samples", type=int, default=None, help="log only the first N samples")
    log.add_argument(
        "--logra",
        default=None,
        help="LoGraConfig as a JSON file, or an index directory whose "
        "config to reuse (e.g. to log queries for `score --query-index`); flags below override it",
    )
    log.add_argument("--k-in", type=int, default=None)
    log.add_argument("--k-out", type=int, default=None)
    log.add_argument("--init", default=None, choices=list(INITS))
    log.add_argument("--hessian", default=None, choices=list(HESSIANS))
    log.add_argument("--storage-dtype", default=None, choices=list(STORAGE_DTYPES))
    log.add_argument("--damping", type=float, default=None)
    log.add_argument("--seed", type=int, default=None)
    log.add_argument("--include", nargs="*", default=None, help="regexes of layer names to log")
    log.add_argument("--exclude", nargs="*", default=None, help="regexes of layer names to skip")
    log.add_argument(
        "--layer-types",
        nargs="+",
        default=None,
        choices=list(LAYER_TYPES),
        help="kinds of module to log (default: linear conv1d)",
    )
    log.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted job in --out with the same "
        "settings and world size; starts fresh if there is nothing to continue",
    )

    score = sub.add_parser("score", help="top-k training examples for each query")
    _add_common(score)
    score.add_argument("--index", required=True, help="index directory written by `log`")
    _add_query_sources(score)
    score.add_argument("--topk", type=int, default=10, help="results per query (capped at the index's rows)")
    score.add_argument(
        "--query-chunk",
        type=int,
        default=None,
        help="--queries scored this many at a time, so memory does not grow with their number "
        "(default: about 256 MB of query rows per chunk; rounded up to a multiple of ranks x batch size)",
    )
    score.add_argument("--mode", default="relatif", choices=list(SCORE_MODES))
    score.add_argument("--damping", type=float, default=None, help="override the index's damping factor")
    score.add_argument(
        "--allow-model-mismatch",
        action="store_true",
        help="score with another model or tokenizer than the index was logged with (e.g. a fine-tuned "
        "checkpoint); recorded in the results",
    )
    score.add_argument("--out", default=None, help="directory for topk.h5 and the listing (default: print)")
    score.add_argument(
        "--cache-dir",
        default=None,
        help="where the self-influence cache goes when the index is read-only (default $LOGRA_DIST_HOME/selfinf)",
    )
    score.add_argument("--no-cache", action="store_true", help="never write a self-influence cache")
    score.add_argument(
        "--ann",
        action="store_true",
        help="score only the candidates the shards' ANN files (`logra-dist ann build`) retrieve, exactly",
    )
    score.add_argument("--candidates", type=int, default=None, help="with --ann: candidates per query and shard")
    _add_ann(sub)

    inspect = sub.add_parser(
        "inspect",
        help="what an index holds: shards, rows, layout, completeness, norms, disk use; every problem "
        "the readers would refuse it for. Exit code 0: usable; 1: unfinished but resumable "
        "(rerun the job with --resume); 2: damaged (not usable without repair)",
        description="Exit codes: 0 usable (complete and valid); 1 partial (a running or interrupted job "
        "whose shards are consistent: rerun it with --resume); 2 damaged (not usable without repair).",
    )
    inspect.add_argument("index", help="index directory (complete or partial)")
    inspect.add_argument("--sample-rows", type=int, default=256, help="rows per shard read for the norm summary")
    inspect.add_argument("--json", action="store_true", help="print the facts as JSON")

    report = sub.add_parser("report", help="an HTML page of top-k attributions from a `score --out` directory")
    report.add_argument("results", help="directory holding topk.h5 and topk.jsonl")
    report.add_argument("--out", default=None, help="HTML file (default: RESULTS/report.html)")
    report.add_argument("--max-queries", type=int, default=50)
    report.add_argument("--max-chars", type=int, default=600, help="characters shown per text")
    return parser


def _add_ann(sub) -> None:
    ann = sub.add_parser("ann", help="approximate nearest-neighbour files for `score --ann`")
    build = ann.add_subparsers(dest="ann_command", required=True).add_parser(
        "build", help="build a FAISS index per shard, beside the shard (under a launcher: each rank its shards)"
    )
    build.add_argument("index", help="index directory written by `log`")
    build.add_argument("--factory", default=None, help='FAISS index_factory string (default "HNSW32"; "Flat": exact)')
    build.add_argument("--sketch-dim", type=int, default=None, help="sketch dimension d (default min(D, 256))")
    build.add_argument(
        "--sketch", default="pca", choices=["pca", "gaussian"], help="sketch kind (default pca of each shard's sample)"
    )
    build.add_argument("--sketch-seed", type=int, default=0)
    build.add_argument(
        "--mode", default="relatif", choices=list(SCORE_MODES), help="score mode it serves (relatif serves cosine)"
    )
    build.add_argument("--damping", type=float, default=None, help="damping for relatif/cosine (default: the index's)")
    build.add_argument("--search-params", default="", help='FAISS search parameters, e.g. "nprobe=32" for IVF')


def _add_query_sources(score: argparse.ArgumentParser) -> None:
    """What to attribute: query texts, a precomputed query index, or the model's own completions."""
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", help='jsonl: {"text"} or {"prompt", "completion"}')
    source.add_argument(
        "--query-index",
        default=None,
        help="index of query gradients logged by `log --data "
        "QUERIES --logra <the index's config>`: scored without loading the model",
    )
    source.add_argument(
        "--prompts",
        default=None,
        help='jsonl {"prompt"} or one prompt per line: the model '
        "completes each (greedy) and the completion given its prompt is attributed",
    )
    score.add_argument("--max-new-tokens", type=int, default=32, help="with --prompts: tokens generated at most")


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of the command line, before any process group, model or data is touched."""
    for name, low in (
        ("batch_size", 1),
        ("max_length", 2),
        ("max_samples", 1),
        ("topk", 1),
        ("query_chunk", 1),
        ("candidates", 1),
    ):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
