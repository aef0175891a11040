"""ANN retrieval with exact re-ranking: build the per-shard FAISS files, search them, re-score exactly.

The influence score is an inner product in the whitened space: with W_l W_l^T = (F_l + lambda I)^-1
per layer (`Curvature.whiten`), q^T H^-1 g = (W^T q) . (W^T g). Rows are whitened (and, for
`relatif`, divided by |W^T g| = sqrt(g^T H^-1 g); `cosine` divides every score of a query by the
same constant, so it ranks as relatif and shares its files), then sketched (`index/ann.py`).
Whitening first matters: a sketch keeps inner products to about |a| |b| / sqrt(d), and only in the
whitened space are those the scores' own scales. Sketching raw rows against preconditioned queries
(q' = H^-1 q, whose weight sits in the Fisher's small directions) found 0.69 of the exact top-10
with C = half the shard, where the whitened sketch found 0.95+ (docs/scoring.md, "ANN"). The price:
the files depend on the Hessian and damping also for `dot` (recorded and checked).
The candidates are re-scored from their full rows with the exact path's kernels
(`kernels.normalize`, the curvature's per-layer self-influence): every score returned is exact,
only the candidate set is approximate.

Building (`build_ann`): each rank builds the ANN files of its whole shards (`shard_owners`).
Scoring (`ann_local_topk`, called by `Scorer.topk(k, ann=True)`): each scoring rank searches the
files of its whole shards for `candidates` rows per query and shard, reads only those rows through
the verified store (whole checksum blocks: every row read is verified), and keeps a top-k; the
Scorer merges the ranks' lists as for the exact scan. Candidates depend on the queries and the
shard only, never on the world size, so every world size returns the same result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist import comm
from logra_dist.core.curvature import CURVATURES
from logra_dist.index.ann import (
    DEFAULT_FACTORY,
    TRAIN_ROWS,
    AnnRecord,
    ann_path,
    check_record,
    content_digest,
    faiss_module,
    layout_digest,
    load_ann,
    new_index,
    normalization_for,
    read_record,
    search,
    sketch,
    sketch_dim,
    sketch_matrix,
    write_ann,
)
from logra_dist.index.format import layout_to_json, read_stats
from logra_dist.index.partition import shard_owners
from logra_dist.index.reader import GradientStore
from logra_dist.index.stream import ChunkStream
from logra_dist.scoring.kernels import ID_PAD, RunningTopK, TopKResult, normalize

DEFAULT_CANDIDATES = 1000  # per query and shard; measured in docs/scoring.md ("ANN")
# One GEMM against the union of a block's candidates and a gather, unless the union exceeds this
# many times C: a gathered (bmm) multiply-add cost ~145x a GEMM one here (bench/ann.py, 1 thread).
UNION_GEMM_RATIO = 64
QUERY_BLOCK = 256  # queries per FAISS search call (fixed: candidates must not depend on the world size)


def expected_record(
    store: GradientStore, shard: int, *, dim: int, seed: int, normalization: str, hessian: str, damping: float
) -> AnnRecord:
    info = store.shards[shard]
    return AnnRecord(
        shard=info.path.name,
        rows=info.rows,
        ids_digest=store.id_facts[shard].digest,  # ids_digest of the shard's ids, checked on open
        content_digest=content_digest(info),
        width=store.width,
        sketch_dim=dim,
        sketch_seed=int(seed),
        layout_digest=layout_digest(layout_to_json(store.layout)),
        normalization=normalization,
        hessian=hessian,
        damping=float(damping),
        factory="",
    )


class _Vectors:
    """Rows of a store -> the ANN vectors: whitened, normalized (selfinf), sketched."""

    def __init__(self, store: GradientStore, normalization: str, hessian: str, damping: float, dim: int, seed: int):
        self.normalization = normalization
        self.matrix = sketch_matrix(store.width, dim, seed, layout_digest(layout_to_json(store.layout)))
        _, state = read_stats(store.root / "stats.h5")
        self.pre = CURVATURES.get(hessian).from_state(store.layout, damping, state)

    def __call__(self, rows: torch.Tensor) -> np.ndarray:
        white = self.pre.whiten(rows.float())
        if self.normalization == "selfinf":
            white = white / white.norm(dim=1).clamp_min(1e-30)[:, None]
        return sketch(white.numpy(), self.matrix)


def whitened_queries(scorer, order_ids: np.ndarray) -> np.ndarray:
    """Collective: every rank's queries whitened (W^T q), all-gathered, in `order_ids` order."""
    w = scorer.preconditioner.whiten(scorer.queries.local_rows().double()).float()
    rows = torch.cat(comm.all_gather_rows(w))
    ids = torch.cat(comm.all_gather_rows(torch.as_tensor(scorer.queries.local_ids).reshape(-1, 1))).reshape(-1)
    rows = rows[torch.argsort(ids, stable=True)].numpy()
    if not np.array_equal(np.sort(ids.numpy()), order_ids):
        raise RuntimeError("ANN: the queries changed between gathering them and whitening them")
    return rows


