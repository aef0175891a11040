"""ANN files: one FAISS index per shard, in a seeded sketch space, refused when it is not the shard's.

`shards/rank-NNNNN.ann` (HDF5, written under a temporary name and renamed) holds dataset `faiss`
(the serialized FAISS index, uint8, with its sha256), the record (`AnnRecord`) as attributes, and
two per-row datasets taken from the build's verified read of the shard: `row_sums` (each stored
row's checksum, so the re-rank verifies the candidate rows it reads one by one instead of reading
their whole checksum blocks) and `row_self` (float64 g^T H^-1 g of each row, the re-rank's
RelatIF / cosine denominator, instead of recomputing it per candidate).
Vector i of the index is row i of the shard as the caller prepared it (scoring/ann.py: whitened
by the curvature, optionally normalized), sketched: v = x @ S with S (D x d) of one of two kinds:
`pca` (the default): the top-d right singular vectors of the shard's training sample (strided
rows, prepared the same way; uncentered, so inner products are kept within that subspace),
stored in the file as dataset `sketch`; `gaussian`: entries N(0, 1/d), inner products kept in
expectation, regenerated from (seed, D, d, layout digest), never stored. d >= D means no sketch
(v = x). A query is searched the same way, with the shard's own S. Projected gradients are far
from isotropic even whitened (a few directions carry most of their energy), on the embedded index's
real rows (D = 3840) a PCA sketch of d = 256 kept 0.984 of the top-10 at C = 100, a Gaussian one
0.716 (docs/scoring.md).

The record names what the vectors depend on: the shard (rows, ids digest, a digest of its block
checksums, i.e. of its content), the sketch (dim, seed), the normalization, the Hessian kind and
damping. `load_ann` names every field that differs from what the scorer expects.
FAISS (`faiss-cpu`, the `ann` extra) is imported only here and only when used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from logra_dist.index.format import IndexFormatError
from logra_dist.index.verify import ShardInfo

ANN_VERSION = 2  # 2: per-row checksums and self-influence beside the FAISS index; PCA sketches
DEFAULT_SKETCH_DIM = 256  # d = min(D, 256): measured on the embedded index, docs/scoring.md ("ANN")
SKETCHES = ("pca", "gaussian")
DEFAULT_SKETCH = "pca"
DEFAULT_FACTORY = "HNSW32"
NORMALIZATIONS = ("none", "selfinf")
PCA_ROWS = 8192  # rows of the training sample the PCA sketch is computed from (measured enough)
LOAD_PIECE = 16 << 20  # bytes per read when an ANN file is verified and loaded
TRAIN_ROWS = 1 << 16  # rows sampled (strided) to train a factory that needs training (IVF, PQ)


def faiss_module():
    try:
        import faiss
    except ImportError as e:  # an optional extra
        raise ImportError("ANN needs FAISS: pip install 'logra-dist[ann]' (faiss-cpu)") from e
    return faiss


def ann_path(shard: Path) -> Path:
    return Path(shard).with_suffix(".ann")


def normalization_for(mode: str) -> str:
    """relatif and cosine rank a query's rows alike (cosine divides by a per-query constant)."""
    return "none" if mode == "dot" else "selfinf"


