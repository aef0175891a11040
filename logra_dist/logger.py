"""The logging orchestrator: attach to a model or engine, capture batches, finalize the index.

Per batch nothing crosses ranks: rows go to this rank's shard through a background writer and
statistics accumulate locally. `finalize()` is the collective point of the epoch: one small
all-reduce of the counts, each layer's statistics summed onto the rank that decomposes them (in
buckets; core/curvature/finalize.py), the decompositions sent to rank 0, which writes `stats.h5`
and `manifest.json`. `attach()` does
one tiny all-reduce too, so that every rank agrees to start, resume (resume=True) or refuse
(docs/reliability.md). Every `flush_rows` logged rows (at most once per `commit_seconds`, and
per 20x the last commit's cost) the shard commits them with the statistics covering exactly
them; a killed job resumed with the same command and resume=True re-logs only the samples after
each rank's last commit, and ends with every id logged exactly once.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist import comm
from logra_dist.config import MODEL_FISHERS, ConfigError, LoGraConfig
from logra_dist.core.capture import GradientCapture
from logra_dist.core.curvature import CURVATURES, KFAC
from logra_dist.core.curvature.finalize import FinalizeReport, finalize_statistics
from logra_dist.core.fisher import FisherTargets
from logra_dist.core.projection import LayerSpec
from logra_dist.data import DataIdentity
from logra_dist.engines.fingerprint import model_fingerprint
from logra_dist.index.format import (
    MANIFEST_FILE,
    STATS_FILE,
    IndexFormatError,
    Manifest,
    ShardAttrs,
    job_identity,
    layout_to_json,
    rank_stats_path,
    shard_content_digest,
    shard_path,
    stats_attrs,
    upgrade_manifest,
)
from logra_dist.index.h5io import write_json_atomic
from logra_dist.index.lock import JobLocks, lock_job
from logra_dist.index.resume import agree_on_state, pca_path, read_pca, write_pca
from logra_dist.index.signals import StopOnSignals
from logra_dist.index.stats_writer import StatsWriter
from logra_dist.index.writer import ShardWriter
from logra_dist.session import GradientSession
from logra_dist.tracking import NullTracker

# A commit (statistics snapshot + its file + fsyncs) may take at most this share of the time:
# commits are spaced by at least its cost / COMMIT_SHARE. A raw Fisher at k=64 is GBs (float32:
# 0.74 GB on the embedded model, 3.7 GB on the 25M one), whose commit takes seconds, so flush_rows
# and the time floor alone could spend a large share of a fast model's time on commits.
COMMIT_SHARE = 0.05
# Rank 0 writes the outcome of its stats.h5 + manifest work here; the other ranks poll it.
FINALIZE_STATUS = ".finalize-status"


def _digest_words(digest: str) -> tuple[int, int]:
    """A 96-bit hex digest as two 48-bit integers (exact in the float64 all-reduce)."""
    return int(digest[:12], 16), int(digest[12:24], 16)


class Phase(Enum):
    """Where a Logger is in its life; every method checks it, so a call out of order says what to do.

    PCA_PENDING -> (pca_pass: PCA) -> LOGGING <-> (statistics_pass: STATISTICS) -> FINALIZED;
    close() from any phase -> CLOSED. Without init="pca" (or when resuming) it starts in LOGGING.
    """

    PCA_PENDING = "pca-pending"  # init="pca": no projections yet, run pca_pass() first
    PCA = "pca"  # inside pca_pass(): batches feed the PCA covariances only
    LOGGING = "logging"  # batches are written to the shard
    STATISTICS = "statistics"  # inside statistics_pass(): batches feed the curvature only
    FINALIZED = "finalized"  # the index is complete
    CLOSED = "closed"  # hooks removed, weights unfrozen


_FIX = {
    Phase.PCA_PENDING: "init='pca' needs its projections first: capture a pass over the data inside "
    "`with logger.pca_pass():`",
    Phase.PCA: "leave the `with logger.pca_pass():` block first",
    Phase.LOGGING: "",
    Phase.STATISTICS: "leave the `with logger.statistics_pass():` block first",
    Phase.FINALIZED: "the index is finalized; attach a new Logger to log more",
    Phase.CLOSED: "the Logger is closed; attach a new one",
}


class Logger(GradientSession):
    """Writes per-sample projected gradients of every captured batch to this rank's shard."""

    _written = (0.0, 0)  # (seconds, bytes) of this logger's writers already closed (tracker figures)
    _signals = StopOnSignals()  # replaced by an installed one in __init__; this one restores nothing
    finalize_report: FinalizeReport | None = None  # where finalize's time went (set by finalize)

    def __init__(
        self,
        model_or_engine: Any,
        config: LoGraConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        model_info: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        data: DataIdentity | None = None,
        asynchronous_writes: bool = True,
        commit_seconds: float | None = None,
        tracker: NullTracker | None = None,
    ):
        """resume: continue the interrupted job in out_dir (see `done_ids`; starts fresh if there
        is none); commit_seconds: commit at most this often (default $LOGRA_DIST_COMMIT_SECONDS or
        30), only after `flush_rows` new rows and at most once per 20x the last commit's cost,
        bounding the work a kill loses (0: at every `flush_rows` rows, whatever the cost); metadata: JSON-able
        facts about the job (data source, model path) recorded in the manifest; data: what is
        logged (`data.DataIdentity`), recorded in every shard and the manifest: a resume with
        other data or row-changing settings is refused, naming the field; tracker: phase
        timers and I/O counters (logra_dist.tracking.Tracker), none by default."""
        self.out_dir = Path(out_dir)
        if tracker is not None:
            self.tracker = tracker
            tracker.add_source(self._writer_figures)
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self.metadata = metadata or {}
        self.data = data.to_dict() if data is not None else {}
        self._asynchronous = asynchronous_writes
        self._commit_seconds = (
            float(os.environ.get("LOGRA_DIST_COMMIT_SECONDS") or 30.0) if commit_seconds is None else commit_seconds
        )
        self._covariances: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.nonfinite_ids: list[int] = []
        self.done_ids: set[int] = set()  # handled by this rank (logged or non-finite), resumed ones too
        self._writer: ShardWriter | None = None  # exists in phases LOGGING and STATISTICS
        self._locks = JobLocks([])  # one writer per index: held from here to finalize/close (index/lock.py)
        self.phase = Phase.PCA_PENDING
        super().__init__(model_or_engine, config, None)
        self.model_info = model_info or self.engine.model_identity()
        # the dtype the engine computes the gradients in (its bf16/fp16, FSDP mixed precision) and
        # the rows' storage dtype, in every manifest whoever attaches (CLI, Trainer helper, a script)
        model_dtype = str(self.engine.compute_dtype).removeprefix("torch.")
        self.metadata = {"precision": {"model": model_dtype, "storage": config.storage_dtype}, **self.metadata}
        self._signals = StopOnSignals().install()  # SIGINT/SIGTERM: a clean stop, the shard resumable
        try:
            self._locks = lock_job(self.out_dir, self.rank, self.world_size)  # before anything is read or cut
            with self.tracker.phase("fingerprint"):  # collective: one small all-reduce
                fingerprint = model_fingerprint(self.engine.root, self._modules)
            self.model_info = {**self.model_info, "fingerprint": fingerprint}
            self.identity = job_identity(self.model_info, self.metadata)
            self._resuming, self._finished = agree_on_state(
                self.out_dir, self.rank, self.world_size, self._shard_attrs().to_dict(), resume
            )
            if self._resuming and config.init == "pca":  # log with the projections of the first attempt
                self._install(read_pca(pca_path(self.out_dir), layout_to_json(self.specs)))
            if config.init != "pca" or self._resuming:
                self._start_writing()
        except BaseException:
            self._locks.release()
            self._signals.restore()
            super().close()  # leave the user's model as it was: no hooks, weights unfrozen
            raise

    def _shard_attrs(self) -> ShardAttrs:
        return ShardAttrs.for_job(
            self.specs,
            self.config.to_json(),
            self.config.storage_dtype,
            self.rank,
            self.world_size,
            self.model_info,
            self.data,
            self.identity,
        )

    def _start_writing(self) -> None:
        self.accumulator = CURVATURES.get(self.config.hessian)(self.specs, self.compute_dtype)
        self._capture.token_stats = self.accumulator if self._logged_batches_feed_statistics else None
        self._writer = ShardWriter(
            shard_path(self.out_dir, self.rank),
            self.specs,
            self._shard_attrs(),
            self.config.flush_rows,
            self.config.writer_queue,
            resume=self._resuming,
            asynchronous=self._asynchronous,
        )
        state = self._writer.resume_state
        if state.stats is not None:
            self.accumulator.load_snapshot(state.stats)
        if "fisher_estimator" in state.stats_meta:  # the interrupted attempt's statistics: only its kind may join
            self.metadata["fisher_estimator"] = state.stats_meta["fisher_estimator"]
        self.nonfinite_ids = [int(i) for i in state.nonfinite_ids]
        self.done_ids = set(int(i) for i in state.ids) | set(self.nonfinite_ids)
        self._rows_since_commit, self._last_commit, self._snapshot_seconds = 0, time.monotonic(), 0.0
        self.phase = Phase.LOGGING

    def _require(self, call: str, *allowed: Phase) -> None:
        """Refuse `call` outside the allowed phases, naming the phase and what to do instead."""
        if self.phase not in allowed:
            raise RuntimeError(f"{call} in phase {self.phase.value!r}: {_FIX[self.phase]}")

    def _check_capture(self) -> None:
        self._require("capture()", Phase.PCA, Phase.LOGGING, Phase.STATISTICS)

    @property
    def needs_pca_pass(self) -> bool:
        """init="pca" and no projections yet (a resumed job reuses those of its first attempt)."""
        return self.phase is Phase.PCA_PENDING

    # -- PCA: a statistics pass before logging --------------------------------------------------
    @contextmanager
    def pca_pass(self) -> Iterator[None]:
        """Collect full-width activation and gradient covariances (capture batches as usual inside
        the block; nothing is written), then build PCA projections. Collective at exit."""
        if not self.needs_pca_pass:
            raise RuntimeError(
                f"pca_pass() in phase {self.phase.value!r}: it is only for config.init='pca', once, before "
                "logging, and not in a resumed job (check Logger.needs_pca_pass)"
            )
        full = [LayerSpec(s.name, s.kind, s.d_in, s.d_out, s.d_in, s.d_out) for s in self.specs]
        acc = KFAC(full, self.compute_dtype)
        identity = {s.name: (None, None) for s in full}  # covariances in the optimizer-scaled space
        self._capture = GradientCapture(
            full, self._modules, identity, self.compute_dtype, scaling=self.scaling, root=self.engine.root
        )
        self._capture.token_stats, self._capture.want_rows = acc, False
        self._pca_accumulator = acc
        self.phase = Phase.PCA
        try:
            yield
        finally:
            self._capture.remove()
            self._capture = None
            if self.phase is Phase.PCA:
                self.phase = Phase.PCA_PENDING
        acc.load_flat(comm.all_reduce_sum(acc.flat()))
        self._covariances = acc.covariances()
        self._install(self._build_projections(self._covariances))
        if self.rank == 0:
            write_pca(pca_path(self.out_dir), layout_to_json(self.specs), self.projections)
        comm.barrier()  # saved before any rank writes a row: a resumed job always finds them
        self._start_writing()

    # -- true Fisher: a statistics-only pass with sampled labels ---------------------------------
    @property
    def _logged_batches_feed_statistics(self) -> bool:
        """With fisher="empirical" the logged rows (data labels) are also the Fisher's samples."""
        return self.accumulator.uses_token_statistics and self.config.fisher == "empirical"

    def fisher_targets(self, classes: int | None = None) -> FisherTargets:
        """How to build this job's statistics batches (`core.fisher.FisherTargets`), resolved from
        the config's fisher ("model": exact over `classes` when given, else fisher_samples draws),
        and recorded in the manifest as "fisher_estimator", so an index says which Fisher it holds."""
        targets = FisherTargets.for_config(self.config, classes)
        told = self.metadata.get("fisher_estimator")
        if told is not None and told != targets.describe():
            raise ConfigError(
                f"fisher_targets(classes={classes!r}) would make this job's statistics {targets.describe()}, "
                f"but earlier batches (an interrupted attempt's too) used {told}: pass the same class count "
                f"for every statistics batch, or delete {self.out_dir} to start over"
            )
        self.metadata["fisher_estimator"] = targets.describe()
        return targets

    @contextmanager
    def statistics_pass(self) -> Iterator[None]:
        """Batches captured inside feed only the curvature statistics; nothing is written.

        For fisher="true" the Fisher is E[g g^T] over labels drawn from the model's predictive
        distribution, while the logged rows keep the data's labels. So per batch the caller
        captures twice: once here with sampled labels, once outside with the data's labels (in
        either order; the statistics are sums). Not collective: use it per batch, any number of
        times, before `finalize()`. `fisher_targets()` makes that batch: `fisher_samples`
        sampled copies ("true") or one copy per class weighted by sqrt(C p_c) ("exact")."""
        if self.config.fisher not in MODEL_FISHERS:
            raise RuntimeError(
                "statistics_pass() is for fisher='true', 'exact' or 'model'; with fisher='empirical' the "
                "logged batches themselves feed the statistics"
            )
        self._require("statistics_pass()", Phase.LOGGING)
        self.phase = Phase.STATISTICS
        self._capture.token_stats = self.accumulator if self.accumulator.uses_token_statistics else None
        try:
            yield
        finally:
            self._capture.token_stats = None
            if self.phase is Phase.STATISTICS:
                self.phase = Phase.LOGGING

    def _drop_nonfinite(self, ids: torch.Tensor, rows: torch.Tensor, logged: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep finite rows only, so that no NaN reaches a shard or the statistics; feed this
        batch's token statistics (KFAC) for the kept samples. `logged`: record dropped ids as
        not logged (a statistics-only batch logs nothing, so drops nothing from the index)."""
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            if logged:
                self.nonfinite_ids.extend(ids[~finite.cpu()].tolist())
            rows, ids = rows[finite], ids[finite.cpu()]
        if self._capture.token_stats is not None:
            self._capture.flush_token_statistics(finite)
        return ids, rows

    # -- per batch --------------------------------------------------------------------------
    def _on_batch(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        if self.phase is Phase.PCA:  # statistics only, of finite samples only
            finite = self._capture.finite_samples(len(ids))
            self._capture.flush_token_statistics(finite)
            self._pca_accumulator.samples += int(finite.sum())
            return
        if self.phase is Phase.STATISTICS:  # before the duplicate check: these ids are logged again outside
            _, rows = self._drop_nonfinite(ids, rows, logged=False)
            self.accumulator.update_rows(rows)
            return
        batch_ids = ids.tolist()
        again = self.done_ids.intersection(batch_ids)
        if again or len(set(batch_ids)) != len(batch_ids):
            raise ValueError(
                f"rank {self.rank}: sample id(s) {sorted(again)[:8] or batch_ids} logged twice; "
                "skip the ids in Logger.done_ids when resuming (Logger.pending)"
            )
        self.done_ids.update(batch_ids)  # finite or not, these samples are handled
        ids, rows = self._drop_nonfinite(ids, rows, logged=True)
        if self.config.fisher == "empirical":
            self.accumulator.update_rows(rows)
        self._writer.append(rows, ids)
        self._rows_since_commit += len(ids)
        if self._commit_due():
            self._commit()

    def _commit_due(self) -> bool:
        """flush_rows new rows, and (unless commit_seconds=0) commit_seconds since the last commit
        began and its cost (snapshot here + file and fsyncs in the writer) <= COMMIT_SHARE of
        the time since; never while the last one is still being written (one snapshot in memory)."""
        if self._rows_since_commit < self.config.flush_rows:
            return False
        if self._commit_seconds <= 0:
            return True
        cost = self._snapshot_seconds + self._writer.last_commit_seconds
        return self._writer.commits_pending == 0 and time.monotonic() - self._last_commit >= max(
            self._commit_seconds, cost / COMMIT_SHARE
        )

    def _commit(self) -> None:
        """Hand the writer the statistics over exactly the rows appended so far (lent, not
        copied: `Curvature.lend`)."""
        start, self._last_commit = time.perf_counter(), time.monotonic()
        parts, released = self.accumulator.lend()
        self._writer.commit(parts, self.nonfinite_ids, released, meta=self._statistics_meta())
        self._snapshot_seconds, self._rows_since_commit = time.perf_counter() - start, 0

    def _statistics_meta(self) -> dict[str, Any]:
        """How this rank's statistics were made, committed with them (a resume checks it)."""
        told = self.metadata.get("fisher_estimator")
        return {} if told is None else {"fisher_estimator": told}

    def _writer_figures(self) -> dict[str, float]:
        """The background writer's own time and bytes (for the tracker)."""
        seconds, nbytes = self._written
        if self._writer is not None:
            seconds, nbytes = seconds + self._writer.write_seconds, nbytes + self._writer.bytes_written
        return {"time/write": seconds, "count/bytes_written": float(nbytes)}

    def pending(self, ids) -> np.ndarray:
        """Mask of the given ids not yet logged by this rank (for resuming a killed job)."""
        return np.array([int(i) not in self.done_ids for i in np.atleast_1d(np.asarray(ids))], dtype=bool)

    # -- end of epoch -----------------------------------------------------------------------
    def finalize(self) -> dict[str, Any]:
        """Collective: build this rank's shard, one small all-reduce of counts and shard
        fingerprints, each layer's statistics reduced onto and decomposed by its owner rank,
        then rank 0 writes stats.h5 and manifest.json. Returns the manifest. Safe to re-run
        after a kill (resume=True): complete shards are adopted, not rebuilt."""
        self._require("finalize()", Phase.LOGGING)
        report, start = FinalizeReport(), time.perf_counter()
        self.finalize_report = report
        with self.tracker.phase("write-drain"):  # close() waits for the writer: views, no copy
            with report.timed("flush"):  # buffered rows folded in, lower tiles mirrored (raw)
                stats = self.accumulator.snapshot(copy=False)
            with report.timed("drain"):
                self._writer.close(
                    complete=True, stats=stats, nonfinite_ids=self.nonfinite_ids, meta=self._statistics_meta()
                )
        self.bytes_written = self._writer.bytes_written
        self._written = (self._written[0] + self._writer.write_seconds, self._written[1] + self._writer.bytes_written)
        if self._finished:
            manifest = self._finished_manifest()
            comm.barrier()
        else:  # ends when manifest.json exists: the per-rank statistics are no longer needed
            manifest = self._reduce_and_write()
        rank_stats_path(shard_path(self.out_dir, self.rank)).unlink(missing_ok=True)
        self._locks.release()
        self._writer, self.phase = None, Phase.FINALIZED
        report.total_s = time.perf_counter() - start
        return manifest

    def _finished_manifest(self) -> dict[str, Any]:
        """A resumed job whose manifest was already written (killed after it, or resumed once
        done): the index is complete and its statistics may be gone, so nothing is recomputed."""
        path = self.out_dir / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
            mine = manifest["shards"][self.rank]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise IndexFormatError(f"{path}: unreadable manifest of the finished index ({e!r})") from e
        if (mine.get("rows"), mine.get("ids_digest")) != (self._writer.rows_total, self._writer.ids_digest):
            raise IndexFormatError(
                f"{path}: lists rank {self.rank}'s shard with other rows or ids than "
                f"{shard_path(self.out_dir, self.rank)} holds; the index was altered"
            )
        manifest = upgrade_manifest(manifest)
        self._warn_nonfinite(int(manifest.get("nonfinite_total") or 0))
        return manifest

    def _warn_nonfinite(self, total: int) -> None:
        """On rank 0: how many samples were left out and where their ids are; the ids shown are
        rank 0's own (its shard's), so nothing is gathered."""
        if self.rank == 0 and total:
            mine = sorted(self.nonfinite_ids)
            shown = f"ids {mine[:10]}{' ...' if len(mine) > 10 else ''}" if mine else "none of them"
            warnings.warn(
                f"{total} sample(s) had non-finite gradients and were left out of the index and its "
                f"statistics; rank 0's shard holds {shown}. Every shard keeps its own in the dataset "
                "'nonfinite_ids' (counts in manifest.json; GradientStore.nonfinite_ids(), logra-dist inspect)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _reduce_and_write(self) -> dict[str, Any]:
        """One small all-reduce of counts and fingerprints; the statistics summed onto and
        decomposed by each layer's owner rank (core/curvature/finalize.py); rank 0 writes the
        files while the others poll for the outcome (comm.rank0_alone)."""
        w = self.world_size
        status = self.out_dir / FINALIZE_STATUS
        if self.rank == 0:
            status.unlink(missing_ok=True)  # a previous attempt's, before the collective below
        info = torch.zeros(6 * w, dtype=torch.float64)
        info[self.rank] = self._writer.rows_total
        info[w + self.rank], info[2 * w + self.rank] = _digest_words(self._writer.ids_digest)
        report = self.finalize_report
        with report.timed("digest"):
            content = shard_content_digest(shard_path(self.out_dir, self.rank))
        info[3 * w + self.rank], info[4 * w + self.rank] = _digest_words(content)
        info[5 * w + self.rank] = len(self.nonfinite_ids)  # a count: the ids stay in the shard
        local = self.accumulator.counts()
        with self.tracker.phase("all-reduce"), report.timed("counts"):
            reduced = comm.all_reduce_sum(torch.cat([local, info]))
        self.accumulator.load_counts(reduced[: local.numel()])
        if self.config.fisher in MODEL_FISHERS and self.accumulator.needs_statistics and self.accumulator.samples == 0:
            raise RuntimeError(
                f"fisher={self.config.fisher!r} but no batch was captured inside statistics_pass(): the "
                "Fisher has no samples (capture each batch there with sampled labels)"
            )
        counts = [int(c) for c in reduced[local.numel() :].tolist()]
        digests = [f"{hi:012x}{lo:012x}" for hi, lo in zip(counts[w : 2 * w], counts[2 * w : 3 * w])]
        contents = [f"{hi:012x}{lo:012x}" for hi, lo in zip(counts[3 * w : 4 * w], counts[4 * w : 5 * w])]
        nonfinite = counts[5 * w : 6 * w]
        if sum(counts[:w]) == 0:
            raise ValueError(
                f"{self.out_dir}: no sample was logged ({sum(nonfinite)} had non-finite "
                "gradients); an index needs at least one"
            )
        manifest = self._manifest(counts[:w], digests, nonfinite, contents)
        self._warn_nonfinite(sum(nonfinite))
        stats = None
        if self.rank == 0:  # stats.h5 written while the later layers are decomposed
            attrs = stats_attrs(manifest, self.accumulator.samples)
            stats = StatsWriter(self.out_dir / STATS_FILE, self.config.hessian, self.config.damping, attrs)
        try:
            lambdas = self._decompose(stats)

            def write() -> None:
                with self.tracker.phase("stats"), report.timed("stats"):  # the last layers, the digest
                    self._finish_stats(stats, manifest, lambdas)
                with report.timed("manifest"):
                    write_json_atomic(self.out_dir / MANIFEST_FILE, manifest)

            with report.timed("alone"):
                comm.rank0_alone(write, status, manifest["shards_digest"])
        except BaseException:  # any rank's failure, a signal: no stats.h5, its writer stopped
            if stats is not None:
                stats.abort()
            raise
        report.alone_s -= report.stats_s + report.manifest_s  # rank 0's own work is timed apart
        return manifest

    def _decompose(self, stats: StatsWriter | None) -> dict[str, float]:
        """Every layer's eigendecomposition, streamed into `stats` on rank 0 (None elsewhere);
        returns the lambdas on rank 0 ({} elsewhere, and without statistics)."""
        lambdas: dict[str, float] = {}
        if not self.accumulator.needs_statistics or self.accumulator.samples <= 0:
            return lambdas
        kind, damping = type(self.accumulator), self.config.damping

        def keep(spec: LayerSpec, get) -> None:
            def state() -> dict[str, np.ndarray]:  # in the writer thread: may wait for the transfer
                pre = kind.from_factors([spec], damping, {spec.name: get()})  # damping is per layer
                lambdas.update(pre.lambdas)
                return pre.state()

            stats.add(state)

        finalize_statistics(
            self.accumulator, damping, self.device, self.tracker, self.finalize_report, None if stats is None else keep
        )
        return lambdas

    def _manifest(
        self, rows_per_rank: list[int], digests: list[str], nonfinite_per_rank: list[int], contents: list[str]
    ) -> dict[str, Any]:
        return Manifest.build(
            config=self.config.to_dict(),
            specs=self.specs,
            rows_per_rank=rows_per_rank,
            digests=digests,
            samples_in_statistics=self.accumulator.samples,
            nonfinite_per_rank=nonfinite_per_rank,
            model=self.model_info,
            engine=self.engine.kind,
            metadata=self.metadata,
            data=self.data,
            content_digests=contents,
        ).to_dict()

    def _finish_stats(self, stats: StatsWriter, manifest: dict[str, Any], lambdas: dict[str, float]) -> None:
        """After the layers: the PCA projections, then stats.h5 closed and renamed into place."""
        state: dict[str, np.ndarray] = {}
        for name, (p_in, p_out) in self.projections.items():
            if self.config.init == "pca":  # random projections are regenerated from the seed
                state[f"{name}/p_in"] = p_in.cpu().numpy()
                state[f"{name}/p_out"] = p_out.cpu().numpy()
        stats.add(state)
        stats.close()  # every layer's lambda is known once its writer is done
        manifest["lambdas"] = {s.name: lambdas[s.name] for s in self.specs if s.name in lambdas}

    def close(self) -> None:
        """Remove the hooks and restore the weights; an unfinalized shard stays, for resume=True."""
        if self.phase is Phase.CLOSED:
            return
        if self._writer is not None:  # not finalized: keep the partial shard for resume
            self._writer.close(complete=False)
            self._writer = None
        self._locks.release()
        self.phase = Phase.CLOSED
        self._signals.restore()
        super().close()


def attach(model_or_engine: Any, config: LoGraConfig, out_dir: str | Path, **kwargs: Any) -> Logger:
    """Attach LoGra logging to a model, DDP/FSDP module or DeepSpeed engine."""
    return Logger(model_or_engine, config, out_dir, **kwargs)
