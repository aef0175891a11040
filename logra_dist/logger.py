"""The logging orchestrator: attach to a model or engine, capture batches, finalize the index.

Per batch nothing crosses ranks: rows go to this rank's shard through a background writer and
statistics accumulate locally. `finalize()` is the single collective point: one all-reduce of
every statistic and count, then rank 0 writes `stats.h5` and `manifest.json`.
"""
from __future__ import annotations

import importlib.metadata
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import __version__, comm
from .capture import GradientCapture
from .config import LoGraConfig
from .projection import LayerSpec
from .session import GradientSession
from .statistics import Accumulator
from .store import SHARD_DIR, ShardWriter, layout_to_json, shard_path, write_json_atomic, write_stats
from .tracking import NullTracker


def model_identity(root: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(root, "config", None)
    numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in root.parameters())
    return {"class": f"{type(root).__module__}.{type(root).__qualname__}",
            "name_or_path": getattr(cfg, "_name_or_path", None) or None, "parameters": numel}


def versions() -> dict[str, str]:
    out = {"logra_dist": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist_name in ("transformers", "deepspeed", "h5py"):
        try:  # metadata only: importing deepspeed just for its version costs seconds
            out[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


class Logger(GradientSession):
    """Writes per-sample projected gradients of every captured batch to this rank's shard."""

    _written = (0.0, 0)  # (seconds, bytes) of this logger's writers already closed (tracker figures)

    def __init__(self, model_or_engine: Any, config: LoGraConfig, out_dir: str | Path, *,
                 resume: bool = False, model_info: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None, asynchronous_writes: bool = True,
                 tracker: NullTracker | None = None):
        """resume: continue this rank's unfinished shard (see `done_ids`); metadata: JSON-able
        facts about the job (data source, model path) recorded in the manifest; tracker: phase
        timers and I/O counters (logra_dist.tracking.Tracker), none by default."""
        self.out_dir = Path(out_dir)
        if tracker is not None:
            self.tracker = tracker
            tracker.add_source(self._writer_figures)
        self.rank, self.world_size = comm.rank(), comm.world_size()
        self._resume = resume
        self.metadata = metadata or {}
        self._asynchronous = asynchronous_writes
        self._covariances: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.nonfinite_ids: list[int] = []
        self._writer: ShardWriter | None = None
        self._statistics_only = False
        super().__init__(model_or_engine, config, None)
        self.model_info = model_info or model_identity(self.engine.root)
        if self._capture is not None:
            try:
                self._start_writing()
            except BaseException:
                super().close()  # leave the user's model as it was: no hooks, weights unfrozen
                raise

    def _start_writing(self) -> None:
        self.accumulator = Accumulator(self.specs, self.config.hessian, self.compute_dtype)
        self._capture.token_stats = self.accumulator if self._logged_batches_feed_statistics else None
        self._writer = ShardWriter(shard_path(self.out_dir, self.rank), self.specs, self.config.to_json(),
                                   self.config.storage_dtype, self.rank, self.world_size,
                                   self.config.flush_rows, self.config.writer_queue, resume=self._resume,
                                   asynchronous=self._asynchronous)
        state = self._writer.resume_state
        if state.stats_flat is not None:
            self.accumulator.load_flat(torch.from_numpy(state.stats_flat))
            self.nonfinite_ids = []
        self.done_ids = set(int(i) for i in state.ids)
        self._rows_since_commit = 0

    # -- PCA: a statistics pass before logging --------------------------------------------------
    @contextmanager
    def pca_pass(self) -> Iterator[None]:
        """Collect full-width activation and gradient covariances (capture batches as usual inside
        the block; nothing is written), then build PCA projections. Collective at exit."""
        if self.config.init != "pca":
            raise RuntimeError("pca_pass() is only for config.init='pca'")
        full = [LayerSpec(s.name, s.kind, s.d_in, s.d_out, s.d_in, s.d_out) for s in self.specs]
        acc = Accumulator(full, "kfac", self.compute_dtype)
        self._capture = GradientCapture(full, self._modules, {s.name: (None, None) for s in full}, self.compute_dtype)
        self._capture.token_stats, self._capture.want_rows = acc, False
        self._pca_accumulator = acc
        try:
            yield
        finally:
            self._capture.remove()
            self._capture = None
        acc.load_flat(comm.all_reduce_sum(acc.flat()))
        self._covariances = acc.covariances()
        self._install(self._build_projections(self._covariances))
        self._start_writing()

    # -- true Fisher: a statistics-only pass with sampled labels ---------------------------------
    @property
    def _logged_batches_feed_statistics(self) -> bool:
        """With fisher="empirical" the logged rows (data labels) are also the Fisher's samples."""
        return self.config.hessian == "kfac" and self.config.fisher == "empirical"

    @contextmanager
    def statistics_pass(self) -> Iterator[None]:
        """Batches captured inside feed only the curvature statistics; nothing is written.

        For fisher="true" the Fisher is E[g g^T] over labels drawn from the model's predictive
        distribution, while the logged rows keep the data's labels. So per batch the caller
        captures twice: once here with sampled labels, once outside with the data's labels (in
        either order; the statistics are sums). Not collective: use it per batch, any number of
        times, before `finalize()`."""
        if self.config.fisher != "true":
            raise RuntimeError("statistics_pass() is for fisher='true'; with fisher='empirical' the "
                               "logged batches themselves feed the statistics")
        if self._writer is None:
            raise RuntimeError("statistics_pass() needs the projections (init='pca': run pca_pass() first)")
        self._statistics_only = True
        self._capture.token_stats = self.accumulator if self.config.hessian == "kfac" else None
        try:
            yield
        finally:
            self._statistics_only = False
            self._capture.token_stats = None

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
        if self._writer is None:  # inside pca_pass: statistics only
            self._capture.flush_token_statistics()
            self._pca_accumulator.samples += len(ids)
            return
        if self._statistics_only:
            _, rows = self._drop_nonfinite(ids, rows, logged=False)
            self.accumulator.update_rows(rows)
            return
        ids, rows = self._drop_nonfinite(ids, rows, logged=True)
        if self.config.fisher == "empirical":
            self.accumulator.update_rows(rows)
        self._writer.append(rows, ids)
        self.done_ids.update(ids.tolist())
        self._rows_since_commit += len(ids)
        if self._rows_since_commit >= self.config.flush_rows:
            self._writer.commit(self.accumulator.flat().numpy())
            self._rows_since_commit = 0

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
        """Collective: close this rank's shard, ONE all-reduce of statistics and counts, then rank 0
        writes stats.h5 and manifest.json. Returns the manifest."""
        if self._writer is None:
            raise RuntimeError("finalize() before any projection exists (init='pca' needs pca_pass())")
        with self.tracker.phase("write-drain"):
            self._writer.close(complete=True)
        self.bytes_written = self._writer.bytes_written
        self._written = (self._written[0] + self._writer.write_seconds, self._written[1] + self._writer.bytes_written)
        rows_here = self._writer.rows_total
        per_rank = torch.zeros(self.world_size + 1, dtype=torch.float64)
        per_rank[self.rank] = rows_here
        per_rank[-1] = len(self.nonfinite_ids)
        local = self.accumulator.flat()
        with self.tracker.phase("all-reduce"):
            reduced = comm.all_reduce_sum(torch.cat([local, per_rank]))
        self.accumulator.load_flat(reduced[: local.numel()])
        if self.config.fisher == "true" and self.config.hessian != "none" and self.accumulator.samples == 0:
            raise RuntimeError("fisher='true' but no batch was captured inside statistics_pass(): the "
                               "Fisher has no samples (capture each batch there with sampled labels)")
        counts = reduced[local.numel():]
        nonfinite = self._gather_nonfinite(int(counts[-1]))
        manifest = self._manifest([int(c) for c in counts[:-1]], nonfinite)
        if self.rank == 0:
            with self.tracker.phase("stats"):  # eigendecomposition, damping, stats.h5
                self._write_stats(manifest)
            write_json_atomic(self.out_dir / "manifest.json", manifest)
        comm.barrier()
        self._writer = None
        return manifest

    def _gather_nonfinite(self, total: int) -> list[int]:
        if total == 0:
            return []
        if not comm.is_distributed():
            return sorted(self.nonfinite_ids)
        gathered = comm.all_gather_rows(torch.tensor(self.nonfinite_ids, dtype=torch.int64).reshape(-1, 1))
        return sorted(int(i) for g in gathered for i in g.reshape(-1).tolist())

    def _manifest(self, rows_per_rank: list[int], nonfinite: list[int]) -> dict[str, Any]:
        return {
            "format_version": 1,
            "config": self.config.to_dict(),
            "layout": layout_to_json(self.specs),
            "width": self.width,
            "world_size": self.world_size,
            "shards": [{"path": f"{SHARD_DIR}/{shard_path(self.out_dir, r).name}", "rank": r, "rows": n}
                       for r, n in enumerate(rows_per_rank)],
            "total_rows": int(sum(rows_per_rank)),
            "samples_in_statistics": int(self.accumulator.samples),
            "nonfinite_ids": nonfinite,
            "model": self.model_info,
            "engine": self.engine.kind,
            "metadata": self.metadata,
            "versions": versions(),
        }

    def _write_stats(self, manifest: dict[str, Any]) -> None:
        state: dict[str, np.ndarray] = {}
        lambdas: dict[str, float] = {}
        if self.config.hessian != "none" and self.accumulator.samples > 0:
            pre = self.accumulator.preconditioner(self.config.damping)
            state.update(pre.state())
            lambdas = pre.lambdas
        for name, (p_in, p_out) in self.projections.items():
            if self.config.init == "pca":  # random projections are regenerated from the seed
                state[f"{name}/p_in"] = p_in.cpu().numpy()
                state[f"{name}/p_out"] = p_out.cpu().numpy()
        manifest["lambdas"] = lambdas
        write_stats(self.out_dir / "stats.h5", self.config.hessian, self.config.damping, state,
                    {"samples": self.accumulator.samples, "layout": manifest["layout"],
                     "config": self.config.to_json()})

    def close(self) -> None:
        if self._writer is not None:  # not finalized: keep the partial shard for resume
            self._writer.close(complete=False)
            self._writer = None
        super().close()


def attach(model_or_engine: Any, config: LoGraConfig, out_dir: str | Path, **kwargs: Any) -> Logger:
    """Attach LoGra logging to a model, DDP/FSDP module or DeepSpeed engine."""
    return Logger(model_or_engine, config, out_dir, **kwargs)