def build_ann(
    index_dir: str | Path,
    *,
    factory: str = DEFAULT_FACTORY,
    dim: int | None = None,
    mode: str = "relatif",
    damping: float | None = None,
    seed: int = 0,
    search_params: str = "",
    chunk_rows: int = 4096,
) -> list[Path]:
    """This rank's share (whole shards) of the ANN files; no collective (the CLI agrees after).
    Returns the files written."""
    faiss_module()  # fail before any work when FAISS is missing
    store = GradientStore(index_dir)
    attrs, _ = read_stats(store.root / "stats.h5")
    normalization = normalization_for(mode)
    hessian, damping = str(attrs["hessian"]), float(attrs["damping"] if damping is None else damping)
    d = sketch_dim(store.width, dim)
    vectors = _Vectors(store, normalization, hessian, damping, d, seed)
    written = []
    for s in shard_owners([i.rows for i in store.shards], comm.world_size())[comm.rank()]:
        info = store.shards[s]
        base = expected_record(
            store, s, dim=d, seed=seed, normalization=normalization, hessian=hessian, damping=damping
        )
        record = AnnRecord(**{**base.__dict__, "factory": factory, "search_params": search_params})
        train = None
        if not new_index(d, factory).is_trained:  # a strided sample of the shard (rows may be ordered)
            picks = np.unique(np.linspace(0, info.rows - 1, min(info.rows, TRAIN_ROWS)).astype(np.int64))
            train = vectors(torch.from_numpy(store[info.offset + picks]))
        chunks = (
            vectors(rows) for _, _, rows, _ in ChunkStream(store, [(info.offset, info.offset + info.rows)], chunk_rows)
        )
        written.append(write_ann(ann_path(info.path), record, chunks, train))
    return written


def _checked_records(scorer) -> list[AnnRecord]:
    """Every shard's ANN record, checked on every rank (all ranks refuse a stale file alike)."""
    store = scorer.store
    first = read_record(ann_path(store.shards[0].path))
    out = []
    for s, info in enumerate(store.shards):
        want = expected_record(
            store,
            s,
            dim=first.sketch_dim,
            seed=first.sketch_seed,
            normalization=normalization_for(scorer.mode),
            hessian=scorer.hessian,
            damping=scorer.damping,
        )
        out.append(check_record(ann_path(info.path), want))
    return out


def ann_topk(scorer, k: int, groups: dict[str, str] | None, candidates: int | None) -> TopKResult:
    """Collective (`Scorer.topk(k, ann=True)`): ANN candidates per shard, re-scored exactly on
    each rank, merged across ranks as the exact scan's lists are."""
    c = DEFAULT_CANDIDATES if candidates is None else int(candidates)
    if groups:
        raise ValueError("topk(ann=True): layer groups are not supported (candidates are retrieved by total score)")
    if c < k:
        raise ValueError(f"topk(ann=True): candidates ({c}) must be >= k ({k})")
    q = scorer._gather_queries()
    q_white = whitened_queries(scorer, q.ids)  # collective
    top, info = scorer._agreed(lambda: ann_local_topk(scorer, q, q_white, k, c), "ANN scoring")
    result = scorer._reduce(top, k, min(k, len(scorer.store)), q.ids)
    result.info = info
    return result


