"""The on-disk format of an index, defined in one place: paths, version, the attributes a shard
carries, the model identity recorded, `stats.h5`, and `manifest.json` (one builder, one reader).

    <index>/manifest.json                 Manifest: the job, its shards (rows, ids fingerprint)
    <index>/stats.h5                      global curvature statistics (write_stats)
    <index>/shards/rank-NNNNN.h5          a rank's complete shard (writer.write_shard)
    <index>/shards/rank-NNNNN.partial/    a running job's rows (partial.py)
    <index>/shards/rank-NNNNN.h5.partial  the HDF5 shard being built at finalize
    <index>/shards/rank-NNNNN.stats.npz   a rank's local statistics, until the manifest exists
    <index>/locks/rank-NNNNN.lock         held by the job writing that rank's shard (lock.py)
    <index>/locks/index.lock              held by rank 0 of that job (finalize; lock.py)

Writers (writer.py, the Logger), readers (reader.py), resume and inspect use these definitions,
so a field added here is written and checked everywhere alike. Nothing here knows models or
engines: a model is described by the `MODEL_FIELDS` of a dict the caller builds.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from logra_dist.config import LoGraConfig
from logra_dist.core.projection import LayerSpec
from logra_dist.index import lockfile
from logra_dist.index.h5io import h5_writing
from logra_dist.version import versions

# 3: shards carry the data identity and the job key, the manifest content digests, stats.h5 checksums;
# readers refuse version 2 indexes by their version (log them again) instead of by a missing field.
# 4: the manifest holds each shard's count of non-finite samples ("nonfinite_count") and their total
# ("nonfinite_total"), O(shards); the ids stay in the shards' own `nonfinite_ids` datasets (version 3
# listed every one in the manifest). Shards are unchanged, so version 3 indexes stay readable
# (`upgrade_manifest`).
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)
SHARD_DIR = "shards"
LOCK_DIR = "locks"  # apart from shards/: a killed job's lock files never mix with its shards
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


def shard_lock_path(out_dir: str | Path, rank: int) -> Path:
    """Held (flock) by the job writing rank `rank`'s shard, for its whole life (lock.py)."""
    return Path(out_dir) / LOCK_DIR / f"rank-{rank:05d}.lock"


def index_lock_path(out_dir: str | Path) -> Path:
    """Held by rank 0 of the job writing the index: its finalize writes stats.h5 and the manifest."""
    return Path(out_dir) / LOCK_DIR / "index.lock"


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
MODEL_FIELDS = ("class", "name_or_path", "parameters", "fingerprint")  # fingerprint: engines/fingerprint.py
SHARD_MODEL_FIELDS = ("class", "name_or_path")


def manifest_model(info: dict[str, Any] | None) -> dict[str, Any]:
    """The model identity as the manifest records it (missing fields: None)."""
    return {k: (info or {}).get(k) for k in MODEL_FIELDS}


def shard_model_json(info: dict[str, Any] | None) -> str:
    """The model identity as a shard (and a partial shard's record) records it."""
    return json.dumps({k: (info or {}).get(k) for k in SHARD_MODEL_FIELDS}, sort_keys=True)


# -- data identity ----------------------------------------------------------------------------------
# The data a job logged (`data.DataIdentity.to_dict`: digest of the samples' tokens, count,
# max_length, max_samples, model dtype, paths). The manifest records all of it; a shard every field
# but the paths as given (the same file is named differently from another working directory).
DATA_UNCOMPARED = ("paths",)


def shard_data_json(info: dict[str, Any] | None) -> str:
    return json.dumps({k: v for k, v in (info or {}).items() if k not in DATA_UNCOMPARED}, sort_keys=True)


# -- job key and content digests --------------------------------------------------------------------
# Metadata fields that change a job's rows; any of them the job records flows into its job key
# (with the model/tokenizer fingerprints, the identity's other entries, and every ShardAttrs field).
ROW_METADATA = ("data", "data_fingerprint", "max_length", "max_samples", "dtype", "tokenizer")


def job_identity(model: dict[str, Any] | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """What besides the shard attributes makes the rows: the model's fingerprint (weights and
    architecture) and the ROW_METADATA fields the job records (tokenizer, data, max length...)."""
    rows = {k: (metadata or {})[k] for k in ROW_METADATA if k in (metadata or {})}
    return {"model_fingerprint": (model or {}).get("fingerprint"), "rows": rows}


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:24]


