"""`logra-dist score` with other query sources than query texts, and the shared results report.

- `--query-index DIR`: query gradients logged beforehand by `logra-dist log --data QUERIES --logra
  <the training index's config>` (same model, same projections: `queries.check_query_store`
  refuses anything else). No model is loaded; each rank scores its contiguous share of the rows.
- `--prompts FILE`: the model completes each prompt greedily under the scoring engine
  (`completion.py`), and the completion given its prompt is the query, as the paper attributes
  LLM outputs. The completions are saved in the listing (`topk.jsonl`: prompt, completion).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from logra_dist import comm
from logra_dist.cli.exports import matrix_writer
from logra_dist.cli.jobs import bundled_items, compute_dtype, load_engine, make_tracker, say, tokenizer_fingerprint
from logra_dist.cli.parser import check_args, groups_of
from logra_dist.data import pad_token_id, rank_samples, tokenize
from logra_dist.engines.launch import init_distributed
from logra_dist.index.reader import GradientStore
from logra_dist.scoring.export import check_matrix_size
from logra_dist.scoring.kernels import GroupPlan
from logra_dist.scoring.results import listing, markdown_body, markdown_header
from logra_dist.session import run_samples


def _index_manifest(path: str | Path, what: str = "index") -> dict:
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"{what} {path}: no manifest.json (not a finished `logra-dist log` output)")
    return json.loads(manifest.read_text())


def score_dtype(args: argparse.Namespace, manifest: dict) -> str | None:
    """The model dtype of a score job: the index's recorded one when --dtype is not given (query
    gradients in the training gradients' precision), a different --dtype refused; sets args.dtype.
    An engine config that states another precision is refused here, naming the index's."""
    from logra_dist.engines.spec import EngineConfigError, read_spec
    from logra_dist.scoring.identity import check_model_dtype, recorded_model_dtype

    recorded = recorded_model_dtype(manifest)
    where = str(Path(args.index) / "manifest.json")
    fix = f"drop --dtype to score in {recorded}, or log the index again with --dtype {args.dtype}"
    check_model_dtype(where, recorded, args.dtype, "--dtype is", fix)
    if args.dtype is None and recorded is not None and args.config:
        try:
            read_spec(args.config, recorded)
        except EngineConfigError as e:
            raise EngineConfigError(
                f"{where}: the index was logged in {recorded} but --config {args.config} states another "
                f'precision ({e}); score with the config the index was logged with, or set its bf16/fp16 to "auto"'
            ) from None
    args.dtype = args.dtype or recorded
    return recorded


def check_engine_dtype(args: argparse.Namespace, model, recorded: str | None) -> None:
    """The loaded engine really computes in the index's dtype (FSDP mixed precision can differ)."""
    from logra_dist.scoring.identity import check_model_dtype

    fix = 'score with the engine config the index was logged with, or one whose precision is "auto"'
    check_model_dtype(
        str(Path(args.index) / "manifest.json"), recorded, compute_dtype(model), "the engine computes in", fix
    )


def _texts_of(index: str | Path, manifest: dict, where: str, tokenizer=None, data=None):
    """The index's training texts, read back from its recorded data (or `--data`) and verified
    per sample by digest (`data.recorded`): a changed file is refused, naming the first sample
    that differs. None, with a note, if the files are gone or the index has no sample table."""
    from logra_dist.data.recorded import RecordedTexts

    try:
        if tokenizer is None:
            from logra_dist.embedded import load_tokenizer

            meta = manifest.get("metadata", {})
            tokenizer = load_tokenizer(meta.get("tokenizer_path") or meta["model_path"])
        items = bundled_items() if not data and not (manifest.get("data") or {}).get("abs_paths") else None
        return RecordedTexts(index, manifest, tokenizer, data, items)
    except (OSError, KeyError) as e:
        say(f"note: texts of {where} unavailable ({e}); listing ids and scores only (--data names moved files)")
        return None


def _load_texts(texts, ids) -> None:
    """Read and verify the texts of the ids about to be listed (a missing file: a note, no texts)."""
    if texts is not None:
        try:
            texts.load(ids)
        except OSError as e:
            say(f"note: training texts unavailable ({e}); pass --data with the files the index was logged from")
            texts.paths = None


def _scoring(args: argparse.Namespace, tokenizer, tracker) -> dict[str, Any]:
    """Scorer options from the command line, with the tokenizer's fingerprint to check."""
    return {
        "mode": args.mode,
        "damping": args.damping,
        "tracker": tracker,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "allow_model_mismatch": args.allow_model_mismatch,
    }