def content_digest(info: ShardInfo) -> str:
    """Digest of the shard's block checksums: changes whenever any stored row does."""
    sums = np.ascontiguousarray(info.block_sums if info.block_sums is not None else [], dtype="<u8")
    return hashlib.sha256(sums.tobytes() + str(info.block_rows).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class AnnRecord:
    """What an ANN file's vectors are (every field is checked before it is searched)."""

    shard: str  # file name of the shard
    rows: int
    ids_digest: str
    content_digest: str
    width: int  # D of the rows
    sketch_dim: int  # d of the vectors (== width: no sketch)
    sketch_seed: int
    layout_digest: str
    normalization: str  # "none" (dot) | "selfinf" (relatif, cosine)
    hessian: str  # the curvature kind and damping the rows were whitened with
    damping: float
    factory: str
    search_params: str = ""  # faiss ParameterSpace string applied when loaded, e.g. "nprobe=32"
    build_params: str = ""  # faiss ParameterSpace string applied before the rows were added, e.g. "efConstruction=80"
    sketch: str = "gaussian"  # SKETCHES: how S was made
    version: int = ANN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AnnRecord:
        return cls(**json.loads(text))

    def differences(self, want: AnnRecord) -> list[str]:
        """Fields that differ (factory, build and search parameters are free choices, not checked)."""
        skip = {"factory", "search_params", "build_params"}
        got, exp = asdict(self), asdict(want)
        return [f"{k} is {got[k]!r}, expected {exp[k]!r}" for k in exp if k not in skip and got[k] != exp[k]]


def layout_digest(layout_json: str) -> str:
    return hashlib.sha256(layout_json.encode()).hexdigest()[:24]


def sketch_dim(width: int, requested: int | None) -> int:
    d = DEFAULT_SKETCH_DIM if requested is None else int(requested)
    if d < 1:
        raise ValueError(f"sketch dim must be >= 1, got {d}")
    return min(width, d)


def sketch_matrix(width: int, dim: int, seed: int, layout: str) -> np.ndarray | None:
    """(D, d) float32 Gaussian / sqrt(d), the same on every rank and every run; None if d >= D."""
    if dim >= width:
        return None
    key = hashlib.sha256(f"logra-ann:{seed}:{width}:{dim}:{layout}".encode()).digest()
    gen = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return (gen.standard_normal((width, dim), dtype=np.float32) / np.float32(np.sqrt(dim))).astype(np.float32)


def pca_matrix(sample: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """(D, d) float32: the top-d right singular vectors of (up to PCA_ROWS strided rows of) the
    (n, D) sample, uncentered (an inner-product sketch): eigenvectors of the D x D Gram matrix
    for moderate D, else a seeded randomized SVD."""
    x = torch.from_numpy(np.ascontiguousarray(sample[:: max(1, -(-len(sample) // PCA_ROWS))], dtype=np.float32))
    if x.shape[1] <= 4096:
        vals, vecs = torch.linalg.eigh((x.T @ x).double())
        v = vecs[:, torch.argsort(vals, descending=True)[:dim]]
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            v = torch.svd_lowrank(x, q=min(min(x.shape), dim + 32), niter=4)[2][:, :dim]
    out = np.zeros((sample.shape[1], dim), np.float32)  # fewer sample rows than d: zero columns
    out[:, : v.shape[1]] = v.float().numpy()
    return out


def sketch(rows: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """rows @ S in float32, through torch (its thread setting: numpy's BLAS pool, unbounded,
    took 100 ms for a 64 x 1024 x 128 product on this shared machine)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if matrix is None:
        return rows
    return (torch.from_numpy(rows) @ torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))).numpy()


def new_index(dim: int, factory: str):
    """An empty inner-product FAISS index (ValueError naming a factory FAISS does not know)."""
    faiss = faiss_module()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"FAISS factory {factory!r} is not valid: {str(e).strip()[:200]}") from e


def write_ann(
    path: Path,
    record: AnnRecord,
    chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    train: np.ndarray | None = None,
    matrix: np.ndarray | None = None,
) -> Path:
    """Build the FAISS index (inner product) from chunks of ((n, d) vectors, n row checksums,
    n self-influences), added incrementally; `train` (a sample) for factories that need
    training; `matrix`: the sketch to store (pca). Atomic: temp file, then rename."""
    faiss = faiss_module()
    index = new_index(record.sketch_dim, record.factory)
    _set_params(index, record.build_params, record.factory, "build")
    if not index.is_trained:
        if train is None or len(train) == 0:
            raise ValueError(f"factory {record.factory!r} needs training rows")
        try:
            index.train(np.ascontiguousarray(train, dtype=np.float32))
        except RuntimeError as e:
            raise ValueError(
                f"{path}: factory {record.factory!r} could not be trained on {len(train)} rows of the "
                f"shard: {str(e).strip()[:200]} (use a smaller IVF list count or 'Flat'/'HNSW32')"
            ) from e
    sums, selfs = [], []
    for block, row_sums, row_self in chunks:
        index.add(np.ascontiguousarray(block, dtype=np.float32))
        sums.append(np.asarray(row_sums, np.uint64))
        selfs.append(np.asarray(row_self, np.float64))
    if index.ntotal != record.rows or sum(map(len, sums)) != record.rows:
        raise IndexFormatError(f"{path}: {index.ntotal} vectors added for a shard of {record.rows} rows")
    data = faiss.serialize_index(index)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("faiss", data=np.asarray(data, np.uint8))
            f.create_dataset("row_sums", data=np.concatenate(sums) if sums else np.zeros(0, np.uint64))
            f.create_dataset("row_self", data=np.concatenate(selfs) if selfs else np.zeros(0))
            f.attrs["record"] = record.to_json()
            f.attrs["faiss_sha256"] = hashlib.sha256(np.asarray(data).tobytes()).hexdigest()
            if matrix is not None:
                f.create_dataset("sketch", data=np.asarray(matrix, np.float32))
                f.attrs["sketch_sha256"] = hashlib.sha256(np.asarray(matrix, np.float32).tobytes()).hexdigest()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_record(path: Path) -> AnnRecord:
    if not path.exists():
        raise IndexFormatError(f"{path}: no ANN index for this shard; build it with `logra-dist ann build INDEX`")
    try:
        with h5py.File(path, "r") as f:
            return AnnRecord.from_json(str(f.attrs["record"]))
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise IndexFormatError(f"{path}: not a readable ANN file ({e}); rebuild it with `logra-dist ann build`") from e


def check_record(path: Path, want: AnnRecord) -> AnnRecord:
    """The file's record, or IndexFormatError naming the file and every field that differs."""
    record = read_record(path)
    diffs = record.differences(want)
    if diffs:
        raise IndexFormatError(
            f"{path}: ANN index built for other rows or settings: {'; '.join(diffs)}; "
            "rebuild it with `logra-dist ann build` (with the --mode/--damping you score with)"
        )
    return record


@dataclass
class LoadedAnn:
    """One shard's ANN file in memory: what the re-rank needs besides the shard's rows."""

    index: Any  # the FAISS index
    record: AnnRecord
    row_sums: np.ndarray  # (rows,) uint64 checksum of each stored row
    row_self: np.ndarray  # (rows,) float64 g^T H^-1 g of each row
    matrix: np.ndarray | None  # the sketch S (D, d), None: no sketch


def load_ann(path: Path, want: AnnRecord) -> LoadedAnn:
    """The file, after checking its record against `want` (IndexFormatError naming the file and
    every differing field) and the stored bytes against their digest."""
    record = check_record(path, want)
    faiss = faiss_module()
    with h5py.File(path, "r") as f:
        data = f["faiss"]
        h = hashlib.sha256()
        for a in range(0, data.shape[0], LOAD_PIECE):  # in pieces: the peak is the index, not twice it
            h.update(data[a : a + LOAD_PIECE].data)
        if h.hexdigest() != f.attrs.get("faiss_sha256"):
            raise IndexFormatError(f"{path}: the FAISS bytes do not match their digest (corrupted)")
        index = faiss.read_index(faiss.PyCallbackIOReader(_piece_reader(data), LOAD_PIECE))
        try:
            row_sums, row_self = f["row_sums"][()], f["row_self"][()]
            stored = f["sketch"][()] if record.sketch == "pca" and record.sketch_dim < record.width else None
        except KeyError as e:
            raise IndexFormatError(f"{path}: dataset {e} missing; rebuild it with `logra-dist ann build`") from e
        if stored is not None and hashlib.sha256(stored.tobytes()).hexdigest() != f.attrs.get("sketch_sha256"):
            raise IndexFormatError(f"{path}: the sketch matrix does not match its digest (corrupted)")
    if record.sketch == "gaussian":
        matrix = sketch_matrix(record.width, record.sketch_dim, record.sketch_seed, record.layout_digest)
    else:
        matrix = stored
    if (
        index.ntotal != record.rows
        or index.d != record.sketch_dim
        or {row_sums.shape, row_self.shape} != {(record.rows,)}
    ):
        raise IndexFormatError(f"{path}: FAISS index holds {index.ntotal} x {index.d}, record says {record.rows}")
    set_search_params(index, record.search_params, record.factory)
    return LoadedAnn(index, record, row_sums.astype(np.uint64), row_self.astype(np.float64), matrix)


def set_search_params(index, params: str, factory: str) -> None:
    """FAISS ParameterSpace string (e.g. "nprobe=64", "efSearch=512") on a loaded index; a
    ValueError naming the parameters and the factory when FAISS does not know them for it."""
    _set_params(index, params, factory, "search")


def _set_params(index, params: str, factory: str, what: str) -> None:
    if not params:
        return
    try:
        faiss_module().ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        raise ValueError(
            f"FAISS {what} parameters {params!r} do not apply to factory {factory!r}: {str(e).strip()[:200]}"
        ) from e


def _piece_reader(data: h5py.Dataset):
    """FAISS reader callback over the dataset's bytes, piece by piece."""
    pos = [0]

    def read(n: int) -> bytes:
        a = pos[0]
        pos[0] = min(data.shape[0], a + n)
        return data[a : pos[0]].tobytes()

    return read


def search(index, queries: np.ndarray, candidates: int) -> np.ndarray:
    """(n_q, c) shard-local row numbers of the best `candidates` per query (-1: none)."""
    faiss = faiss_module()
    c = max(1, min(candidates, index.ntotal))
    inner = faiss.downcast_index(index)
    if hasattr(inner, "hnsw"):  # efSearch below the result count would cut the results short
        inner.hnsw.efSearch = max(int(inner.hnsw.efSearch), c)
    _, labels = index.search(np.ascontiguousarray(queries, dtype=np.float32), c)
    return labels