def job_key(attrs: dict[str, Any], identity: dict[str, Any] | None) -> str:
    """A digest of everything that changes rows: every shard attribute but the rank (config by
    its row key) and the job identity (job_identity). Generic: new fields flow in unchanged."""
    fields = {k: v for k, v in attrs.items() if k not in ("rank", "job_key")}
    if "config" in fields:
        fields["config"] = LoGraConfig.from_json(fields["config"]).row_compatibility_key
    return _sha({"attrs": fields, "identity": identity or {}})


def content_digest(block_sums: np.ndarray, ids_digest: str, key: str) -> str:
    """A shard's content digest: over its block checksums (every row's bytes), ids and job key."""
    h = hashlib.sha256(np.ascontiguousarray(block_sums, dtype="<u8").tobytes())
    h.update(f"|{ids_digest}|{key}".encode())
    return h.hexdigest()[:24]


def shard_content_digest(path: Path) -> str:
    """The content digest of the complete shard at `path` (as written: its recorded ids digest)."""
    with h5py.File(path, "r") as f:
        return content_digest(f["block_sums"][:], str(f.attrs["ids_digest"]), str(f.attrs.get("job_key", "")))


def shards_digest(digests: list[str]) -> str:
    """The digest of an index's shards (their content digests in rank order)."""
    return _sha(list(digests))


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
    data: str = "{}"  # shard_data_json: the samples logged and the settings that cut them
    job_key: str = ""  # job_key(): the digest of everything else that changes rows

    @classmethod
    def for_job(
        cls,
        specs: list[LayerSpec],
        config_json: str,
        storage_dtype: str,
        rank: int,
        world_size: int,
        model: dict[str, Any] | None,
        data: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
    ) -> ShardAttrs:
        attrs = cls(
            layout_to_json(specs),
            config_json,
            storage_dtype,
            world_size,
            shard_model_json(model),
            rank,
            shard_data_json(data),
        )
        return dataclasses.replace(attrs, job_key=job_key(attrs.to_dict(), identity or job_identity(model, None)))

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], rank: int) -> ShardAttrs:
        """What the manifest (`read_manifest`) says shard `rank` carries."""
        config = LoGraConfig.from_dict(manifest["config"])
        attrs = cls(
            manifest["layout"],
            config.to_json(),
            config.storage_dtype,
            manifest["world_size"],
            shard_model_json(manifest.get("model")),
            rank,
            shard_data_json(manifest.get("data")),
        )
        identity = job_identity(manifest.get("model"), manifest.get("metadata"))
        return dataclasses.replace(attrs, job_key=job_key(attrs.to_dict(), identity))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Attributes holding JSON: compared field by field, so an error names `config.seed`, not two
# configs cut short.
JSON_ATTRS = ("layout", "config", "model", "data")
_ABSENT = object()
MAX_DIFFERENCES = 12


