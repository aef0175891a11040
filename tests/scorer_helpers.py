"""Shared by the scorer tests and their torchrun worker: tiny models, deterministic samples,
logging an index, and a float64 numpy brute-force reference that shares no code with the
Scorer (rows read straight from the shard files, H^-1 rebuilt from stats.h5 with numpy)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

import logra_dist as ld

GROUPS = {"attn": r"self_attn", "mlp": r"mlp"}
MODES = ("dot", "relatif", "cosine")


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 8)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 10)
        self.fc2 = nn.Linear(10, 4)


class TinyNet(nn.Module):
    """Layer names like a transformer block, so layer groups can be selected by regex."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.self_attn, self.mlp = Attn(), MLP()

    def forward(self, x):
        h = torch.tanh(self.self_attn.q(x))
        return self.mlp.fc2(torch.tanh(self.mlp.fc1(h)))


def samples(ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, 3, 6) and targets (B, 3) that depend only on the sample id."""
    xs, ys = [], []
    for i in np.asarray(ids).tolist():
        g = torch.Generator().manual_seed(1000 + int(i))
        xs.append(torch.randn(3, 6, generator=g))
        ys.append(torch.randint(0, 4, (3,), generator=g))
    return torch.stack(xs), torch.stack(ys)


def capture_batches(session, ids, batch: int = 5) -> None:
    """Run the capture protocol (Logger or Scorer) over `ids` in batches."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    for s in range(0, len(ids), batch):
        b = torch.from_numpy(ids[s : s + batch])
        x, y = samples(b)
        with session.capture(b):
            logits = session.model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, 4), y.reshape(-1), reduction="sum")
            session.backward(loss)


def config(**kw) -> ld.LoGraConfig:
    base = dict(k_in=3, k_out=3, seed=7, storage_dtype="float32", flush_rows=8, hessian="raw")
    base.update(kw)
    return ld.LoGraConfig(**base)


def log_index(out: Path, ids, cfg: ld.LoGraConfig | None = None) -> None:
    """Collective under torchrun: every rank logs its own ids with TinyNet."""
    logger = ld.attach(TinyNet(), cfg or config(), out)
    capture_batches(logger, ids)
    logger.finalize()
    logger.close()


