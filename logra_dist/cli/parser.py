"""The `logra-dist` argument parser and the cheap checks made before any work starts.

Choices come from the registries in `config` (curvature kinds, inits, storage codecs, score
modes), so a new kind shows up here without editing the parser.
"""

from __future__ import annotations

import argparse

from logra_dist.config import FISHERS, HESSIANS, INITS, LAYER_TYPES, PRESETS, SCORE_MODES, STORAGE_DTYPES

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
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer directory, for a checkpoint without one (default: --model's)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the model's dtype (default: the engine config's bf16/fp16/dtype, else float32); one that "
        "the config contradicts is refused",
    )
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


def rank_override(text: str) -> list:
    """PATTERN=KIN,KOUT -> [pattern, k_in, k_out] (the LoGraConfig.ranks entry); the pattern may
    itself hold "=", the ranks never do."""
    pattern, sep, ranks = text.rpartition("=")
    parts = ranks.split(",")
    if not sep or not pattern or len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not PATTERN=KIN,KOUT with two positive integers (lm_head=8,8)")
    return [pattern, int(parts[0]), int(parts[1])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logra-dist", description=DESCRIPTION)
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error instead of its one-line message (accepted anywhere on "
        "the command line, also by launch/*.py; or LOGRA_DIST_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    log = sub.add_parser("log", help="log projected per-sample gradients of a corpus into an index")
    _add_common(log)
    log.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="jsonl, text or parquet files, or saved Hugging Face datasets (default: bundled corpus)",
    )
    _add_data_options(log)
    log.add_argument("--out", default="runs/index", help="index directory")
    log.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="log only the first N valid documents (with --chunk: all their windows); nothing after them is read",
    )
    log.add_argument(
        "--logra",
        default=None,
        help="LoGraConfig as a JSON file, or an index directory whose "
        "config to reuse (e.g. to log queries for `score --query-index`); flags below override it",
    )
    log.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="a named recipe (fast: the defaults; accurate: the best measured on the LM, PCA + true Fisher with 8 "
        "labels per token, its extra passes run in this job); flags below override it",
    )
    log.add_argument(
        "--optimizer-state",
        default=None,
        help="the training checkpoint whose Adam second moments scale the gradients (optimizer-aware): "
        "a DeepSpeed ZeRO-3 checkpoint folder, a torch.distributed.checkpoint folder, or optimizer.pt",
    )
    log.add_argument("--k-in", type=int, default=None)
    log.add_argument("--k-out", type=int, default=None)
    log.add_argument(
        "--ranks",
        nargs="+",
        type=rank_override,
        default=None,
        metavar="PATTERN=KIN,KOUT",
        help="per-layer ranks: the first regex matching a layer name sets its k_in,k_out (e.g. lm_head=8,8)",
    )
    log.add_argument("--init", default=None, choices=list(INITS))
    log.add_argument("--hessian", default=None, choices=list(HESSIANS))
    log.add_argument(
        "--fisher",
        default=None,
        choices=list(FISHERS),
        help="statistics from the data's labels (empirical), labels drawn from the model (true), the "
        "expectation over a classifier's classes (exact: not for language models), or the best of "
        "the two the output allows (model: for text, true)",
    )
    log.add_argument("--fisher-exact", dest="fisher", action="store_const", const="exact", help="--fisher exact")
    log.add_argument(
        "--fisher-samples", type=int, default=None, help="labels drawn per token for --fisher true or model"
    )
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
    log.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each decoder layer in backward (Hugging Face, non-reentrant): about 0.6x the "
        "logging memory for 1.4x the step; the rows are the same (no dropout runs)",
    )

    score = sub.add_parser("score", help="top-k training examples for each query")
    _add_common(score)
    score.add_argument("--index", required=True, help="index directory written by `log`")
    _add_query_sources(score)
    score.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="the index's training files, where they are now (default: the paths it recorded); "
        "each listed text is verified against the digest logged for it",
    )
    score.add_argument("--topk", type=int, default=10, help="results per query (capped at the index's rows)")
    score.add_argument(
        "--query-chunk",
        type=int,
        default=None,
        help="--queries scored this many at a time, so memory does not grow with their number "
        "(default: about 256 MB of query rows per chunk; rounded up to a multiple of ranks x batch size)",
    )
    score.add_argument(
        "--bottomk",
        type=int,
        default=0,
        help="also the N lowest-scoring (most opposing) training examples per query (default 0: none)",
    )
    score.add_argument(
        "--groups",
        nargs="+",
        default=None,
        type=layer_group,
        metavar="NAME=REGEX",
        help="per-layer-group scores beside the total, e.g. attn=self_attn mlp=mlp (regex searched in layer names)",
    )
    score.add_argument(
        "--export-matrix",
        default=None,
        metavar="FILE.h5",
        help="also write the full queries x training rows score matrix (small cases; refused above 2 GiB "
        "unless --force)",
    )
    score.add_argument("--force", action="store_true", help="with --export-matrix: export above the size limit")
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
    score.add_argument(
        "--search-params",
        default=None,
        help='with --ann: FAISS search parameters instead of the files\' own, e.g. "nprobe=64", "efSearch=512"',
    )
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

    selfinf = sub.add_parser(
        "selfinf", help="export every training row's self-influence g^T H^-1 g (total and per layer) to HDF5"
    )
    selfinf.add_argument("index", help="index directory written by `log`")
    selfinf.add_argument("--out", required=True, metavar="FILE.h5", help="HDF5 file to write")
    selfinf.add_argument("--damping", type=float, default=None, help="override the index's damping factor")
    selfinf.add_argument("--no-cache", action="store_true", help="never write a self-influence cache")

    report = sub.add_parser("report", help="an HTML page of top-k attributions from a `score --out` directory")
    report.add_argument("results", help="directory holding topk.h5 and topk.jsonl")
    report.add_argument("--out", default=None, help="HTML file (default: RESULTS/report.html)")
    report.add_argument("--max-queries", type=int, default=50)
    report.add_argument("--max-chars", type=int, default=600, help="characters shown per text")
    report.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="the training files, if they moved since logging: texts are read from them and verified by digest",
    )
    return parser