def ann_local_topk(scorer, q, q_white: np.ndarray, k: int, candidates: int) -> tuple[RunningTopK, dict[str, Any]]:
    """This rank's top-k over the ANN candidates of its whole shards, scored exactly (q_white:
    `whitened_queries`)."""
    store = scorer.store
    records = _checked_records(scorer)
    info = {
        "ann": True,
        "ann_candidates": int(candidates),
        "ann_factory": ",".join(sorted({r.factory for r in records})),
        "ann_sketch_dim": int(records[0].sketch_dim),
    }
    top = RunningTopK(len(q.ids), k, scorer.score_dtype)
    mine = shard_owners([s.rows for s in store.shards], scorer.world)[scorer.rank]
    if not mine:
        return top, info
    matrix = sketch_matrix(store.width, records[0].sketch_dim, records[0].sketch_seed, records[0].layout_digest)
    q_sketch = sketch(q_white, matrix)
    q_self = q.self_layers.sum(1)
    indexes = [(store.shards[s].offset, load_ann(ann_path(store.shards[s].path), records[s])[0]) for s in mine]
    n_q, per_row = len(q.ids), max(1, candidates) * store.width * 4
    step = max(1, min(QUERY_BLOCK, scorer.block_bytes // per_row))  # global sizes only
    for a in range(0, n_q, step):
        b = min(n_q, a + step)
        for offset, index in indexes:  # per shard: the same arithmetic whichever rank holds it
            with scorer.tracker.phase("ann-search"):
                labels = search(index, q_sketch[a:b], candidates)
            _rescore(scorer, q, slice(a, b), np.where(labels >= 0, labels + offset, -1), q_self, top)
    return top, info


def _rescore(scorer, q, rows_q: slice, cand: np.ndarray, q_self: torch.Tensor, top: RunningTopK) -> None:
    """Exact scores of the queries `rows_q` against their own candidates `cand` (global row
    positions, -1: none), into `top`. One GEMM against the union of the block's candidates (then a
    gather) unless the union is much larger than C, where gathering each query's own rows (memory
    bound) costs less; both give exact scores."""
    store, mode = scorer.store, scorer.mode
    valid = cand >= 0
    rows_at = np.unique(cand[valid])
    if not len(rows_at):
        return
    with scorer.tracker.phase("ann-read"):
        rows = _read_rows(store, rows_at, scorer.chunk_rows).to(scorer.score_dtype)
    where = torch.from_numpy(np.searchsorted(rows_at, np.where(valid, cand, rows_at[0])))
    pre = q.pre[rows_q]
    with scorer.tracker.phase("gemm"):
        if len(rows_at) <= UNION_GEMM_RATIO * cand.shape[1]:
            dots = (pre @ rows.T).gather(1, where)
        else:
            dots = torch.bmm(rows[where], pre[:, :, None]).squeeze(2)
        row_self = None if mode == "dot" else scorer._row_self(rows).sum(1)[where]
        scores = normalize(dots, mode, q_self[rows_q], row_self)
    mask = torch.from_numpy(~valid)
    ids = torch.from_numpy(store.ids_at(rows_at))[where].masked_fill(mask, ID_PAD)
    top.update(scores.masked_fill(mask, -torch.inf), ids, rows_q)


def _read_rows(store: GradientStore, positions: np.ndarray, chunk_rows: int) -> torch.Tensor:
    """Rows at sorted global `positions`, read as the whole checksum blocks holding them (the
    stream's fast path; a block partly read would be re-read through HDF5 to verify it)."""
    out = torch.empty(len(positions), store.width)
    ranges = []
    for info in store.shards:
        lo, hi = np.searchsorted(positions, [info.offset, info.offset + info.rows])
        if lo == hi:
            continue
        blocks = np.unique((positions[lo:hi] - info.offset) // info.block_rows)
        cut = np.nonzero(np.diff(blocks) > 1)[0] + 1
        for run in np.split(blocks, cut):
            a = info.offset + int(run[0]) * info.block_rows
            ranges.append((a, min(info.offset + info.rows, info.offset + (int(run[-1]) + 1) * info.block_rows)))
    step = max(chunk_rows, max((s.block_rows for s in store.shards), default=1))
    for start, _, rows, _ in ChunkStream(store, ranges, step):  # read time and bytes: the store's tracker
        a, b = np.searchsorted(positions, [start, start + len(rows)])
        out[a:b] = rows[torch.from_numpy(positions[a:b] - start)]
    return out
