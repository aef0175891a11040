"""The on-disk format of an index, defined in one place: paths, version, the attributes a shard
carries, the model identity recorded, `stats.h5`, and `manifest.json` (one builder, one reader).

    <index>/manifest.json                 Manifest: the job, its shards (rows, ids fingerprint)
    <index>/stats.h5                      global curvature statistics (write_stats)
    <index>/shards/rank-NNNNN.h5          a rank's complete shard (writer.write_shard)
    <index>/shards/rank-NNNNN.partial/    a running job's rows (partial.py)
    <index>/shards/rank-NNNNN.h5.partial  the HDF5 shard being built at finalize
    <index>/shards/rank-NNNNN.stats.npz   a rank's local statistics, until the manifest exists

Writers (writer.py, the Logger), readers (reader.py), resume and inspect use these definitions,
so a field added here is written and checked everywhere alike. Nothing here knows models or
engines: a model is described by the `MODEL_FIELDS` of a dict the caller builds.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from logra_dist.config import LoGraConfig
from logra_dist.core.projection import LayerSpec
from logra_dist.index.h5io import h5_writing
from logra_dist.version import versions

FORMAT_VERSION = 2
SHARD_DIR = "shards"
MANIFEST_FILE = "manifest.json"
STATS_FILE = "stats.h5"


class IndexFormatError(ValueError):
    """A problem with an index on disk; the message names the file and what is wrong."""


# -- paths ------------------------------------------------------------------------------------------
def shard_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"rank-{rank:05d}.h5"


def partial_path(path: Path) -> Path:
    """Where the final HDF5 shard is built before its rename."""
    return path.with_name(path.name + ".partial")


def partial_dir(path: Path) -> Path:
    """Where a running job keeps the rank's rows (`rank-NNNNN.partial/`)."""
    return path.with_name(path.name[: -len(".h5")] + ".partial")


def rank_stats_path(shard: Path) -> Path:
    """`rank-NNNNN.stats.npz`: the last commit's statistics beside the complete shard `shard`,
    kept from the shard's rename until the manifest exists, so an interrupted finalize can be
    re-run (its one all-reduce needs every rank's local statistics); then deleted."""
    return shard.with_name(shard.name[: -len(".h5")] + ".stats.npz")


# -- layer layout -----------------------------------------------------------------------------------
def layout_to_json(specs: list[LayerSpec]) -> str:
    offset, rows = 0, []
    for s in specs:
        rows.append(
            {
                "name": s.name,
                "kind": s.kind,
                "d_in": s.d_in,
                "d_out": s.d_out,
                "k_in": s.k_in,
                "k_out": s.k_out,
                "offset": offset,
            }
        )
        offset += s.width
    return json.dumps(rows)


def layout_from_json(text: str) -> list[LayerSpec]:
    return [LayerSpec(r["name"], r["kind"], r["d_in"], r["d_out"], r["k_in"], r["k_out"]) for r in json.loads(text)]


# -- model identity ---------------------------------------------------------------------------------
# The manifest records MODEL_FIELDS; a shard records SHARD_MODEL_FIELDS, the part every rank sees
# alike (parameter counts can be per-shard under ZeRO-3 / FSDP), and readers and resume compare it.
MODEL_FIELDS = ("class", "name_or_path", "parameters")
SHARD_MODEL_FIELDS = ("class", "name_or_path")


def manifest_model(info: dict[str, Any] | None) -> dict[str, Any]:
    """The model identity as the manifest records it (missing fields: None)."""
    return {k: (info or {}).get(k) for k in MODEL_FIELDS}


def shard_model_json(info: dict[str, Any] | None) -> str:
    """The model identity as a shard (and a partial shard's record) records it."""
    return json.dumps({k: (info or {}).get(k) for k in SHARD_MODEL_FIELDS}, sort_keys=True)