def _add_data_options(log: argparse.ArgumentParser) -> None:
    """How documents become samples (logra_dist.data.streaming.DataSpec)."""
    log.add_argument(
        "--chunk",
        action="store_true",
        help="cut long documents into windows of --max-length tokens (each a sample) instead of truncating",
    )
    log.add_argument("--stride", type=int, default=None, help="with --chunk: tokens between window starts")
    log.add_argument(
        "--skip-bad",
        action="store_true",
        help="log the rest when a record is bad (listed with reasons in INDEX/samples/skipped-*.jsonl)",
    )


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
    build.add_argument(
        "--build-params",
        default="",
        help='FAISS parameters set before the rows are added, e.g. "efConstruction=80" for HNSW (a better graph: '
        "higher recall at the same efSearch, a slower build)",
    )


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


def layer_group(text: str) -> tuple[str, str]:
    """NAME=REGEX of `--groups`, checked: a name, not 'total', and a regex that compiles."""
    import re

    name, sep, pattern = text.partition("=")
    if not sep or not name or not pattern:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=REGEX, e.g. attn=self_attn")
    if name == "total":
        raise argparse.ArgumentTypeError("'total' is the all-layer score; name the group otherwise")
    try:
        re.compile(pattern)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r}: not a valid regex ({e})") from e
    return name, pattern


def groups_of(args: argparse.Namespace) -> dict[str, str] | None:
    """--groups as {name: regex}; a name given twice is refused."""
    pairs = getattr(args, "groups", None) or []
    names = [n for n, _ in pairs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"--groups: group name(s) {twice} given twice")
    return dict(pairs) or None


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks of the command line, before any process group, model or data is touched."""
    for name, low in (
        ("batch_size", 1),
        ("max_length", 2),
        ("max_samples", 1),
        ("topk", 1),
        ("query_chunk", 1),
        ("candidates", 1),
        ("bottomk", 0),
    ):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    groups_of(args)
    if getattr(args, "ann", False) and (getattr(args, "bottomk", 0) or getattr(args, "groups", None)):
        raise SystemExit("--ann retrieves the nearest rows by total score: drop --bottomk/--groups or --ann")
    if getattr(args, "search_params", None) and not getattr(args, "ann", False):
        raise SystemExit("--search-params tunes the ANN search: add --ann or drop --search-params")
