"""`logra-dist inspect DIR`: what an index holds, read straight from its files.

Unlike `GradientStore`, which refuses anything but a finalized index, this reads partial indexes
too (a running or killed job): partial shards (`rank-NNNNN.partial/`, read through
`partial.PartialRows`), a missing manifest or stats file, ranks that never wrote a shard, and says
what is incomplete. Shards are opened read-only without HDF5 file locking, and a partial shard's
rows are read only up to its commit record, so a live job can be looked at. Rows are decoded by
the shard's row codec.

It tells the truth by reusing the checks of those who would read the index: a finalized one
gets every problem `GradientStore` would refuse it for (`reader.index_problems`, all of them, not
the first) and `stats.h5` read whole as the scorer reads it; an unfinished one the resume checks
(one job's attributes across shards, ranks in their own files, statistics for a re-run finalize).
Exit codes (`EXIT_CODES`): 0 usable, 1 unfinished but resumable, 2 damaged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from logra_dist.config import ConfigError
from logra_dist.index.codecs import codec_for
from logra_dist.index.format import (
    MANIFEST_FILE,
    SHARD_DIR,
    STATS_FILE,
    IndexFormatError,
    ShardAttrs,
    another_job,
    layout_from_json,
    rank_stats_path,
    read_manifest,
    read_stats,
)
from logra_dist.index.h5io import attr_value
from logra_dist.index.partial import PartialRows, PartialShardError
from logra_dist.index.reader import index_problems

# `logra-dist inspect` exits with these (cli/parser.py, README, docs/reliability.md say the same).
EXIT_CODES = {"usable": 0, "partial": 1, "damaged": 2}
IDENTITY = tuple(f.name for f in dataclasses.fields(ShardAttrs))  # what resume and readers compare
NONFINITE_SHOWN = 5  # non-finite ids shown per shard (all of them are in the shard)
_SHARD = re.compile(r"^rank-(\d+)\.(h5|partial|h5\.partial)$")


def _disk_use(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _sample_positions(n: int, k: int) -> np.ndarray:
    """Up to k row positions spread evenly over [0, n) (increasing, unique)."""
    if n <= 0 or k <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, n - 1, num=min(n, k)).round().astype(np.int64))


def _shard_facts(
    path: Path, sample_rows: int, seen_ids: list[np.ndarray]
) -> tuple[dict[str, Any], np.ndarray | None, list | None]:
    """(facts, sampled float32 rows or None, layout or None) of one shard file; its usable ids
    are appended to `seen_ids` (for the cross-shard duplicate check)."""
    m = _SHARD.match(path.name)
    facts: dict[str, Any] = {
        "path": str(path.relative_to(path.parent.parent)),
        "rank": int(m.group(1)),
        "partial_name": m.group(2) != "h5",
        "bytes": _disk_use(path) if path.is_dir() else path.stat().st_size,
    }
    if m.group(2) == "partial":
        return _partial_facts(path, facts, sample_rows, seen_ids)
    if m.group(2) == "h5.partial":
        facts["error"] = (
            "the HDF5 shard being built at finalize (or a build that was interrupted: --resume rebuilds it)"
        )
        return facts, None, None
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        facts["error"] = f"unreadable ({e}); truncated, corrupted or being created"
        return facts, None, None
    with f:
        if "grads" not in f or "ids" not in f:
            facts["error"] = "datasets 'grads'/'ids' missing"
            return facts, None, None
        attrs = f.attrs
        facts["identity"] = {k: attr_value(attrs[k]) for k in IDENTITY if k in attrs}
        rows, n_ids = int(f["grads"].shape[0]), int(f["ids"].shape[0])
        facts.update(
            rows=rows,
            width=int(f["grads"].shape[1]),
            complete=bool(attrs.get("complete", False)),
            rows_committed=int(attrs.get("rows_committed", 0)),
            storage_dtype=str(attrs.get("storage_dtype", "?")),
            stored_as=str(f["grads"].dtype),
            world_size=int(attrs.get("world_size", 0)),
            chunks=list(f["grads"].chunks or ()),
            has_partial_stats="partial_stats" in f,
        )
        if "nonfinite_ids" in f:  # read here, not from the manifest: it holds only the counts
            facts.update(_nonfinite(f["nonfinite_ids"]))
        if n_ids != rows:
            facts["error"] = f"{rows} gradient rows but {n_ids} ids"
        layout = json.loads(attrs["layout"]) if "layout" in attrs else None
        facts.update(_widths(layout, facts["width"]))
        facts["config"] = json.loads(attrs["config"]) if "config" in attrs else None
        usable = min(rows, n_ids) if facts["complete"] else min(facts["rows_committed"], rows, n_ids)
        positions = _sample_positions(usable, sample_rows)
        sample = None
        if len(positions):
            try:
                codec = codec_for(facts["storage_dtype"], layout_from_json(attrs["layout"]) if layout else [])
            except ConfigError as e:
                facts["error"] = str(e)
                return facts, None, layout
            sample = codec.decode(f["grads"][positions]).numpy()
            ids = f["ids"][:usable]
            seen_ids.append(ids)
            facts["id_range"] = [int(ids.min()), int(ids.max())]
    return facts, sample, layout


def _partial_facts(
    path: Path, facts: dict[str, Any], sample_rows: int, seen_ids: list[np.ndarray]
) -> tuple[dict[str, Any], np.ndarray | None, list | None]:
    """Facts of a running or killed job's partial shard: only committed rows count."""
    try:
        part = PartialRows.open(path)
    except (PartialShardError, FileNotFoundError) as e:
        facts["error"] = f"unreadable commit record ({e}); being created, or damaged"
        return facts, None, None
    meta = part.record.meta
    facts["identity"] = {k: meta[k] for k in IDENTITY if k in meta}
    facts.update(
        rows=part.rows_on_disk,
        complete=False,
        rows_committed=part.record.rows,
        storage_dtype=str(meta.get("storage_dtype", "?")),
        stored_as=str(part.row_dtype),
        world_size=int(meta.get("world_size", 0)),
        chunks=[],
        has_partial_stats=part.record.has_stats,
        **_nonfinite(part.record.nonfinite_ids),
        **_widths(json.loads(meta["layout"]) if "layout" in meta else None, part.width),
        config=json.loads(meta["config"]) if "config" in meta else None,
    )
    layout = json.loads(meta["layout"]) if "layout" in meta else None
    positions = _sample_positions(part.committed, sample_rows)
    sample = None
    if len(positions):
        try:
            sample = part.decoded_at(positions)
        except ConfigError as e:
            facts["error"] = str(e)
            return facts, None, layout
        ids = part.committed_ids()
        seen_ids.append(ids)
        facts["id_range"] = [int(ids.min()), int(ids.max())]
    return facts, sample, layout


