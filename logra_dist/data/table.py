"""The per-sample table an index keeps beside its shards, O(samples) and so never in the manifest:
`samples/rank-NNNNN.h5` (sample id, document id, document position, token offset, digest; the
records' own ids where they were mapped to integers) and `samples/skipped-rank-NNNNN.jsonl`
(what --skip-bad left out, with file:line and reason)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from logra_dist.data.streaming import Plan

TABLE_DIR = "samples"


def table_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / TABLE_DIR / f"rank-{rank:05d}.h5"


def skipped_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / TABLE_DIR / f"skipped-rank-{rank:05d}.jsonl"


def write_table(out_dir: str | Path, rank: int, plan: Plan) -> None:
    """This rank's rows (rewritten whole on --resume: the same data gives the same table)."""
    path = table_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        for name, values in plan.table.arrays().items():
            f.create_dataset(name, data=values)
        keys = sorted(plan.table.keys.items())
        f.create_dataset("key_doc_id", data=np.array([k for k, _ in keys], np.int64))
        f.create_dataset("key_json", data=[v for _, v in keys], dtype=h5py.string_dtype())
    tmp.replace(path)
    if plan.skipped:
        skipped_path(out_dir, rank).write_text("".join(json.dumps(s.to_dict()) + "\n" for s in plan.skipped))


class SampleTable:
    """Read side over every rank's table: which document (and where in it) a sample id is."""

    def __init__(self, out_dir: str | Path):
        files = sorted((Path(out_dir) / TABLE_DIR).glob("rank-*.h5"))
        if not files:
            raise FileNotFoundError(f"{out_dir}: no {TABLE_DIR}/rank-*.h5 (an index logged before sample tables)")
        parts: dict[str, list[np.ndarray]] = {}
        self.keys: dict[int, object] = {}
        for file in files:
            with h5py.File(file, "r") as f:
                for name in ("sample_id", "doc_id", "position", "offset", "digest"):
                    parts.setdefault(name, []).append(f[name][()])
                key_json = [v.decode() if isinstance(v, bytes) else v for v in f["key_json"][()]]
                self.keys.update(zip(f["key_doc_id"][()].tolist(), map(json.loads, key_json)))
        cols = {k: np.concatenate(v) for k, v in parts.items()}
        order = np.argsort(cols["sample_id"], kind="stable")
        self.sample_id, self.doc_id, self.position, self.offset, self.digest = (
            cols[k][order] for k in ("sample_id", "doc_id", "position", "offset", "digest")
        )

    def rows(self, sample_ids) -> np.ndarray:
        """Row numbers of the given sample ids (KeyError naming the first unknown one)."""
        ids = np.asarray(sample_ids, np.int64)
        at = np.searchsorted(self.sample_id, ids)
        bad = (at >= len(self.sample_id)) | (self.sample_id[np.minimum(at, len(self.sample_id) - 1)] != ids)
        if bad.any():
            raise KeyError(f"sample id {int(ids[bad][0])} is not in the index's sample table")
        return at

    def document_key(self, doc_id: int):
        """The record's own id (a string id, say), else the integer id."""
        return self.keys.get(int(doc_id), int(doc_id))