# -- integer index with duplicated rows: exact arithmetic, so ties are exact ------------------
class Bilinear(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # the same weights when logging and scoring (the index records them)
        self.self_attn = Attn()
        self.self_attn.q = nn.Linear(3, 2, bias=False)


def int_samples(ids) -> tuple[torch.Tensor, torch.Tensor]:
    """x, t with small integer entries; ids with equal id % 5 are the same sample."""
    xs, ts = [], []
    for i in np.asarray(ids).tolist():
        g = torch.Generator().manual_seed(int(i) % 5)
        sign = lambda n: torch.randint(0, 2, (1, n), generator=g) * 2 - 1  # noqa: E731 (no zero rows)
        xs.append((torch.randint(1, 4, (1, 3), generator=g) * sign(3)).float())
        ts.append((torch.randint(1, 4, (1, 2), generator=g) * sign(2)).float())
    return torch.stack(xs), torch.stack(ts)


def capture_int(session, ids, batch: int = 4) -> None:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    for s in range(0, len(ids), batch):
        b = torch.from_numpy(ids[s : s + batch])
        x, t = int_samples(b)
        with session.capture(b):
            session.backward((session.model.self_attn.q(x) * t).sum())  # per-sample grad t x^T


def int_config() -> ld.LoGraConfig:
    return ld.LoGraConfig(init="identity", hessian="none", storage_dtype="float32", flush_rows=4)


def log_int_index(out: Path, ids) -> None:
    logger = ld.attach(Bilinear(), int_config(), out)
    capture_int(logger, ids)
    logger.finalize()
    logger.close()


# -- float64 reference --------------------------------------------------------------------------
def raw_rows(index: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(ids, rows float64, layout) read directly from the shard files named by the manifest."""
    manifest = json.loads((Path(index) / "manifest.json").read_text())
    ids, rows = [], []
    for entry in manifest["shards"]:
        with h5py.File(Path(index) / entry["path"], "r") as f:
            ids.append(f["ids"][:])
            rows.append(f["grads"][:].astype(np.float64))
    return np.concatenate(ids), np.concatenate(rows), json.loads(manifest["layout"])


def inverse_hessian(index: Path, layout: list[dict], damping: float | None = None) -> np.ndarray:
    """Block-diagonal (D, D) damped inverse built with numpy from stats.h5's eigendecompositions."""
    d = sum(layer["k_in"] * layer["k_out"] for layer in layout)
    out = np.zeros((d, d))
    with h5py.File(Path(index) / "stats.h5", "r") as f:
        kind = str(f.attrs["hessian"])
        damping = float(f.attrs["damping"]) if damping is None else damping
        for layer in layout:
            w, o, name = layer["k_in"] * layer["k_out"], layer["offset"], layer["name"]
            if kind == "none":
                out[o : o + w, o : o + w] = np.eye(w)
            elif kind == "raw":
                e, v = f[f"{name}/evals"][()].astype(np.float64), f[f"{name}/evecs"][()].astype(np.float64)
                out[o : o + w, o : o + w] = (v / (e + damping * e.mean())) @ v.T
            else:  # kfac: rows are vec of (k_out, k_in) blocks, row-major -> kron(grad, act)
                ea, va = f[f"{name}/act_evals"][()].astype(np.float64), f[f"{name}/act_evecs"][()].astype(np.float64)
                eg, vg = f[f"{name}/grad_evals"][()].astype(np.float64), f[f"{name}/grad_evecs"][()].astype(np.float64)
                e, v = np.kron(eg, ea), np.kron(vg, va)
                out[o : o + w, o : o + w] = (v / (e + damping * eg.mean() * ea.mean())) @ v.T
    return out


def group_mask(layout: list[dict], pattern: str | None) -> np.ndarray:
    mask = np.zeros(sum(layer["k_in"] * layer["k_out"] for layer in layout), bool)
    for layer in layout:
        if pattern is None or re.search(pattern, layer["name"]):
            mask[layer["offset"] : layer["offset"] + layer["k_in"] * layer["k_out"]] = True
    return mask


def reference_scores(q: np.ndarray, g: np.ndarray, hinv: np.ndarray, mode: str, cols: np.ndarray) -> np.ndarray:
    """Brute force (n_q, N) scores restricted to the columns `cols`."""
    h = hinv[np.ix_(cols, cols)]
    q, g = q[:, cols], g[:, cols]
    dots = q @ h @ g.T
    if mode in ("relatif", "cosine"):
        dots = dots / np.sqrt(np.einsum("nd,de,ne->n", g, h, g))[None, :]
    if mode == "cosine":
        dots = dots / np.sqrt(np.einsum("nd,de,ne->n", q, h, q))[:, None]
    return dots


def reference_topk(scores: np.ndarray, train_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: larger score first, then smaller id."""
    order = np.stack([np.lexsort((train_ids, -row))[:k] for row in scores])
    return np.take_along_axis(scores, order, 1), train_ids[order]


def write_synthetic_index(out: Path, shard_rows: list[int], storage_dtype: str, seed: int = 0) -> np.ndarray:
    """Shards of random rows written with store.write_index (no model, no stats); returns the
    float32 rows that were given to the writer, in store order."""
    from logra_dist.core.projection import LayerSpec
    from logra_dist.index.writer import write_index

    specs = [LayerSpec("a", "linear", 4, 4, 2, 3), LayerSpec("b", "linear", 4, 4, 3, 2)]
    cfg = ld.LoGraConfig(k_in=2, k_out=2, storage_dtype=storage_dtype, flush_rows=3)
    gen = torch.Generator().manual_seed(seed)
    shards, all_rows, start = [], [], 0
    for n in shard_rows:
        rows = torch.randn(n, 12, generator=gen)
        shards.append([(torch.arange(start, start + n) * 7 % 1000, rows)])
        all_rows.append(rows)
        start += n
    write_index(out, specs, cfg.to_json(), shards)
    return torch.cat(all_rows).numpy()


def skipped_rows(monkeypatch) -> list[int]:
    """Counts the rows the bfloat16 prefilter skips (one entry per chunk it saw)."""
    skipped: list[int] = []
    keep = ld.scoring.prefilter.Prefilter.keep

    def counting(self, rows, *args):
        out = keep(self, rows, *args)
        skipped.append(len(rows) - len(out))
        return out

    monkeypatch.setattr(ld.scoring.prefilter.Prefilter, "keep", counting)
    return skipped