def _nonfinite(ids) -> dict[str, Any]:
    """A shard's count of samples left out for a non-finite gradient and the first of their ids
    (an HDF5 dataset or an array: only the first NONFINITE_SHOWN are read)."""
    n = int(ids.shape[0])
    return {"nonfinite_samples": n, "nonfinite_first": np.asarray(ids[: min(n, NONFINITE_SHOWN)]).tolist()}


def _widths(layout: list[dict] | None, stored: int) -> dict[str, int]:
    """D (values a row holds, from the layout) and the stored record's width: they differ for the
    quantized codecs, whose records carry per-layer scales."""
    width = sum(layer["k_out"] * layer["k_in"] for layer in layout) if layout else stored
    return {"width": width, "stored_width": stored}


def _layer_norms(samples: list[np.ndarray], layout: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per layer: mean and max over sampled rows of the Frobenius norm of that layer's block."""
    rows = np.concatenate(samples)
    out = []
    for layer in layout:
        width = layer["k_out"] * layer["k_in"]
        norms = np.linalg.norm(rows[:, layer["offset"] : layer["offset"] + width].astype(np.float64), axis=1)
        finite = norms[np.isfinite(norms)]
        out.append(
            {
                "name": layer["name"],
                "k_out": layer["k_out"],
                "k_in": layer["k_in"],
                "mean_norm": float(finite.mean()) if len(finite) else float("nan"),
                "max_norm": float(finite.max()) if len(finite) else float("nan"),
                "nonfinite_rows": int(len(norms) - len(finite)),
            }
        )
    return out


def inspect_index(index_dir: str | Path, sample_rows: int = 256) -> dict[str, Any]:
    """Facts about an index (JSON-able): `problems` lists every problem found, `status` /
    `exit_code` say whether the index is usable (0), a consistent unfinished job (1: `--resume`
    finishes it) or damaged (2). A finalized index gets the readers' own checks
    (`reader.index_problems`, `format.read_stats`); an unfinished one the resume checks."""
    root = Path(index_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    unfinished: list[str] = []  # what --resume completes
    damaged: list[str] = []  # what only a repair (or a new job) fixes
    manifest = None
    finalized = (root / MANIFEST_FILE).exists()
    if finalized:
        try:
            manifest = read_manifest(root / MANIFEST_FILE)
        except IndexFormatError as e:
            damaged.append(str(e))
    else:
        unfinished.append("manifest.json missing: the job has not finalized (Logger.finalize)")
    if not (root / STATS_FILE).exists():
        (damaged if finalized else unfinished).append(
            "stats.h5 missing: no Hessian statistics yet (written at finalize)"
        )
    files = sorted(
        (p for p in (root / SHARD_DIR).glob("rank-*") if _SHARD.match(p.name)),
        key=lambda p: (int(_SHARD.match(p.name).group(1)), p.name),
    )
    shards, samples, layout, seen_ids = [], [], None, []
    for path in files:
        facts, sample, shard_layout = _shard_facts(path, sample_rows, seen_ids)
        shards.append(facts)
        if shard_layout is not None and layout is None:
            layout = shard_layout
        if sample is not None and shard_layout == layout:
            samples.append(sample)
    if not finalized:
        _unfinished_problems(root, shards, seen_ids, unfinished, damaged)
    if manifest is not None:  # an unreadable manifest is listed already; nothing checks against it
        damaged += index_problems(root)
    if finalized and (root / STATS_FILE).exists():
        try:
            read_stats(root / STATS_FILE)
        except IndexFormatError as e:
            damaged.append(str(e))
    world = max([s.get("world_size", 0) for s in shards] + [manifest.get("world_size", 0) if manifest else 0])
    problems = unfinished + damaged
    status = "damaged" if damaged or (finalized and unfinished) else "partial" if unfinished else "usable"
    total = sum(s.get("rows", 0) for s in shards)
    first = next((s for s in shards if "config" in s), {})
    return {
        "index": str(root),
        "complete": status == "usable",
        "status": status,
        "exit_code": EXIT_CODES[status],
        "problems": problems,
        "world_size": world,
        "shards": [{k: v for k, v in s.items() if k not in ("config", "identity")} for s in shards],
        "rows_on_disk": total,
        "rows_in_manifest": manifest.get("total_rows") if manifest else None,
        "nonfinite_samples": sum(s.get("nonfinite_samples", 0) for s in shards),
        "nonfinite_in_manifest": manifest.get("nonfinite_total") if manifest else None,
        "nonfinite_first": [i for s in shards for i in s.get("nonfinite_first", [])][:NONFINITE_SHOWN],
        "width": first.get("width"),
        "storage_dtype": first.get("storage_dtype"),
        "config": (manifest or {}).get("config") or first.get("config"),
        "engine": (manifest or {}).get("engine"),
        "fisher_estimator": ((manifest or {}).get("metadata") or {}).get("fisher_estimator"),
        "model": (manifest or {}).get("model"),
        "data": (manifest or {}).get("data"),
        "lambdas": (manifest or {}).get("lambdas"),
        "layout": layout or [],
        "layer_norms": _layer_norms(samples, layout) if samples and layout else [],
        "sampled_rows": int(sum(len(s) for s in samples)),
        "disk_bytes": _disk_use(root),
    }


def _unfinished_problems(
    root: Path, shards: list[dict[str, Any]], seen_ids: list[np.ndarray], unfinished: list[str], damaged: list[str]
) -> None:
    """What a job without a manifest left: resumable only if every shard is readable, all
    belong to one job (the attributes resume compares), hold each id once, and complete ones
    still have the statistics a re-run finalize needs."""
    if not shards:
        damaged.append(f"no shard files under {root / SHARD_DIR}: nothing to resume")
        return
    reference = next((s for s in shards if "identity" in s), None)
    for s in shards:
        if "error" in s:
            being_built = s["path"].endswith(".h5.partial")
            (unfinished if being_built else damaged).append(f"{s['path']}: {s['error']}")
            continue
        if not s["complete"]:
            unfinished.append(
                f"{s['path']}: incomplete ({s['rows']} rows on disk, {s['rows_committed']} committed and resumable)"
            )
        elif not rank_stats_path(root / s["path"]).exists():
            damaged.append(
                f"{s['path']}: complete, but without {rank_stats_path(root / s['path']).name} and with no "
                "manifest: its finalize cannot be re-run; delete the index to log again"
            )
        ident = s.get("identity", {})
        if ident.get("rank", s["rank"]) != s["rank"]:
            damaged.append(f"{s['path']}: holds the shard of rank {ident['rank']} (files swapped or renamed?)")
        if reference is not None and s is not reference:
            want = {k: v for k, v in reference["identity"].items() if k != "rank"}
            problem = another_job(ident, want, f"in {s['path']}", f"in {reference['path']}")
            if problem:
                damaged.append(f"{s['path']}: another job's shard: {problem}")
    if seen_ids:
        uniq, counts = np.unique(np.concatenate(seen_ids), return_counts=True)
        if (counts > 1).any():
            damaged.append(
                f"{int((counts > 1).sum())} sample id(s) logged more than once, e.g. {uniq[counts > 1][:5].tolist()}"
            )
    world = max(s.get("world_size", 0) for s in shards)
    present = {s["rank"] for s in shards}
    missing = [r for r in range(world) if r not in present]
    if missing:
        unfinished.append(f"no shard at all for rank(s) {missing} of world size {world}")
    extra = sorted(r for r in present if r >= world)
    if extra:
        damaged.append(f"shards of rank(s) {extra} exceed the world size {world} of the others")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


_HEADLINE = {
    "usable": "COMPLETE",
    "partial": "INCOMPLETE, resumable (rerun the job with --resume)",
    "damaged": "INCOMPLETE, DAMAGED (not usable without repair)",
}


def _rank_lines(cfg: dict[str, Any], layout: list[dict[str, Any]]) -> list[str]:
    """The `ranks` overrides and every layer whose ranks are not the config's k_in/k_out (capped at
    a narrow layer's width or overridden): the rows' shape is never a surprise."""
    lines = [f"  ranks overrides (first match wins): {cfg['ranks']}"] if cfg.get("ranks") else []
    if cfg.get("init") == "identity":
        return lines
    own = [layer for layer in layout if (layer["k_in"], layer["k_out"]) != (cfg.get("k_in"), cfg.get("k_out"))]
    if own:
        lines.append(f"  {len(own)} layer(s) with their own ranks (k_out x k_in, of d_out x d_in):")
        lines += [
            f"    {layer['name']:<44} {layer['k_out']:>5} x {layer['k_in']:<5} of {layer['d_out']} x {layer['d_in']}"
            for layer in own
        ]
    return lines


def _nonfinite_lines(facts: dict[str, Any]) -> list[str]:
    n = facts["nonfinite_samples"]
    if not n:
        return []
    more = " ..." if n > len(facts["nonfinite_first"]) else ""
    return [
        f"  non-finite samples left out: {n}, ids {facts['nonfinite_first']}{more} "
        "(all of them in each shard's dataset 'nonfinite_ids')"
    ]


def _estimator(est: dict[str, Any] | None) -> str:
    """How the statistics pass drew the model Fisher (Logger.fisher_targets), when it recorded it."""
    if not est:
        return ""
    if est.get("kind") == "exact":
        return f" (model Fisher: exact over {est.get('classes')} classes)"
    return f" (model Fisher: {est.get('samples')} labels drawn per token)"


def render(facts: dict[str, Any]) -> str:
    """The facts as a terminal page."""
    cfg = facts.get("config") or {}
    lines = [
        f"index {facts['index']}: {_HEADLINE[facts['status']]} (exit code {facts['exit_code']})",
        f"  rows: {facts['rows_on_disk']} on disk"
        + (f", {facts['rows_in_manifest']} in manifest" if facts["rows_in_manifest"] is not None else ""),
        f"  width D={facts['width']}, stored as {facts['storage_dtype']}, {len(facts['layout'])} layers, "
        f"world size {facts['world_size']}, engine {facts.get('engine') or '?'}",
        f"  config: k_in={cfg.get('k_in')} k_out={cfg.get('k_out')} init={cfg.get('init')} "
        f"hessian={cfg.get('hessian')} fisher={cfg.get('fisher', 'empirical')} damping={cfg.get('damping')} "
        f"seed={cfg.get('seed')}" + _estimator(facts.get("fisher_estimator")),
        f"  disk use: {_size(facts['disk_bytes'])}",
        *_nonfinite_lines(facts),
        *_rank_lines(cfg, facts["layout"]),
        "",
        "shards:",
    ]
    for s in facts["shards"]:
        if "error" in s:
            lines.append(f"  {s['path']}: ERROR {s['error']}")
            continue
        state = "complete" if s["complete"] else f"partial ({s['rows_committed']} committed)"
        ids = f", ids {s['id_range'][0]}..{s['id_range'][1]}" if "id_range" in s else ""
        bad = f", {s['nonfinite_samples']} non-finite left out" if s.get("nonfinite_samples") else ""
        lines.append(f"  rank {s['rank']:>3}  {s['rows']:>8} rows  {state:<24} {_size(s['bytes']):>10}{ids}{bad}")
    if facts["layer_norms"]:
        lines += [
            "",
            f"per-layer block norms over {facts['sampled_rows']} sampled rows:",
            f"  {'layer':<44} {'k_out x k_in':>12} {'mean':>11} {'max':>11}",
        ]
        for layer in facts["layer_norms"]:
            bad = f"  ({layer['nonfinite_rows']} non-finite)" if layer["nonfinite_rows"] else ""
            lines.append(
                f"  {layer['name']:<44} {layer['k_out']:>5} x {layer['k_in']:<4} "
                f"{layer['mean_norm']:>11.4g} {layer['max_norm']:>11.4g}{bad}"
            )
    if facts["problems"]:
        lines += ["", f"{len(facts['problems'])} problem(s):"] + [f"  - {p}" for p in facts["problems"]]
    return "\n".join(lines)
