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

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist import comm
from logra_dist.core.curvature import CURVATURES
from logra_dist.index.ann import (
    DEFAULT_FACTORY,
    DEFAULT_SKETCH,
    SKETCHES,
    TRAIN_ROWS,
    AnnRecord,
    LoadedAnn,
    ann_path,
    check_record,
    content_digest,
    faiss_module,
    layout_digest,
    load_ann,
    new_index,
    normalization_for,
    pca_matrix,
    read_record,
    search,
    set_search_params,
    sketch,
    sketch_dim,
    sketch_matrix,
    write_ann,
)
from logra_dist.index.format import layout_to_json, read_stats
from logra_dist.index.h5io import row_checksums
from logra_dist.index.partition import shard_owners
from logra_dist.index.reader import GradientStore
from logra_dist.index.stream import ChunkStream, gather_stored
from logra_dist.scoring.kernels import ID_PAD, RunningTopK, TopKResult, normalize

DEFAULT_CANDIDATES = 100  # per query and shard; measured in docs/scoring.md ("ANN")
HNSW_SEARCH_PARAMS = "efSearch=512"  # HNSW default: recall@10 0.934 at 256, 0.984 at 512 (1M rows, d = 64)
# One GEMM against the union of a block's candidates and a gather, unless the union exceeds this
# many times C: a gathered (bmm) multiply-add cost ~145x a GEMM one here (bench/ann.py, 1 thread).
UNION_GEMM_RATIO = 64
QUERY_BLOCK = 256  # queries per FAISS search call (fixed: candidates must not depend on the world size)


def expected_record(
    store: GradientStore,
    shard: int,
    *,
    dim: int,
    seed: int,
    normalization: str,
    hessian: str,
    damping: float,
    kind: str = DEFAULT_SKETCH,
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
        sketch=kind,
    )


class _Vectors:
    """Rows of a store -> the ANN vectors: whitened, normalized (selfinf), sketched."""

    def __init__(self, store: GradientStore, normalization: str, hessian: str, damping: float, dim: int, seed: int):
        self.normalization, self.codec = normalization, store.codec
        self.matrix = sketch_matrix(store.width, dim, seed, layout_digest(layout_to_json(store.layout)))
        _, state = read_stats(store.root / "stats.h5")
        self.pre = CURVATURES.get(hessian).from_state(store.layout, damping, state)

    def __call__(self, rows: torch.Tensor) -> np.ndarray:
        return self.with_self(rows)[0]

    def with_self(self, rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, float64 self-influence |W^T g|^2 = g^T H^-1 g of each row)."""
        white = self.pre.whiten(rows.double())
        norm2 = (white * white).sum(1)
        if self.normalization == "selfinf":
            white = white / norm2.sqrt().clamp_min(1e-30)[:, None]
        return sketch(white.float().numpy(), self.matrix), norm2.numpy()

    def stored(self, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored rows (verified by the stream) -> (vectors, row checksums, self-influence)."""
        vectors, row_self = self.with_self(self.codec.decode(stored))
        return vectors, row_checksums(stored), row_self


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
    kind: str = DEFAULT_SKETCH,
    mode: str = "relatif",
    damping: float | None = None,
    seed: int = 0,
    search_params: str = "",
    build_params: str = "",
    chunk_rows: int = 4096,
) -> list[Path]:
    """This rank's share (whole shards) of the ANN files; no collective (the CLI agrees after).
    build_params: FAISS parameters set before the rows are added (HNSW's efConstruction: a
    better graph, higher recall at the same efSearch, a slower build). Returns the files written."""
    faiss_module()  # fail before any work when FAISS is missing
    store = GradientStore(index_dir)
    attrs, _ = read_stats(store.root / "stats.h5")
    normalization = normalization_for(mode)
    hessian, damping = str(attrs["hessian"]), float(attrs["damping"] if damping is None else damping)
    if kind not in SKETCHES:
        raise ValueError(f"sketch kind {kind!r} is not one of {SKETCHES}")
    d = sketch_dim(store.width, dim)
    vectors = _Vectors(store, normalization, hessian, damping, d, seed)
    gaussian = vectors.matrix
    written = []
    for s in shard_owners([i.rows for i in store.shards], comm.world_size())[comm.rank()]:
        info = store.shards[s]
        base = expected_record(
            store, s, dim=d, seed=seed, normalization=normalization, hessian=hessian, damping=damping
        )
        params = search_params or (HNSW_SEARCH_PARAMS if "HNSW" in factory else "")
        made = {"factory": factory, "search_params": params, "build_params": build_params, "sketch": kind}
        record = AnnRecord(**{**base.__dict__, **made})
        train, pca = None, kind == "pca" and d < store.width
        if pca or not new_index(d, factory).is_trained:  # a strided sample of the shard (rows may be ordered)
            picks = np.unique(np.linspace(0, info.rows - 1, min(info.rows, TRAIN_ROWS)).astype(np.int64))
            vectors.matrix = None if pca else gaussian
            train = vectors(torch.from_numpy(store[info.offset + picks]))
            if pca:
                vectors.matrix = pca_matrix(train, d, seed)
                train = sketch(train, vectors.matrix)
        span = [(info.offset, info.offset + info.rows)]
        chunks = (vectors.stored(rows) for _, _, rows, _ in ChunkStream(store, span, chunk_rows, decode=False))
        stored = vectors.matrix if pca else None
        written.append(write_ann(ann_path(info.path), record, chunks, train, stored))
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
            kind=first.sketch,
            normalization=normalization_for(scorer.mode),
            hessian=scorer.hessian,
            damping=scorer.damping,
        )
        out.append(check_record(ann_path(info.path), want))
    return out


