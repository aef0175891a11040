"""Attribution methods under comparison, all producing a (queries x train) score matrix.

LoGra variants go through the public API exactly as a user would (attach / capture / backward
/ finalize, then Scorer), so the evaluation measures the product, not a re-implementation.
Baselines that LoGra cannot express, at the SAME storage per example D:
- "dense": TRAK-style dense Gaussian projection of the full per-sample gradient (all
  parameters, torch.func), optionally preconditioned by the D x D projected Fisher;
- "full": the unprojected full gradient with the full (all layers jointly) Fisher: the exact
  Gauss-Newton-style influence the projections approximate (small models only).
- "peer": another library (Kronfluence, TRAK, LogIX) run by bench/peers/run_peer.py in the bench
  venv (logra_dist.eval.peers), on the same saved model, data and query ids.
Damping for every preconditioned method: lambda = damping x mean eigenvalue (as LoGra); a peer
uses its own library's damping convention (recorded with its result).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from logra_dist.config import MODEL_FISHERS, LoGraConfig
from logra_dist.core.curvature import CURVATURES
from logra_dist.core.fisher import FisherTargets
from logra_dist.core.projection import LayerSpec
from logra_dist.eval.tasks import Task
from logra_dist.logger import attach
from logra_dist.scoring.kernels import score_block, self_influence
from logra_dist.scoring.scorer import Scorer


@dataclass(frozen=True)
class Method:
    """family "logra": init/k/hessian/fisher are LoGraConfig fields (k_in = k_out = k);
    family "dense": `dim` Gaussian projection of the full gradient; "full": no projection;
    "peer": `peer` names the library recipe, `damping` None = that library's default.
    hessian "none" = plain gradient dot products. storage: the row codec of a LoGra index
    (float32 by default; the quantized codecs are compared at the main rank). optimizer: scale
    gradients by the attributed model's Adam second moments (LoGraConfig.optimizer_state)."""

    name: str
    family: str = "logra"
    init: str = "random"
    k: int = 8
    hessian: str = "raw"
    fisher: str = "empirical"
    fisher_samples: int = 1  # fisher="true": labels drawn per token/example, S copies of each batch
    damping: float | None = 1.0
    mode: str = "dot"
    dim: int = 0
    seed: int = 0
    storage: str = "float32"
    optimizer: bool = False
    peer: str = ""
    preset: str = ""  # the LoGraConfig preset whose fields this method uses (recorded)

    def index_key(self) -> tuple:
        return (
            self.family,
            self.init,
            self.k,
            self.hessian,
            self.fisher,
            self.fisher_samples,
            self.dim,
            self.seed,
            self.storage,
            self.optimizer,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class Attributor:
    """Scores every method against one trained model; indexes and query gradients are shared
    by the methods that differ only in scoring (damping, dot vs RelatIF)."""

    def __init__(
        self,
        task: Task,
        model: torch.nn.Module,
        query_ids: np.ndarray,
        workdir: str | Path,
        batch_size: int = 64,
        label_seed: int = 0,
        optimizer_path: str | Path | None = None,
        peers=None,
    ):
        self.task, self.model = task, model
        self.train_ids = np.arange(task.n_train, dtype=np.int64)
        self.query_ids = np.asarray(query_ids, dtype=np.int64)
        self.workdir = Path(workdir)
        self.batch_size, self.label_seed = batch_size, label_seed
        self._query_rows: dict[tuple, torch.Tensor] = {}
        self._dense: dict[tuple, tuple] = {}
        self.seconds: dict[str, float] = {}
        self.storage: dict[str, int] = {}
        self.optimizer_path = optimizer_path
        self.peers = peers  # logra_dist.eval.peers.PeerRunner, or None
        self._index_cost: dict[tuple, dict] = {}
        self.cost: dict[str, dict] = {}  # per method: logging step vs floor, finalize (seconds)

    # -- public -----------------------------------------------------------------------------
    def scores(self, m: Method) -> np.ndarray:
        t0 = time.perf_counter()
        if m.family == "logra":
            s = self._logra(m)
        elif m.family == "random":  # the floor: Gaussian scores, seeded, no signal at all
            rng = np.random.default_rng(m.seed)
            s = rng.standard_normal((len(self.query_ids), len(self.train_ids)))
            self.storage[m.name] = 0
        elif m.family == "peer":
            if self.peers is None:
                raise ValueError(f"{m.name}: peer methods need a PeerRunner (run with --peers)")
            s, self.storage[m.name], self.cost[m.name] = self.peers.scores(m)
        else:
            s = self._projected(m)
        self.seconds[m.name] = time.perf_counter() - t0
        return s

    def floor_seconds(self, reps: int = 2) -> float:
        """One pass of forward + backward over the training set without logging: the floor that
        a logging pass is compared with (same batches, same threads). Measured right before each
        logging pass, best of `reps` (a first, cold pass would flatter the logging pass)."""
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _, batch in self.task.batches("train", self.train_ids, self.batch_size):
                self.model.zero_grad(set_to_none=True)
                self.task.summed_loss(self.task.forward(self.model, batch), batch).backward()
            self.model.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - t0)
        return best

    # -- LoGra through the public API --------------------------------------------------------
    def _capture_all(
        self, session, split: str, ids: np.ndarray, gen: torch.Generator, targets: FisherTargets | None = None
    ) -> None:
        """The data's labels, or with `targets` a statistics batch (core.fisher.FisherTargets):
        each batch repeated to its copies, copy-major; "true": each copy with its own labels drawn
        from the model (S samples per token); "exact" (classifiers): copy c has label c, weighted
        by sqrt(C p_c), so the statistics are the expectation over the classes."""
        task = self.task
        for b, batch in task.batches(split, ids, self.batch_size):
            if targets is not None and targets.copies > 1:
                b, batch = targets.expand(b), {key: targets.expand(v) for key, v in batch.items()}
            with session.capture(b, mask=task.mask(batch)):
                logits = task.forward(session.model, batch)
                if targets is None:
                    loss = task.summed_loss(logits, batch)
                elif targets.kind == "exact":
                    loss = targets.loss(logits)
                else:
                    loss = task.summed_loss(logits, batch, task.sample_labels(logits, batch, gen))
                session.backward(loss)

    def _log_index(self, m: Method) -> Path:
        key = m.index_key()
        opt = "-opt" if m.optimizer else ""
        out = self.workdir / (
            f"index-{m.init}-{m.hessian}-k{m.k}-{m.fisher}{m.fisher_samples}-{m.dim}-s{m.seed}-{m.storage}{opt}"
        )
        if (out / "manifest.json").exists() and key in self._query_rows:
            return out
        if m.optimizer and self.optimizer_path is None:
            raise ValueError(f"{m.name}: optimizer-aware gradients need the attributed model's optimizer state")
        floor = self.floor_seconds()
        shutil.rmtree(out, ignore_errors=True)
        cfg = LoGraConfig(
            k_in=m.k,
            k_out=m.k,
            init=m.init,
            seed=m.seed,
            hessian=m.hessian,
            fisher=m.fisher,
            fisher_samples=m.fisher_samples,
            damping=1.0,
            storage_dtype=m.storage,
            optimizer_state=str(self.optimizer_path) if m.optimizer else None,
        )
        gen = torch.Generator().manual_seed(self.label_seed)
        logger = attach(self.model, cfg, out)
        try:
            t0 = time.perf_counter()
            if m.init == "pca":  # the data's labels, as `log` runs it (cli/jobs.py); LM, S=8: sampled
                with logger.pca_pass():  # labels' PCA measured the same (bench/results/true_fisher_explore.json)
                    self._capture_all(logger, "train", self.train_ids, gen)
            if m.fisher in MODEL_FISHERS and CURVATURES.get(m.hessian).needs_statistics:
                targets = logger.fisher_targets(self.task.classes)  # "model": exact for a classifier
                with logger.statistics_pass():
                    self._capture_all(logger, "train", self.train_ids, gen, targets)
            t1 = time.perf_counter()
            self._capture_all(logger, "train", self.train_ids, gen)
            t2 = time.perf_counter()
            logger.finalize()
            t3 = time.perf_counter()
        finally:
            logger.close()
        self._index_cost[key] = {
            "extra_passes_seconds": round(t1 - t0, 3),
            "logging_pass_seconds": round(t2 - t1, 3),
            "floor_pass_seconds": round(floor, 3),
            "logging_vs_floor": round((t2 - t1) / floor, 2),
            "finalize_seconds": round(t3 - t2, 3),
        }
        scorer = Scorer(self.model, out, mode="dot")
        try:
            self._capture_all(scorer, "query", self.query_ids, gen)
            self._query_rows[key] = scorer.queries.local_rows().clone()
            if not np.array_equal(scorer.query_ids, self.query_ids):
                raise RuntimeError("query ids came back in another order")
        finally:
            scorer.close()
        return out

    def _logra(self, m: Method) -> np.ndarray:
        index = self._log_index(m)
        scorer = Scorer(None, index, mode=m.mode, damping=m.damping)
        try:
            scorer.add_query_gradients(self._query_rows[m.index_key()].numpy(), self.query_ids)
            s = scorer.scores()
            ids = scorer.store.ids  # a property that reads every shard's ids: once
            order = np.argsort(ids)
            if not np.array_equal(ids[order], self.train_ids):
                raise RuntimeError(f"{index}: index does not hold exactly the training ids")
            self.storage[m.name] = scorer.store.width
            self.cost[m.name] = dict(self._index_cost.get(m.index_key(), {}))
        finally:
            scorer.store.close()
        return s[:, order].astype(np.float64)

    # -- dense projection of the full gradient / full gradient --------------------------------
    def _full_grads(self, split: str, ids: np.ndarray) -> torch.Tensor:
        parts = [
            self.task.per_sample_grads(self.model, batch).double()
            for _, batch in self.task.batches(split, ids, self.batch_size)
        ]
        return torch.cat(parts)

    def _projected(self, m: Method) -> np.ndarray:
        key = m.index_key()
        if key not in self._dense:
            if "full" not in self._dense:
                self._dense["full"] = (
                    self._full_grads("train", self.train_ids),
                    self._full_grads("query", self.query_ids),
                )
            train, query = self._dense["full"]
            if m.family == "dense":
                gen = torch.Generator().manual_seed(10_000 + m.seed)
                proj = torch.randn(train.shape[1], m.dim, generator=gen, dtype=torch.float64) / m.dim**0.5
                train, query = train @ proj, query @ proj
            elif m.family != "full":
                raise ValueError(f"unknown method family {m.family!r}")
            curvature = CURVATURES.get(m.hessian)
            if curvature.uses_token_statistics:  # one "layer" of D columns has no tokens
                raise ValueError(f"{m.name}: dense/full baselines support hessian raw or none")
            spec = LayerSpec("all", "linear", train.shape[1], 1, train.shape[1], 1)
            acc = curvature([spec], torch.float64)
            acc.update_rows(train)
            self._dense[key] = (train, query, acc)
        train, query, acc = self._dense[key]
        pre = acc.preconditioner(m.damping)
        q_pre = pre.apply(query)
        q_self = (query * q_pre).sum(1)
        t_self = self_influence(pre, train) if m.mode != "dot" else None
        self.storage[m.name] = int(train.shape[1])
        return score_block(q_pre, train, m.mode, q_self, t_self).numpy()