# -- shard attributes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardAttrs:
    """The identity of the job a shard belongs to: written as the HDF5 shard's attributes and
    into a partial shard's commit record, and checked in this order. Resume requires all of
    them to match; readers all of them against the manifest, `config` by the fields that make
    rows comparable (`LoGraConfig.row_compatibility_key`)."""

    layout: str  # layout_to_json
    config: str  # LoGraConfig.to_json
    storage_dtype: str  # the row codec's name (codecs.py)
    world_size: int
    model: str  # shard_model_json
    rank: int

    @classmethod
    def for_job(
        cls,
        specs: list[LayerSpec],
        config_json: str,
        storage_dtype: str,
        rank: int,
        world_size: int,
        model: dict[str, Any] | None,
    ) -> ShardAttrs:
        return cls(layout_to_json(specs), config_json, storage_dtype, world_size, shard_model_json(model), rank)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], rank: int) -> ShardAttrs:
        """What the manifest (`read_manifest`) says shard `rank` carries."""
        config = LoGraConfig.from_dict(manifest["config"])
        return cls(
            manifest["layout"],
            config.to_json(),
            config.storage_dtype,
            manifest["world_size"],
            shard_model_json(manifest.get("model")),
            rank,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- manifest ---------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """manifest.json. `Manifest.build` is the one way to make one (Logger and write_index)."""

    config: dict[str, Any]
    layout: str
    width: int
    world_size: int
    shards: list[dict[str, Any]]  # per rank: path (relative to the index), rank, rows, ids_digest
    total_rows: int
    samples_in_statistics: int
    nonfinite_ids: list[int]
    model: dict[str, Any]  # manifest_model
    engine: str | None
    metadata: dict[str, Any]
    versions: dict[str, Any]
    lambdas: dict[str, float] = field(default_factory=dict)  # per layer damping used (stats.h5)
    format_version: int = FORMAT_VERSION

    @classmethod
    def build(
        cls,
        *,
        config: dict[str, Any],
        specs: list[LayerSpec],
        rows_per_rank: list[int],
        digests: list[str],
        samples_in_statistics: int = 0,
        nonfinite_ids: list[int] | None = None,
        model: dict[str, Any] | None = None,
        engine: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Manifest:
        return cls(
            config=config,
            layout=layout_to_json(specs),
            width=sum(s.width for s in specs),
            world_size=len(rows_per_rank),
            shards=[
                {"path": f"{SHARD_DIR}/{shard_path('', r).name}", "rank": r, "rows": int(n), "ids_digest": d}
                for r, (n, d) in enumerate(zip(rows_per_rank, digests))
            ],
            total_rows=int(sum(rows_per_rank)),
            samples_in_statistics=int(samples_in_statistics),
            nonfinite_ids=list(nonfinite_ids or []),
            model=dict(model) if model is not None else manifest_model(None),
            engine=engine,
            metadata=dict(metadata or {}),
            versions=versions(),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REQUIRED_MANIFEST_KEYS = ("config", "layout", "shards", "world_size")


def read_manifest(path: Path) -> dict:
    """manifest.json as written by `Manifest.to_dict`, checked for what every reader needs."""
    if not path.exists():
        raise IndexFormatError(
            f"{path}: missing; {path.parent} is not a finalized LoGra index (if a job "
            "was interrupted, rerun it with --resume)"
        )
    try:
        manifest = json.loads(path.read_text())
        for key in REQUIRED_MANIFEST_KEYS:
            manifest[key]
    except (OSError, ValueError, KeyError) as e:
        raise IndexFormatError(f"{path}: unreadable or incomplete manifest ({e!r})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format version {manifest.get('format_version')}, this reader reads {FORMAT_VERSION}"
        )
    return manifest


# -- stats.h5 ---------------------------------------------------------------------------------------
# Attributes of stats.h5: the curvature kind and damping, plus the `attrs` its writer passes.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file-size limit, quota
STATS_ATTRS = ("hessian", "damping", "samples", "layout", "config")


def write_stats(path: Path, kind: str, damping: float, state: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """stats.h5: one group per layer holding the eigendecomposition (and PCA projections);
    `attrs`: the other STATS_ATTRS, all of them (readers rely on each)."""
    if sorted(attrs) != sorted(STATS_ATTRS[2:]):
        raise ValueError(f"write_stats({path}): attributes {sorted(attrs)}, expected {sorted(STATS_ATTRS[2:])}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5_writing(tmp) as f:
            f.attrs.update({"hessian": kind, "damping": damping, **attrs})
            for key, arr in state.items():
                f.create_dataset(key, data=arr)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # never renamed into place; the shards and side files stay
        if e.errno in DISK_FULL:
            raise IndexFormatError(
                f"{path}: disk full while writing the statistics ({e!r}); the shards are complete: "
                "free space and rerun the same command with --resume to finish the index"
            ) from e
        raise
    os.replace(tmp, path)


def read_stats(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not path.exists():
        raise IndexFormatError(f"{path}: missing; the index was not finalized (Logger.finalize)")
    state: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    state[name] = obj[()]

            f.visititems(visit)
    except OSError as e:
        raise IndexFormatError(f"{path}: unreadable statistics (truncated or corrupted?): {e}") from e
    return attrs, state