def ann_topk(
    scorer, k: int, groups: dict[str, str] | None, candidates: int | None, search_params: str | None = None
) -> TopKResult:
    """Collective (`Scorer.topk(k, ann=True)`): ANN candidates per shard, re-scored exactly on
    each rank, merged across ranks as the exact scan's lists are. search_params (e.g.
    "nprobe=64", "efSearch=512"): FAISS parameters for this call instead of the files' own."""
    c = DEFAULT_CANDIDATES if candidates is None else int(candidates)
    if groups:
        raise ValueError("topk(ann=True): layer groups are not supported (candidates are retrieved by total score)")
    if c < k:
        raise ValueError(f"topk(ann=True): candidates ({c}) must be >= k ({k})")
    q = scorer._gather_queries()
    q_white = whitened_queries(scorer, q.ids)  # collective
    job = lambda: ann_local_topk(scorer, q, q_white, k, c, search_params)  # noqa: E731
    top, info = scorer._agreed(job, "ANN scoring")
    result = scorer._reduce(top, k, min(k, len(scorer.store)), q.ids)
    result.info = info
    return result


def ann_local_topk(
    scorer, q, q_white: np.ndarray, k: int, candidates: int, search_params: str | None = None
) -> tuple[RunningTopK, dict[str, Any]]:
    """This rank's top-k over the ANN candidates of its whole shards, scored exactly (q_white:
    `whitened_queries`)."""
    store = scorer.store
    records = _checked_records(scorer)
    params = [r.search_params if search_params is None else search_params for r in records]
    info = {
        "ann": True,
        "ann_candidates": int(candidates),
        "ann_factory": ",".join(sorted({r.factory for r in records})),
        "ann_sketch_dim": int(records[0].sketch_dim),
        "ann_search_params": ";".join(sorted(set(params))),
    }
    top = RunningTopK(len(q.ids), k, scorer.score_dtype)
    mine = shard_owners([s.rows for s in store.shards], scorer.world)[scorer.rank]
    if not mine:
        return top, info
    q_self = q.self_layers.sum(1)
    with scorer.tracker.phase("ann-load"):
        loaded = [(s, _loaded(scorer, s, records[s], params[s])) for s in mine]
    n_q, per_row = len(q.ids), max(1, candidates) * store.width * 4
    step = max(1, min(QUERY_BLOCK, scorer.block_bytes // per_row))  # global sizes only
    for a in range(0, n_q, step):
        b = min(n_q, a + step)
        for s, ann in loaded:  # per shard: the same arithmetic whichever rank holds it
            with scorer.tracker.phase("ann-search"):
                labels = search(ann.index, sketch(q_white[a:b], ann.matrix), candidates)
            _rescore(scorer, q, slice(a, b), s, ann, labels, q_self, top)
    return top, info


# Loaded ANN files per scorer, reused by its later topk calls while the file is unchanged: a
# query batch then costs its search and re-rank only (loading is ~1 s per GB of FAISS index).
_LOADED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loaded(scorer, shard: int, record: AnnRecord, params: str) -> LoadedAnn:
    """The shard's loaded file with the FAISS search parameters `params` in force (a file loaded
    under other parameters is reloaded only when `params` is empty: nothing to set them back)."""
    path = ann_path(scorer.store.shards[shard].path)
    st = path.stat()
    key = (record.to_json(), st.st_mtime_ns, st.st_size, st.st_ino)
    cache = _LOADED.setdefault(scorer, {})
    held = cache.get(path)
    if held is None or held[0] != key or (not params and held[2]):
        held = cache[path] = (key, load_ann(path, record), record.search_params)
    if params != held[2]:
        set_search_params(held[1].index, params, record.factory)
        cache[path] = held = (key, held[1], params)
    return held[1]


def _rescore(
    scorer, q, rows_q: slice, shard: int, ann: LoadedAnn, labels: np.ndarray, q_self: torch.Tensor, top: RunningTopK
) -> None:
    """Exact scores of the queries `rows_q` against their own candidates `labels` (local rows of
    `shard`, -1: none), into `top`. The union of the candidates is read once, sorted (each row
    verified against its own checksum), decoded once; then one GEMM against the union and a
    gather, unless the union is much larger than C, where gathering each query's own rows (memory
    bound) costs less; both give exact scores."""
    store, mode = scorer.store, scorer.mode
    info = store.shards[shard]
    valid = labels >= 0
    rows_at = np.unique(labels[valid])
    if not len(rows_at):
        return
    with scorer.tracker.phase("ann-read"):
        stored = gather_stored(store, shard, rows_at, ann.row_sums[rows_at])
        rows = store.codec.decode(stored).to(scorer.score_dtype)
        ids = store.ids_at(rows_at + info.offset)
    scorer.tracker.count(bytes_read=stored.nbytes)
    where = torch.from_numpy(np.searchsorted(rows_at, np.where(valid, labels, rows_at[0])))
    pre = q.pre[rows_q]
    with scorer.tracker.phase("gemm"):
        if len(rows_at) <= UNION_GEMM_RATIO * labels.shape[1]:
            dots = (pre @ rows.T).gather(1, where)
        else:
            dots = torch.bmm(rows[where], pre[:, :, None]).squeeze(2)
        row_self = None if mode == "dot" else torch.from_numpy(ann.row_self[rows_at]).to(scorer.score_dtype)[where]
        scores = normalize(dots, mode, q_self[rows_q], row_self)
    mask = torch.from_numpy(~valid)
    top.update(scores.masked_fill(mask, -torch.inf), torch.from_numpy(ids)[where].masked_fill(mask, ID_PAD), rows_q)
