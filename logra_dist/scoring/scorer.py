"""The scoring orchestrator: query gradients in, top-k training examples out, on any world size.

1. Queries are split over ranks: each rank captures its share exactly as the Logger captures
   training batches (any engine, weights sharded), or loads it from a query index.
2. `topk(k)` (collective): each rank preconditions its queries with the index's statistics and
   all-gathers them (every rank then holds all queries); it streams its own training rows
   (`partition.assign_rows`: independent of the logging world size) from disk with prefetch,
   scores them chunk by chunk and keeps a running top-k per query; the (n_q, k) lists of all
   ranks are all-gathered and merged. Ties go to the smaller training id, so the result does not
   depend on the world size. Every rank calls every collective, also a rank with no rows.
Memory is O(queries x (D + k) + query_chunk x chunk_rows), never O(queries x index) unless
`scores()` is asked for. Self-influence (RelatIF, cosine) is computed while scoring the first
time and cached in the index (`scoring/selfinf.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist import comm
from logra_dist.config import SCORE_MODES, ConfigError
from logra_dist.core.curvature import CURVATURES
from logra_dist.core.projection import LayerSpec
from logra_dist.engines import Engine
from logra_dist.index.format import IndexFormatError, layout_to_json, read_stats
from logra_dist.index.partition import assign_rows
from logra_dist.index.reader import GradientStore
from logra_dist.index.stream import ChunkStream
from logra_dist.scoring import cacheplace
from logra_dist.scoring.ann import ann_topk
from logra_dist.scoring.identity import check_query_index, check_scoring_model
from logra_dist.scoring.kernels import GroupPlan, RunningTopK, TopKResult, normalize, select_topk
from logra_dist.scoring.queries import GatheredQueries, QuerySet, pca_projections
from logra_dist.scoring.results import ResultsWriter, TextLookup, results_meta, write_results
from logra_dist.scoring.scan import attach_bottoms, score_local
from logra_dist.scoring.selfinf import SelfInfluenceCache
from logra_dist.session import GradientSession
from logra_dist.tracking import NULL_TRACKER

Chunk = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]  # start, ids, rows, self (c, L)


class Scorer:
    """Pass the model (or engine) to compute query gradients, or None to score precomputed ones.

    With a model, `self.session` (a GradientSession) captures query batches into `self.queries`;
    `capture`, `backward`, `model`, `engine`, `device` and `projection` are the session's.

    chunk_rows: training rows per streamed chunk. 512 rows keep the chunked GEMM as fast as one
    big matmul (the queries are re-read once per chunk) and the stream's buffers small enough to
    stay in cache: 4096 read 35% slower (bench/scorer_throughput.py); the bfloat16 prefilter, where
    it runs, streams chunks of at least 4096 rows (scan.PREFILTER_CHUNK_ROWS). block_bytes: bound on one score block
    (query_chunk x chunk_rows floats per layer-group atom); queries are processed in chunks of
    that size against each training chunk. Self-influence (relatif, cosine) is cached in the index,
    or in `cache_dir` (default $LOGRA_DIST_HOME/selfinf) where the index is read-only, or not at
    all (scoring/cacheplace.py); cache_self_influence=False never writes anything.
    """

    def __init__(
        self,
        model_or_engine: Any,
        index_dir: str | Path,
        *,
        mode: str = "relatif",
        damping: float | None = None,
        chunk_rows: int = 512,
        block_bytes: int = 256 << 20,
        dtype: torch.dtype = torch.float32,
        cache_self_influence: bool = True,
        cache_dir: str | Path | None = None,
        tracker=None,
        tokenizer: str | None = None,
        allow_model_mismatch: bool = False,
    ):
        self.tracker = tracker if tracker is not None else NULL_TRACKER  # phase timers (logra_dist.tracking)
        if mode not in SCORE_MODES:
            raise ConfigError(f"score mode {mode!r} is not one of {list(SCORE_MODES)}")
        if chunk_rows < 1 or block_bytes < 1:
            raise ConfigError(f"chunk_rows and block_bytes must be positive, got {chunk_rows}, {block_bytes}")
        self.index_dir = Path(index_dir)
        self.store = GradientStore(self.index_dir)
        self.store.tracker = self.tracker
        attrs, state = read_stats(self.index_dir / "stats.h5")
        config = self.store.config
        self.mode, self.chunk_rows, self.block_bytes, self.score_dtype = mode, chunk_rows, block_bytes, dtype
        self.damping = float(attrs["damping"] if damping is None else damping)
        self.hessian = str(attrs["hessian"])
        projections = None
        if config.init == "pca":
            try:
                projections = pca_projections(state, self.store.layout, self.index_dir / "stats.h5")
            except IndexFormatError:
                self.store.close()
                raise
        self.config = config
        self.queries = QuerySet(self.store.width)
        self.session: GradientSession | None = None
        if model_or_engine is not None:
            try:  # e.g. the index's optimizer state is gone or changed: refused, the store closed
                self.session = GradientSession(
                    model_or_engine, config, projections, on_rows=self._add_rows, tracker=self.tracker
                )
            except BaseException:
                self.store.close()
                raise
            if list(self.session.specs) != self.store.layout:
                self.session.close()  # leave the user's model as it was: no hooks, weights unfrozen
                self.store.close()
                raise IndexFormatError(
                    f"{self.index_dir}: the model's selected layers do not match the index "
                    f"layout (model: {[(s.name, s.d_in, s.d_out) for s in self.session.specs][:4]}..., "
                    f"index: {[(s.name, s.d_in, s.d_out) for s in self.store.layout][:4]}...)"
                )
        self.allow_model_mismatch = allow_model_mismatch
        self.model_mismatch = check_scoring_model(self.store, self.session, tokenizer, allow_model_mismatch)
        self.preconditioner = CURVATURES.get(self.hessian).from_state(self.store.layout, self.damping, state)
        self.rank, self.world = comm.rank(), comm.world_size()
        self.assignment = assign_rows([s.rows for s in self.store.shards], self.world)
        self.cache_self_influence = cache_self_influence
        self._row_self = self.preconditioner.layer_self_influence(dtype)
        self._cache = SelfInfluenceCache(
            self.index_dir, self.hessian, self.damping, len(self.store), layout_to_json(self.store.layout), cache_dir
        )
        # score_in_chunks: the first chunk's self-influence plan; for "compute", row values by chunk
        self._kept_plan: tuple[str | None, int] | None = None
        self._kept_row_self: dict[tuple[int, int], torch.Tensor] | None = None  # (start, rows) -> (rows, L)

    # -- queries (local, no collectives) ----------------------------------------------------
    def _query_session(self, call: str) -> GradientSession:
        if self.session is None:
            raise RuntimeError(
                f"Scorer.{call}: this Scorer was made without a model (Scorer(None, ...)) and scores "
                "precomputed query gradients (add_query_gradients); pass the model to capture queries"
            )
        return self.session

    def capture(self, ids, mask: torch.Tensor | None = None) -> AbstractContextManager[None]:
        """Capture one query batch, as `Logger.capture` does a training batch (see GradientSession)."""
        return self._query_session("capture()").capture(ids, mask)

    def backward(self, loss: torch.Tensor) -> None:
        self._query_session("backward()").backward(loss)

    @property
    def model(self):
        """Call this for the query forward passes (see GradientSession.model)."""
        return self._query_session("model").model

    @property
    def engine(self) -> Engine:
        return self._query_session("engine").engine

    @property
    def device(self) -> torch.device:
        return self._query_session("device").device

    @property
    def specs(self) -> list[LayerSpec]:
        """The scored layers (the index layout; with a model, checked to be the model's selection)."""
        return self.store.layout

    def projection(self, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._query_session("projection()").projection(layer_name)

    def _add_rows(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.queries.add(rows, ids)

    def add_query_gradients(self, rows: Any, ids: Any = None, *, share: bool = True) -> None:
        """Precomputed projected query gradients: an (n, D) array with its ids, or a query index
        (a GradientStore or its folder, logged with this index's config). From a query index each
        rank takes its contiguous share (share=True, the default: call it on every rank), all of
        it (share=False, for a single rank), or, with `ids`, just those queries (a rank's share of
        a chunk: `score_in_chunks`)."""
        if isinstance(rows, (str, Path)):
            with GradientStore(rows) as store:
                return self.add_query_gradients(store, ids, share=share)
        if isinstance(rows, GradientStore):
            ids = None if ids is None else np.asarray(ids, np.int64)
            self.queries.add_store(rows, self.store, share, self.chunk_rows, ids)  # layouts and configs checked first
            self.model_mismatch = check_query_index(self.store, rows, self.allow_model_mismatch) or self.model_mismatch
            return None
        if ids is None:
            raise ValueError("add_query_gradients(rows, ids): ids are required for an array of rows")
        self.queries.add(torch.as_tensor(np.asarray(rows)), torch.as_tensor(np.asarray(ids)))
        return None

    @property
    def query_ids(self) -> np.ndarray:
        """This rank's query ids, in the order they were added."""
        return self.queries.local_ids

    # -- collective helpers -----------------------------------------------------------------
    def _agreed(self, work: Callable[[], Any], what: str) -> Any:
        """Run rank-local work, then agree (one all-reduce) on whether any rank failed, so that a
        failing rank never leaves the others waiting in a later collective."""
        error, result = None, None
        try:
            result = work()
        except Exception as e:  # re-raised below, after the other ranks know
            error = e
        flags = torch.zeros(self.world, dtype=torch.float64)
        flags[self.rank] = 1.0 if error is not None else 0.0
        failed = [r for r, f in enumerate(comm.all_reduce_sum(flags).tolist()) if f]
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"{what} failed on rank(s) {failed}; see the error reported there")
        return result

    def _gather_queries(self) -> GatheredQueries:
        q = self.queries.gather(self.preconditioner, self.store.layout, self.score_dtype)
        if len(q.ids) == 0:
            raise RuntimeError("no queries on any rank: use capture()/backward() or add_query_gradients()")
        return q

    def _plan_self_influence(self, need: bool) -> tuple[str | None, int]:
        """Collective: ('read' | 'write' | 'compute' | None, token). All ranks agree."""
        if not need:
            return None, 0
        return cacheplace.plan(self._cache, self.cache_self_influence, self.world)

    def _scored(self, work: Callable[[], Any], self_plan: tuple[str | None, int]) -> Any:
        """The local streaming phase, agreed across ranks; on failure no part file is left behind."""
        try:
            return self._agreed(work, "scoring")
        except BaseException:  # KeyboardInterrupt too
            if self_plan[0] == "write":
                cacheplace.remove_quietly(self._cache.part_path(self_plan[1], self.rank))
            self._cache.close()
            raise

    def _finish_self_influence(self, plan: str | None, token: int) -> bool:
        """Collective: rank 0 merges the parts into selfinf.h5 once every rank has closed its own;
        whether the cache holds the values now."""
        cached = plan == "read" or (
            plan == "write" and cacheplace.finish(self._cache, token, self.assignment, self._agreed)
        )
        self._cache.close()
        return cached

    # -- streaming (local) ------------------------------------------------------------------
    def _chunks(self, plan: str | None, token: int, chunk_rows: int | None = None) -> Iterator[Chunk]:
        """This rank's training rows as (start, ids, rows, per-layer self-influence or None); the
        rows live in a reused buffer, valid until the next chunk. chunk_rows: default self.chunk_rows."""
        writer = self._cache.part_writer(token, self.rank) if plan == "write" else None
        ok = False
        try:
            side = self._cache.read if plan == "read" else None
            for start, ids, rows, cached in ChunkStream(
                self.store, self.assignment[self.rank], chunk_rows or self.chunk_rows, side=side
            ):
                key = (start, len(ids))
                rows = rows.to(self.score_dtype)
                row_self = None
                if plan == "read":
                    row_self = torch.from_numpy(cached).to(self.score_dtype)
                elif plan == "compute" and self._kept_row_self is not None and key in self._kept_row_self:
                    row_self = self._kept_row_self[key]
                elif plan is not None:
                    step = self.chunk_rows  # in pieces of chunk_rows: its temporaries stay small in larger chunks
                    pieces = [self._row_self(rows[a : a + step]) for a in range(0, max(1, len(rows)), step)]
                    row_self = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                    if plan == "compute" and self._kept_row_self is not None:
                        self._kept_row_self[key] = row_self
                    if writer is not None:
                        writer.append(row_self.float().numpy())
                yield start, torch.from_numpy(ids), rows, row_self
            ok = True
        finally:
            if writer is not None:
                writer.close()
                if not ok:
                    cacheplace.remove_quietly(writer.path)

    def _query_chunk(self, n_q: int, n_atoms: int, chunk_rows: int | None = None) -> int:
        """Queries per score block; the same on every rank (depends on global sizes only)."""
        rows = min(chunk_rows or self.chunk_rows, max(1, len(self.store)))
        per_query = rows * self.score_dtype.itemsize * (2 * n_atoms + 2)
        return max(1, min(n_q, self.block_bytes // per_query))

    # -- public collectives -----------------------------------------------------------------
    def topk(
        self,
        k: int,
        groups: dict[str, str] | None = None,
        *,
        ann: bool = False,
        candidates: int | None = None,
        bottomk: int = 0,
        search_params: str | None = None,
    ) -> TopKResult:
        """Collective: the k best training ids per query (all ranks return the same result).
        groups: {name: layer-name regex} adds block-restricted results in `result.groups`.
        bottomk: also the `bottomk` lowest-scoring (most opposing) ids, in `result.bottom` (and each
        group's), lowest first (`scoring/scan.py`).
        Queries are ordered by id; k larger than the index returns every row. ann=True: only the
        `candidates` rows per query and shard that the shards' ANN files retrieve are scored
        (exactly; `scoring/ann.py`), search_params (e.g. "nprobe=64") in place of the files' own;
        `result.info` records both."""
        if k < 1:
            raise ValueError(f"topk: k must be >= 1, got {k}")
        k = min(k, max(1, len(self.store)))  # before any (n_q, k) list is allocated: same result
        if bottomk < 0:
            raise ValueError(f"topk: bottomk must be >= 0, got {bottomk}")
        bottomk = min(bottomk, max(1, len(self.store)))
        if search_params is not None and not ann:
            raise ValueError("topk: search_params tune the ANN search; pass ann=True or drop them")
        if ann:
            if bottomk:
                raise ValueError("topk(ann=True): bottom-k is not supported (ANN retrieves the nearest rows only)")
            return ann_topk(self, k, groups, candidates, search_params)
        plan = GroupPlan(self.store.layout, groups)
        q = self._gather_queries()
        self_plan = self._kept_plan or self._plan_self_influence(self.mode != "dot")
        tops, bottoms = self._scored(lambda: score_local(self, q, plan, k, bottomk, self_plan), self_plan)
        self._finish_self_influence(*self_plan)
        if self._kept_row_self is not None:  # inside score_in_chunks: later chunks reuse the plan
            self._kept_plan = ("read", 0) if self_plan[0] == "write" else self_plan
        k_out = min(k, len(self.store))
        results = [self._reduce(t, k, k_out, q.ids) for t in tops]
        total = results[0]
        total.groups = dict(zip(plan.names[1:], results[1:]))
        if bottoms:
            b_out = min(bottomk, len(self.store))
            attach_bottoms(total, [self._reduce(b, bottomk, b_out, q.ids) for b in bottoms], plan.names)
        return total

    def clear_queries(self) -> None:
        """Drop the queries added so far (local): the next chunk of queries starts empty."""
        self.queries = QuerySet(self.store.width)

    def score_in_chunks(
        self, k: int, chunks: Iterable[Callable[[], Any]], groups: dict[str, str] | None = None, **options: Any
    ) -> Iterator[TopKResult]:
        """Collective, bounded memory: each item of `chunks` (as many on every rank), called, adds
        this rank's queries of one chunk; topk(k, groups, **options) of them is yielded, then they
        are dropped. Training self-influence is planned (computed or cached) once for all chunks."""
        self._kept_plan, self._kept_row_self = None, {}
        try:
            for feed in chunks:
                self.clear_queries()
                feed()
                with self.tracker.phase("score"):  # time/score: the topk() calls, as for one pass
                    result = self.topk(k, groups, **options)
                yield result
                self.clear_queries()
        finally:
            self._kept_plan, self._kept_row_self = None, None

    def _reduce(self, top: RunningTopK, k: int, k_out: int, query_ids: np.ndarray) -> TopKResult:
        """Merge the ranks' lists, query chunk by query chunk (bounded memory)."""
        n_q = len(query_ids)
        step = max(1, self.block_bytes // (12 * k * max(1, self.world)))
        scores, ids = np.empty((n_q, k_out), np.float32), np.empty((n_q, k_out), np.int64)
        for a in range(0, n_q, step):
            b = min(n_q, a + step)
            s = torch.cat(comm.all_gather_rows(top.scores[a:b].contiguous()), 1)
            i = torch.cat(comm.all_gather_rows(top.ids[a:b].contiguous()), 1)
            s, i = select_topk(s, i, k)
            scores[a:b], ids[a:b] = s[:, :k_out].float().numpy(), i[:, :k_out].numpy()
        return TopKResult(scores, ids, query_ids, self.mode, self.damping)

    def scores(self) -> np.ndarray:
        """Collective: the full (n_queries x n_train) matrix on every rank, rows ordered by query
        id, columns in store order (`self.store.ids`). For small cases only."""
        q = self._gather_queries()
        self_plan = self._plan_self_influence(self.mode != "dot")

        def local() -> torch.Tensor:
            q_self = q.self_layers.sum(1)
            cols = [
                normalize(q.pre @ rows.T, self.mode, q_self, None if rs is None else rs.sum(1))
                for _, _, rows, rs in self._chunks(*self_plan)
            ]
            return torch.cat(cols, 1) if cols else torch.zeros(len(q.ids), 0, dtype=self.score_dtype)

        mine = self._scored(local, self_plan)
        self._finish_self_influence(*self_plan)
        out = np.empty((len(q.ids), len(self.store)), np.float32)
        for ranges, block in zip(self.assignment, comm.all_gather_rows(mine.T.contiguous())):
            done = 0
            for lo, hi in ranges:
                out[:, lo:hi] = block[done : done + hi - lo].T.float().numpy()
                done += hi - lo
        return out

    def train_self_influence(self, per_layer: bool = False) -> np.ndarray:
        """Collective: g^T H^-1 g of every training row in store order, (N,) or (N, L) per layer.
        Computed (and cached in the index) if not cached yet; the whole vector is returned, so
        this is O(N) memory by request."""
        plan, token = self._plan_self_influence(True)
        if plan != "read":
            parts = self._scored(lambda: [(s, rs) for s, _, _, rs in self._chunks(plan, token)], (plan, token))
            if not self._finish_self_influence(plan, token):  # no cache to read back: gather (small: N x L)
                mine = torch.cat([rs for _, rs in parts]) if parts else torch.zeros(0, len(self.store.layout))
                blocks = comm.all_gather_rows(mine.float())
                values = np.empty((len(self.store), len(self.store.layout)), np.float32)
                for ranges, block in zip(self.assignment, blocks):
                    done = 0
                    for lo, hi in ranges:
                        values[lo:hi] = block[done : done + hi - lo].numpy()
                        done += hi - lo
                return values if per_layer else values.sum(1)
        values = self._cache.read(0, len(self.store))
        self._cache.close()
        return values if per_layer else values.sum(1)

    def write_results(
        self,
        out_dir: str | Path,
        result: TopKResult,
        query_text: TextLookup = None,
        train_text: TextLookup = None,
        query_fields: dict[int, dict[str, Any]] | None = None,
        run_id: str | None = None,
    ) -> dict[str, Path] | None:
        """On rank 0 (no collective): topk.h5, topk.jsonl, topk.md with this index's path and config;
        query_fields: extra per-query facts for the listing (see results.listing)."""
        return write_results(
            out_dir,
            result,
            index_dir=self.index_dir,
            config=self.config,
            query_text=query_text,
            train_text=train_text,
            attrs=self._results_attrs(),
            query_fields=query_fields,
            run_id=run_id,
        )

    def results_writer(self, out_dir: str | Path, run_id: str | None = None) -> ResultsWriter:
        """An incremental writer of this run's results (append each score_in_chunks result)."""
        return ResultsWriter(out_dir, results_meta(self.index_dir, self.config, self._results_attrs()), run_id)

    def _results_attrs(self) -> dict[str, Any]:
        """What topk.h5 records of how this Scorer scored (beyond the index path and config)."""
        return {
            "hessian": self.hessian,
            "lambdas": self.preconditioner.lambdas,  # per layer: damping x that layer's mean eigenvalue
            "world_size": self.world,
            "allow_model_mismatch": self.allow_model_mismatch,
            "model_mismatch": self.model_mismatch or {},
        }

    def close(self) -> None:
        self._cache.close()
        self.store.close()
        if self.session is not None:
            self.session.close()