def _parse(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _differences(path: str, got: Any, want: Any) -> list[tuple[str, Any, Any]]:
    if got == want:
        return []
    if isinstance(got, dict) and isinstance(want, dict):
        keys = list(want) + [k for k in got if k not in want]
        return [d for k in keys for d in _differences(f"{path}.{k}", got.get(k, _ABSENT), want.get(k, _ABSENT))]
    if isinstance(got, list) and isinstance(want, list):
        head = [] if len(got) == len(want) else [(f"len({path})", len(got), len(want))]
        return head + [d for i, (a, b) in enumerate(zip(got, want)) for d in _differences(f"{path}[{i}]", a, b)]
    return [(path, got, want)]


def attr_differences(got: dict[str, Any], want: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, this job's value) for every difference, in `want`'s key order;
    JSON-valued attributes (`JSON_ATTRS`) by their fields (`config.seed`, `data.max_length`)."""
    out = []
    for key, value in want.items():
        have = got.get(key, _ABSENT)
        if key in JSON_ATTRS:
            out += _differences(key, _parse(have), _parse(value))
        elif have != value:
            out.append((key, have, value))
    return out


def describe_differences(diffs: list[tuple[str, Any, Any]], then: str, now: str = "now") -> str:
    """'config.seed is 1 in the interrupted job, 0 now; ...': both values in full."""

    def show(v: Any) -> str:
        return "absent" if v is _ABSENT else json.dumps(v) if not isinstance(v, str) else repr(v)

    parts = [f"{field} is {show(a)} {then}, {show(b)} {now}" for field, a, b in diffs[:MAX_DIFFERENCES]]
    if len(diffs) > MAX_DIFFERENCES:
        parts.append(f"and {len(diffs) - MAX_DIFFERENCES} more difference(s)")
    return "; ".join(parts)


def another_job(got: dict[str, Any], want: dict[str, Any], then: str, now: str = "now") -> str | None:
    """None if the recorded attributes `got` match this job's `want`; else 'written with another
    <attribute>: <every difference, both values>' (resume refuses it)."""
    diffs = attr_differences(got, want)
    if not diffs:
        return None
    key = re.split(r"[.\[]", diffs[0][0].removeprefix("len(").rstrip(")"))[0]
    return f"written with another {key}: {describe_differences(diffs, then, now)}"


# -- manifest ---------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """manifest.json. `Manifest.build` is the one way to make one (Logger and write_index)."""

    config: dict[str, Any]
    layout: str
    width: int
    world_size: int
    shards: list[dict[str, Any]]  # per rank: path (relative to the index), rank, rows, ids_digest, nonfinite_count
    total_rows: int
    samples_in_statistics: int
    nonfinite_total: int  # samples left out for a non-finite gradient; ids in each shard's `nonfinite_ids`
    model: dict[str, Any]  # manifest_model
    engine: str | None
    metadata: dict[str, Any]
    versions: dict[str, Any]
    lambdas: dict[str, float] = field(default_factory=dict)  # per layer damping used (stats.h5)
    data: dict[str, Any] = field(default_factory=dict)  # DataIdentity.to_dict: what was logged
    job_key: str = ""  # job_key(): every shard carries it
    shards_digest: str = ""  # shards_digest() of the entries' content digests; stats.h5 records it
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
        nonfinite_per_rank: list[int] | None = None,
        model: dict[str, Any] | None = None,
        engine: str | None = None,
        metadata: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        content_digests: list[str] | None = None,
    ) -> Manifest:
        contents = list(content_digests or [""] * len(rows_per_rank))
        nonfinite = [int(c) for c in nonfinite_per_rank or [0] * len(rows_per_rank)]
        built = cls(
            config=config,
            layout=layout_to_json(specs),
            width=sum(s.width for s in specs),
            world_size=len(rows_per_rank),
            shards=[
                {
                    "path": f"{SHARD_DIR}/{shard_path('', r).name}",
                    "rank": r,
                    "rows": int(n),
                    "ids_digest": d,
                    "content_digest": c,
                    "nonfinite_count": b,
                }
                for r, (n, d, c, b) in enumerate(zip(rows_per_rank, digests, contents, nonfinite, strict=True))
            ],
            total_rows=int(sum(rows_per_rank)),
            samples_in_statistics=int(samples_in_statistics),
            nonfinite_total=sum(nonfinite),
            model=dict(model) if model is not None else manifest_model(None),
            engine=engine,
            metadata=dict(metadata or {}),
            versions=versions(),
            data=dict(data or {}),
            shards_digest=shards_digest(contents),
        )
        built.job_key = ShardAttrs.from_manifest(built.to_dict(), 0).job_key
        return built

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REQUIRED_MANIFEST_KEYS = ("config", "layout", "shards", "world_size")


def read_manifest(path: Path) -> dict:
    """manifest.json as written by `Manifest.to_dict`, checked for what every reader needs."""
    if not path.exists():
        raise IndexFormatError(_why_unfinished(path))
    try:
        manifest = json.loads(path.read_text())
        for key in REQUIRED_MANIFEST_KEYS:
            manifest[key]
    except (OSError, ValueError, KeyError) as e:
        raise IndexFormatError(f"{path}: unreadable or incomplete manifest ({e!r})") from e
    problem = version_problem(manifest.get("format_version"))
    if problem:
        raise IndexFormatError(f"{path}: {problem}")
    manifest = upgrade_manifest(manifest)
    check_manifest_entries(path, manifest)
    return manifest


def version_problem(version: Any) -> str | None:
    """Why a manifest or shard of format `version` cannot be read (None: it can)."""
    if version in READABLE_VERSIONS:
        return None
    return f"format version {version}, this reader reads versions {', '.join(map(str, READABLE_VERSIONS))}"


def upgrade_manifest(manifest: dict) -> dict:
    """A readable manifest in the current form. Version 3 listed every non-finite id
    ("nonfinite_ids"): that list becomes its length, "nonfinite_total"; the per-shard counts it
    never recorded are None (the reader takes them from the shards, which hold the same ids).
    "format_version" stays what the file says."""
    if manifest.get("format_version") == 3 and "nonfinite_total" not in manifest:
        manifest = dict(manifest)
        manifest["nonfinite_total"] = len(manifest.pop("nonfinite_ids", None) or [])
        manifest["shards"] = [{**e, "nonfinite_count": None} if isinstance(e, dict) else e for e in manifest["shards"]]
    return manifest


def check_manifest_entries(path: Path, manifest: dict) -> None:
    """world_size, the entries' ranks and paths and total_rows must agree with each other: a rank
    entry deleted together with its file would otherwise score silently with rows missing."""
    entries, w = manifest["shards"], manifest["world_size"]
    problem = None
    if not isinstance(entries, list) or len(entries) != w:
        problem = f"world_size is {w} but it lists {len(entries) if isinstance(entries, list) else '?'} shard entries"
    else:
        for r, e in enumerate(entries):
            want = f"{SHARD_DIR}/{shard_path('', r).name}"
            if not isinstance(e, dict) or e.get("rank") != r or e.get("path") != want:
                problem = f"shard entry {r} is {str(e)[:120]!r}, expected rank {r} at {want!r}"
                break
        else:
            rows = sum(int(e.get("rows", 0)) for e in entries)
            counts = [e.get("nonfinite_count") for e in entries]
            if "total_rows" in manifest and manifest["total_rows"] != rows:
                problem = f"total_rows is {manifest['total_rows']} but its shard entries hold {rows}"
            elif any(c is not None and (type(c) is not int or c < 0) for c in counts):
                problem = f"nonfinite_count is {counts} (counts of samples, or none in a version 3 manifest)"
            elif None not in counts and manifest.get("nonfinite_total") != sum(counts):
                total = manifest.get("nonfinite_total")
                problem = f"nonfinite_total is {total} but its shard entries count {sum(counts)} non-finite samples"
    if problem:
        raise IndexFormatError(f"{path}: field 'shards': {problem}; the manifest was altered or is incomplete")


def _why_unfinished(path: Path) -> str:
    """The manifest is missing: a job is still running (its lock is held), or it was
    interrupted, or there is no index here at all."""
    root, shards = path.parent, path.parent / SHARD_DIR
    locks = [index_lock_path(root), *sorted((root / LOCK_DIR).glob("rank-*.lock"))]
    held = next((p for p in locks if lockfile.is_held(p)), None)
    if held is not None:
        return (
            f"{path}: missing; {root} is not a finalized LoGra index yet: a job is running: "
            f"{lockfile.describe(lockfile.read_holder(held))}; wait for it to finish"
        )
    if not (root / STATS_FILE).exists() and not (shards.is_dir() and any(shards.iterdir())):
        return f"{path}: missing; no index at {root}"
    return (
        f"{path}: missing; {root} is not a finalized LoGra index: the job that wrote it was "
        "interrupted (no job holds its locks); rerun it with --resume"
    )


# -- stats.h5 ---------------------------------------------------------------------------------------
# Attributes of stats.h5: the curvature kind and damping, plus the `attrs` its writer passes.
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file-size limit, quota
STATS_ATTRS = ("hessian", "damping", "samples", "layout", "config", "job_key", "shards_digest")


def stats_attrs(manifest: dict[str, Any], samples: float) -> dict[str, Any]:
    """The STATS_ATTRS a writer passes for the index `manifest` describes: stats.h5 names the
    job and the shards its statistics were computed from (the reader checks both)."""
    config = manifest["config"]
    return {
        "samples": samples,
        "layout": manifest["layout"],
        "config": config if isinstance(config, str) else LoGraConfig.from_dict(config).to_json(),
        "job_key": manifest["job_key"],
        "shards_digest": manifest["shards_digest"],
    }


def write_stats(path: Path, kind: str, damping: float, state: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """stats.h5: one group per layer holding the eigendecomposition (and PCA projections);
    `attrs`: the other STATS_ATTRS, all of them (readers rely on each)."""
    check_stats_attrs(f"write_stats({path})", attrs)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5_writing(tmp) as f:
            f.attrs.update({"hessian": kind, "damping": damping, **attrs})
            sums: dict[str, str] = {}
            for key, arr in state.items():
                write_stats_dataset(f, key, arr, sums)
            f.attrs["digest"] = stats_digest(sums, attrs)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # never renamed into place; the shards and side files stay
        raise stats_write_error(path, e) from e
    os.replace(tmp, path)


def check_stats_attrs(who: str, attrs: dict[str, Any]) -> None:
    """A stats.h5 writer is given every attribute of STATS_ATTRS but hessian and damping."""
    if sorted(attrs) != sorted(STATS_ATTRS[2:]):
        raise ValueError(f"{who}: attributes {sorted(attrs)}, expected {sorted(STATS_ATTRS[2:])}")


def write_stats_dataset(f: Any, key: str, arr: np.ndarray, sums: dict[str, str]) -> None:
    """One stats.h5 dataset with its checksum (recorded in `sums` for the file's digest)."""
    ds = f.create_dataset(key, data=arr)
    ds.attrs["sha256"] = sums[key] = dataset_sha(np.asarray(arr))


def stats_write_error(path: Path, e: OSError) -> Exception:
    """What a failed stats.h5 write raises: a full disk as an IndexFormatError saying what to do."""
    if e.errno in DISK_FULL:
        return IndexFormatError(
            f"{path}: disk full while writing the statistics ({e!r}); the shards are complete: "
            "free space and rerun the same command with --resume to finish the index"
        )
    return e


def dataset_sha(arr: np.ndarray) -> str:
    """The checksum a stats.h5 dataset carries: sha256 of its dtype, shape and bytes (hashed in
    place: a copy of a 64 MB eigenbasis cost as much as the hash)."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return h.hexdigest()


def dataset_sha_streamed(ds: Any, rows: int = 1 << 16) -> str:
    """`dataset_sha` of an HDF5 dataset (or any array-like), read `rows` leading-axis rows at a
    time: the same digest (C order is row after row), in memory bounded by one block rather than
    the dataset (a selfinf.h5 entry is N x L: 1.6 GB at 10M rows of 40 layers)."""
    shape = tuple(ds.shape)
    h = hashlib.sha256(f"{np.dtype(ds.dtype).str}{shape}".encode())
    if not shape:
        return dataset_sha(np.asarray(ds[()]))
    for start in range(0, shape[0], rows):
        h.update(np.ascontiguousarray(ds[start : start + rows]).reshape(-1).view(np.uint8))
    return h.hexdigest()


def stats_digest(sums: dict[str, str], attrs: dict[str, Any]) -> str:
    """stats.h5's own digest (its datasets' checksums, job key, shards digest): caches key on it."""
    return _sha({"datasets": sums, "job_key": attrs.get("job_key"), "shards": attrs.get("shards_digest")})


def read_stats(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not path.exists():
        raise IndexFormatError(f"{path}: missing; the index was not finalized (Logger.finalize)")
    state: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)

            sums: dict[str, str] = {}

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    state[name] = obj[()]
                    sums[name] = str(obj.attrs.get("sha256", ""))

            f.visititems(visit)
    except OSError as e:
        raise IndexFormatError(f"{path}: unreadable statistics (truncated or corrupted?): {e}") from e
    for name, arr in state.items():
        if sums[name] != dataset_sha(np.asarray(arr)):
            raise IndexFormatError(
                f"{path}: dataset {name!r} fails its checksum (field 'sha256'): the statistics are "
                "corrupted; re-finalize the index (rerun the job with --resume) or log it again"
            )
    if "digest" in attrs and str(attrs["digest"]) != stats_digest(sums, attrs):
        raise IndexFormatError(f"{path}: field 'digest' does not match its datasets and attributes (edited?)")
    return attrs, state