def report_scores(
    args: argparse.Namespace,
    scorer,
    result,
    manifest: dict,
    query_text,
    query_fields: dict[int, dict[str, Any]] | None = None,
) -> None:
    """Rank 0: results files (with --out) and the markdown listing on stdout."""
    from logra_dist.scoring.results import listing, markdown

    if comm.rank() == 0:
        if scorer.model_mismatch:
            say(f"note: scored across models (--allow-model-mismatch): {scorer.model_mismatch}")
        train_text = _texts_of(
            args.index, manifest, f"training index {args.index}", scorer_tokenizer(scorer), args.data
        )
        _load_texts(train_text, result.train_ids)
        if args.out:
            scorer.write_results(args.out, result, query_text, train_text, query_fields=query_fields)
        print(markdown(listing(result, query_text, train_text, query_fields), result))


def run_score_query_index(args: argparse.Namespace):
    """Precomputed query gradients (a query index) against the training index: no model at all;
    in chunks of consecutive sorted query ids (bounded memory), each rank reading its share."""
    from logra_dist.scoring.scorer import Scorer

    init_distributed()
    manifest = _index_manifest(args.index)
    query_manifest = _index_manifest(args.query_index, "query index")
    score_dtype(args, manifest)  # --dtype, if given, must be the index's; the Scorer checks the query index's
    tracker = make_tracker(
        args,
        "score",
        {"index": str(args.index), "query_index": str(args.query_index), "index_config": manifest.get("config")},
        query_manifest["total_rows"],
    )
    scorer = Scorer(
        None,
        args.index,
        mode=args.mode,
        damping=args.damping,
        tracker=tracker,
        allow_model_mismatch=args.allow_model_mismatch,
        **cache_options(args),
    )
    query_store = GradientStore(args.query_index)
    order = np.sort(query_store.ids)  # chunks of consecutive sorted ids: results in id order, as in one pass
    size = query_chunk(args, manifest)
    chunks = [order[a : a + size] for a in range(0, len(order), size)]
    feeds = (partial(scorer.add_query_gradients, query_store, ids[comm.rank() :: comm.world_size()]) for ids in chunks)
    texts = _texts_of(args.query_index, query_manifest, f"query index {args.query_index}") if comm.rank() == 0 else None

    def query_texts():
        _load_texts(texts, current)
        return texts

    current: list = []
    feeds = (partial(_feed, feed, current, ids) for feed, ids in zip(feeds, chunks))
    n_scored = score_chunks(args, scorer, manifest, feeds, query_texts, tracker, len(query_store))
    query_store.close()
    return n_scored


