"""Benchmark tasks: a data set, a model and a fixed training recipe, retrainable on any subset.

A task is rebuilt from a small picklable `TaskSpec` in every retraining worker, so nothing but
(spec, training ids, seed) crosses processes. `key()` hashes everything that determines a
retrained model's outputs (data identity, model shape, recipe), and keys the on-disk cache.

Sign convention and losses: per-sample losses are SUMMED over tokens (what the Logger logs);
the measured output of a query is its loss under a retrained model (classification:
cross-entropy; LM: mean token cross-entropy of the document).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

Batch = dict[str, torch.Tensor]

# Part of every cache key: bump it when a training or evaluation CODE change alters what a
# retrained model measures (parameter changes are keyed already through `recipe()`).
RECIPE_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    """Which task, at which size. `params` override the task's defaults (fast variants)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(sorted(self.params.items()))}


class Task:
    """Interface the evaluation needs from a benchmark."""

    name = ""
    n_train = 0  # training examples have ids 0..n_train-1
    n_query_pool = 0  # held-out examples, ids 0..n_query_pool-1 in the query pool
    classes: int | None = None  # one prediction over this many classes per sample; None: sequences

    def recipe(self) -> dict[str, Any]:
        raise NotImplementedError

    def key(self) -> str:
        blob = json.dumps({"task": self.name, "recipe": self.recipe(), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def train(self, train_ids: np.ndarray, seed: int, optimizer_path: str | None = None) -> nn.Module:
        """The model trained on `train_ids`; `optimizer_path`: also save the final optimizer state
        dict there (torch.save, as HF Trainer's optimizer.pt) for optimizer-aware attribution."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Per query-pool example: at least "loss" (n_query_pool,)."""
        raise NotImplementedError

    def batches(self, split: str, ids: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, Batch]]:
        """(ids, batch) over `ids` of split "train" or "query"."""
        raise NotImplementedError

    def forward(self, model, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def summed_loss(self, logits: torch.Tensor, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Sum over the batch of per-sample (token-summed) losses; `labels` override the data's."""
        raise NotImplementedError

    def sample_labels(self, logits: torch.Tensor, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        """Labels drawn from the model's predictive distribution (true Fisher)."""
        raise NotImplementedError

    def mask(self, batch: Batch) -> torch.Tensor | None:
        return None


# -- classification: an MLP on a fixed data set --------------------------------------------------
def _synthetic(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class clusters pushed through a fixed random nonlinearity (overlapping classes,
    so query losses vary)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centers = rng.normal(0, 1.0, (classes, dim))
    z = centers[y] + rng.normal(0, 1.0, (n, dim))
    mix = rng.normal(0, 1.0 / np.sqrt(dim), (dim, dim))
    return np.tanh(z @ mix) + 0.1 * z, y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the data ship inside scikit-learn: no download
        raise ImportError("the digits benchmark needs scikit-learn: pip install 'logra-dist[eval]'") from e
    d = load_digits()
    return d.data.astype(np.float64) / 16.0, d.target.astype(np.int64)


class ClassificationTask(Task):
    """MLP (tanh) trained full-batch with Adam and an L2 penalty for a fixed number of steps, so
    a subset's model is a deterministic function of (subset, seed)."""

    defaults: ClassVar[dict[str, Any]] = {
        "data": "digits",
        "n_train": 1000,
        "n_query_pool": 200,
        "hidden": 32,
        "depth": 2,
        "steps": 400,
        "lr": 5e-3,
        "l2": 5e-4,
        "split_seed": 0,
        "synthetic_n": 700,
        "synthetic_dim": 16,
        "synthetic_classes": 6,
    }

    def __init__(self, spec: TaskSpec):
        unknown = set(spec.params) - set(self.defaults)
        if unknown:
            raise ValueError(f"task {spec.name!r}: unknown parameter(s) {sorted(unknown)}")
        self.p = {**self.defaults, **spec.params}
        self.name = spec.name
        p = self.p
        if p["data"] == "digits":
            x, y = _digits()
        elif p["data"] == "synthetic":
            x, y = _synthetic(p["synthetic_n"], p["synthetic_dim"], p["synthetic_classes"], p["split_seed"])
        else:
            raise ValueError(f"unknown classification data {p['data']!r}")
        perm = np.random.default_rng(p["split_seed"]).permutation(len(x))
        if p["n_train"] + p["n_query_pool"] > len(x):
            raise ValueError(f"{p['data']}: {len(x)} examples, asked for {p['n_train']} + {p['n_query_pool']}")
        tr, qu = perm[: p["n_train"]], perm[p["n_train"] : p["n_train"] + p["n_query_pool"]]
        mu, sd = x[tr].mean(0), x[tr].std(0) + 0.1
        x = (x - mu) / sd
        self.x = {"train": torch.tensor(x[tr], dtype=torch.float32), "query": torch.tensor(x[qu], dtype=torch.float32)}
        self.y = {"train": torch.tensor(y[tr]), "query": torch.tensor(y[qu])}
        self.n_train, self.n_query_pool = len(tr), len(qu)
        self.classes = int(y.max()) + 1
        self._data_hash = hashlib.sha256(x.astype(np.float32).tobytes() + y.tobytes()).hexdigest()[:16]

    def recipe(self) -> dict[str, Any]:
        return {**self.p, "data_sha256": self._data_hash, "classes": self.classes}

    def build_model(self) -> nn.Module:
        p, dim = self.p, self.x["train"].shape[1]
        layers: list[nn.Module] = []
        for i in range(p["depth"]):
            layers += [nn.Linear(dim if i == 0 else p["hidden"], p["hidden"]), nn.Tanh()]
        layers.append(nn.Linear(p["hidden"], self.classes))
        return nn.Sequential(*layers)

    def train(self, train_ids: np.ndarray, seed: int, optimizer_path: str | None = None) -> nn.Module:
        torch.manual_seed(seed)
        model = self.build_model()
        idx = torch.as_tensor(np.asarray(train_ids, dtype=np.int64))
        x, y = self.x["train"][idx], self.y["train"][idx]
        opt = torch.optim.Adam(model.parameters(), lr=self.p["lr"])
        for _ in range(self.p["steps"]):
            loss = F.cross_entropy(model(x), y) + self.p["l2"] * sum((w * w).sum() for w in model.parameters())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if optimizer_path is not None:
            torch.save(opt.state_dict(), optimizer_path)
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, np.ndarray]:
        logits = model(self.x["query"])
        y = self.y["query"]
        correct = logits.gather(1, y[:, None])[:, 0]
        other = logits.masked_fill(F.one_hot(y, self.classes).bool(), float("-inf")).amax(1)
        return {"loss": F.cross_entropy(logits, y, reduction="none").numpy(), "margin": (correct - other).numpy()}

    def batches(self, split: str, ids: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, Batch]]:
        ids = np.asarray(ids, dtype=np.int64)
        for s in range(0, len(ids), batch_size):
            b = torch.as_tensor(ids[s : s + batch_size])
            yield b, {"x": self.x[split][b], "y": self.y[split][b]}

    def forward(self, model, batch: Batch) -> torch.Tensor:
        return model(batch["x"])

    def summed_loss(self, logits, batch, labels=None):
        return F.cross_entropy(logits, batch["y"] if labels is None else labels, reduction="sum")

    def sample_labels(self, logits, batch, gen):
        return torch.multinomial(F.softmax(logits.detach().double(), -1), 1, generator=gen)[:, 0]

    def flat_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in model.named_parameters()}

    def per_sample_grads(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(B, P) full per-sample gradients of the loss (all parameters) with torch.func."""
        from torch.func import functional_call, grad, vmap

        params = self.flat_params(model)

        def loss_one(p, x, y):
            return F.cross_entropy(functional_call(model, p, (x[None],)), y[None], reduction="sum")

        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, batch["x"], batch["y"])
        return torch.cat([g[k].reshape(len(batch["x"]), -1) for k in params], dim=1)


__all__ = ["ClassificationTask", "Task", "TaskSpec"]
