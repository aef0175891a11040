"""Peers in the same run: other attribution libraries scored on the same model, data and queries.

The peers (Kronfluence, TRAK, LogIX) live only in the bench venv (`bash bench/setup_peers.sh`),
never in the product's dependencies, so they run in a subprocess of that venv's python:
`bench/peers/run_peer.py REQUEST.json`. The request names the task spec (the worker rebuilds the
same task, tokenization and batches with `logra_dist.eval.catalog`), the saved attributed model
(`save_pretrained`), the train and query ids, and the dampings to score; the answer is one npz
of (queries x train) score matrices, one per damping, in logra_dist's sign convention (a positive
score lowers the query loss), plus the storage per example and the cost of the recipe.

Every damping of one peer recipe is scored from one fit (factors / features are computed once),
so a sweep costs one subprocess per recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from logra_dist.eval.methods import Method
from logra_dist.eval.tasks import TaskSpec

# recipe name -> the library that provides it (checked before anything runs)
PEER_RECIPES = {
    "kronfluence-ekfac": "kronfluence",
    "kronfluence-kfac": "kronfluence",
    "trak": "trak",
    "logix": "logix",
}


def damping_label(d: float | None) -> str:
    return "default" if d is None else f"{d:g}"


class PeerRunner:
    """Scores peer methods through the bench venv; one subprocess per recipe (all its dampings)."""

    def __init__(
        self,
        python: str | Path,
        script: str | Path,
        spec: TaskSpec,
        model: torch.nn.Module,
        train_ids: np.ndarray,
        query_ids: np.ndarray,
        workdir: str | Path,
        methods: list[Method],
        batch_size: int = 16,
        threads: int = 1,
    ):
        self.python, self.script = Path(python), Path(script)
        if not self.python.exists():
            raise FileNotFoundError(
                f"peer python {self.python} does not exist: run `bash bench/setup_peers.sh` (makes the bench venv "
                "with Kronfluence, TRAK and LogIX), or pass --peer-python"
            )
        if not self.script.exists():
            raise FileNotFoundError(f"peer script {self.script} does not exist (run from the repository root)")
        self.spec, self.model = spec, model
        self.train_ids, self.query_ids = np.asarray(train_ids), np.asarray(query_ids)
        self.workdir = Path(workdir)
        self.batch_size, self.threads = batch_size, threads
        self.dampings: dict[tuple[str, int], list[float | None]] = {}
        for m in methods:
            if m.family == "peer":
                if m.peer not in PEER_RECIPES:
                    raise ValueError(f"{m.name}: unknown peer recipe {m.peer!r}; known: {sorted(PEER_RECIPES)}")
                self.dampings.setdefault((m.peer, m.dim), []).append(m.damping)
        self._results: dict[tuple[str, int], dict] = {}
        self._model_dir: Path | None = None

    def _saved_model(self) -> Path:
        """A transformers model as save_pretrained; any other as its state dict, model.pt (the
        worker rebuilds the module with the task's build_model)."""
        if self._model_dir is None:
            self._model_dir = self.workdir / "peer-model"
            if hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(self._model_dir)
            else:
                self._model_dir.mkdir(parents=True, exist_ok=True)
                torch.save(self.model.state_dict(), self._model_dir / "model.pt")
        return self._model_dir

    def _run(self, peer: str, dim: int) -> dict:
        key = (peer, dim)
        if key not in self._results:
            out = self.workdir / f"peer-{peer}-D{dim}"
            out.mkdir(parents=True, exist_ok=True)
            request = {
                "recipe": peer,
                "dim": dim,
                "dampings": [damping_label(d) for d in self.dampings[key]],
                "spec": self.spec.to_dict(),
                "model_dir": str(self._saved_model()),
                "train_ids": self.train_ids.tolist(),
                "query_ids": self.query_ids.tolist(),
                "batch_size": self.batch_size,
                "threads": self.threads,
                "out": str(out / "scores.npz"),
                "workdir": str(out),
            }
            (out / "request.json").write_text(json.dumps(request))
            t0 = time.perf_counter()
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            repo = str(self.script.resolve().parents[2])
            env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            proc = subprocess.run(
                [str(self.python), str(self.script), str(out / "request.json")],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"peer {peer} failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
                )
            with np.load(out / "scores.npz") as z:
                scores = {k[len("scores_") :]: z[k] for k in z.files if k.startswith("scores_")}
            meta = json.loads((out / "scores.json").read_text())
            meta["subprocess_seconds"] = round(time.perf_counter() - t0, 2)
            self._results[key] = {"scores": scores, "meta": meta}
        return self._results[key]

    def scores(self, m: Method) -> tuple[np.ndarray, int, dict]:
        """(queries x train) scores, storage per example, and the recipe's cost and damping used."""
        r = self._run(m.peer, m.dim)
        label = damping_label(m.damping)
        s = r["scores"][label]
        want = (len(self.query_ids), len(self.train_ids))
        if s.shape != want:
            raise RuntimeError(f"peer {m.peer}: scores of shape {s.shape}, expected (queries, train) = {want}")
        meta = r["meta"]
        cost = dict(meta.get("cost", {}))
        cost["subprocess_seconds"] = meta["subprocess_seconds"]
        cost["damping_used"] = meta.get("damping_used", {}).get(label)
        cost["library"] = meta.get("library")
        return s.astype(np.float64), int(meta["storage_per_example"]), cost


__all__ = ["PEER_RECIPES", "PeerRunner", "damping_label"]