def run_score_prompts(args: argparse.Namespace):
    """The model completes each prompt (greedy, under the scoring engine), then each completion
    given its prompt is the query. Completions appear in the listing (prompt, completion)."""
    from logra_dist.scoring.completion import complete, gather_completions, read_prompts
    from logra_dist.scoring.scorer import Scorer

    init_distributed()
    prompts = read_prompts(args.prompts)
    manifest = _index_manifest(args.index)
    if args.model is None and manifest.get("metadata", {}).get("model_path"):
        args.model = manifest["metadata"]["model_path"]
    recorded = score_dtype(args, manifest)
    model, tokenizer, _ = load_engine(args)
    check_engine_dtype(args, model, recorded)
    tracker = make_tracker(
        args,
        "score",
        {"index": str(args.index), "prompts": str(args.prompts), "index_config": manifest.get("config")},
        len(prompts),
    )
    with tracker.phase("generate"):
        completions = complete(
            model,
            tokenizer,
            prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    scorer = Scorer(model, args.index, **_scoring(args, tokenizer, tracker), **cache_options(args))
    groups = groups_of(args)
    GroupPlan(scorer.store.layout, groups)  # checked before any query gradient
    matrix = matrix_writer(args, scorer, len(prompts))
    pad_id = pad_token_id(tokenizer)
    run_samples(scorer, [c.sample for c in completions], args.batch_size, pad_id, tracker)
    with tracker.phase("score"):
        result = scorer.topk(
            args.topk,
            groups,
            ann=args.ann,
            candidates=args.candidates,
            bottomk=args.bottomk,
            search_params=args.search_params,
        )
    if args.export_matrix:
        scores = scorer.scores()  # collective
        if matrix is not None:
            matrix.append(result.query_ids, scores)
            matrix.close()
    records = gather_completions(completions)  # collective
    tracker.finish(
        {"score/queries": len(result.query_ids), "score/index_rows": len(scorer.store), "score/k": args.topk},
        metrics_dir=args.out,
    )
    query_text = {pid: r["prompt"] + r["completion"] for pid, r in records.items()}
    report_scores(args, scorer, result, manifest, query_text, records)
    scorer.close()
    return result


# -- score ----------------------------------------------------------------------------------------
def cap_topk(args: argparse.Namespace, manifest: dict) -> None:
    """--topk above the index's rows returns every row: capped before anything is allocated."""
    rows = int(manifest.get("total_rows", 0))
    if rows and args.topk > rows:
        say(f"note: --topk {args.topk} capped at the index's {rows} rows")
        args.topk = rows


def query_chunk(args: argparse.Namespace, manifest: dict) -> int:
    """Queries per chunk: --query-chunk, or what keeps one chunk's (n, D) rows near CHUNK_BYTES;
    a multiple of world x batch size, so every batch holds the same queries as in one pass."""
    unit = comm.world_size() * args.batch_size
    size = args.query_chunk or max(1, CHUNK_BYTES // (16 * int(manifest.get("width") or 1)))
    return -(-size // unit) * unit


CHUNK_BYTES = 256 << 20  # float32 gathered rows + float64 preconditioning of one chunk


def run_score(args: argparse.Namespace):
    from logra_dist.cli.queries import QueryFile
    from logra_dist.index.format import read_manifest
    from logra_dist.scoring.scorer import Scorer

    check_args(args)
    if args.query_index is not None or args.prompts is not None:
        return run_score_query_index(args) if args.query_index is not None else run_score_prompts(args)
    queries = QueryFile(args.queries)  # every line checked; only ids and offsets kept
    index = Path(args.index)
    manifest = read_manifest(index / "manifest.json")
    cap_topk(args, manifest)
    if args.export_matrix:  # refused before any model loads (checked again, cheaply, when scoring)
        check_matrix_size(len(queries), int(manifest.get("total_rows", 0)), args.force)
    init_distributed()
    if args.model is None and manifest.get("metadata", {}).get("model_path"):
        args.model = manifest["metadata"]["model_path"]
    recorded = score_dtype(args, manifest)
    model, tokenizer, _ = load_engine(args)
    check_engine_dtype(args, model, recorded)
    tracker = make_tracker(args, "score", {"index": str(index), "index_config": manifest.get("config")}, len(queries))
    scorer = Scorer(model, index, **_scoring(args, tokenizer, tracker), **cache_options(args))
    pad_id = pad_token_id(tokenizer)
    chunks = queries.chunks(query_chunk(args, manifest))
    current: list = []

    def feeds():
        for docs in chunks:
            current[:] = docs

            def feed(docs=docs):
                mine = rank_samples(tokenize(docs, tokenizer, args.max_length), comm.rank(), comm.world_size())
                run_samples(scorer, mine, args.batch_size, pad_id, tracker)

            yield feed

    texts = lambda: {q.id: q.full_text for q in current}  # noqa: E731
    return score_chunks(args, scorer, manifest, feeds(), texts, tracker, len(queries))


def score_chunks(args, scorer, manifest: dict, feeds, query_texts, tracker, n_queries: int) -> int:
    """Collective: score each chunk of queries `feeds` adds (Scorer.score_in_chunks), append its
    results to the files (rank 0) and print its listing; returns the queries scored.
    query_texts(): the texts of the current chunk's queries (rank 0). With --export-matrix, each
    chunk's full score matrix (`Scorer.scores`, while its queries are held) goes to the file too."""
    groups = groups_of(args)
    GroupPlan(scorer.store.layout, groups)  # a group matching no layer: refused before any query gradient
    matrix = matrix_writer(args, scorer, n_queries)
    tokenizer = getattr(scorer, "tokenizer", None)
    train_text = (
        _texts_of(args.index, manifest, f"training index {args.index}", tokenizer, args.data)
        if comm.rank() == 0
        else None
    )
    writer = scorer.results_writer(args.out) if args.out and comm.rank() == 0 else None
    n_scored = 0
    options = {
        "ann": args.ann,
        "candidates": args.candidates,
        "bottomk": args.bottomk,
        "search_params": args.search_params,
    }
    try:
        for i, result in enumerate(scorer.score_in_chunks(args.topk, feeds, groups, **options)):
            n_scored += len(result.query_ids)
            if args.export_matrix:
                scores = scorer.scores()  # collective
                if matrix is not None:
                    matrix.append(result.query_ids, scores)
            if comm.rank() == 0:
                _load_texts(train_text, result.train_ids)
                query_text = query_texts()
                if writer is not None:
                    writer.append(result, query_text, train_text)
                records = listing(result, query_text, train_text)
                header = markdown_header(result, writer and writer.run_id) if i == 0 else ""
                print(header + markdown_body(records))
    except BaseException:
        for w in (writer, matrix):
            if w is not None:
                w.abort()
        raise
    for w in (writer, matrix):
        if w is not None:
            w.close()
    tracker.finish(
        {"score/queries": n_scored, "score/index_rows": len(scorer.store), "score/k": args.topk}, metrics_dir=args.out
    )
    scorer.close()
    return n_scored


def _feed(feed, current: list, ids) -> None:
    current[:] = list(ids)
    feed()


def scorer_tokenizer(scorer):
    return getattr(scorer, "tokenizer", None)


def cache_options(args) -> dict:
    """--cache-dir / --no-cache: where the self-influence cache may go (scoring/cacheplace.py)."""
    return {"cache_self_influence": not args.no_cache, "cache_dir": args.cache_dir}
