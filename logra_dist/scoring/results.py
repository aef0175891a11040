"""Writing scoring results: `topk.h5` for programs, `topk.jsonl` and `topk.md` for people.

Only rank 0 writes (every rank holds the same merged result); no collective is involved, so a
caller may call this on every rank. Files appear atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from logra_dist import comm
from logra_dist.scoring.kernels import TopKResult

FORMAT_VERSION = 1
TextLookup = Mapping[int, str] | Callable[[int], str] | None


def _text(lookup: TextLookup, key: int) -> str | None:
    if lookup is None:
        return None
    if callable(lookup) and not isinstance(lookup, Mapping):
        return lookup(key)
    return lookup.get(key)


def write_topk_h5(path: str | Path, result: TopKResult, attrs: Mapping[str, Any] | None = None) -> Path:
    """Datasets scores (n_q, k) float32, train_ids (n_q, k) int64, query_ids (n_q,) int64; layer
    groups under groups/<name>/; attrs mode, damping, k and whatever the caller adds (index path,
    config) as strings or numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        _put(f, result)
        f.create_dataset("query_ids", data=np.asarray(result.query_ids, np.int64))
        f.attrs.update(
            {
                "format_version": FORMAT_VERSION,
                "mode": result.mode,
                "damping": float(result.damping),
                "k": int(result.scores.shape[1]),
                "groups": json.dumps(list(result.groups)),
            }
        )
        for key, value in {**result.info, **(attrs or {})}.items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True)
        for name, sub in result.groups.items():
            _put(f.create_group(f"groups/{name}"), sub)
    os.replace(tmp, path)
    return path


def _put(group: h5py.Group, result: TopKResult) -> None:
    group.create_dataset("scores", data=np.asarray(result.scores, np.float32))
    group.create_dataset("train_ids", data=np.asarray(result.train_ids, np.int64))


def read_topk_h5(path: str | Path) -> TopKResult:
    with h5py.File(path, "r") as f:

        def get(g: h5py.Group) -> TopKResult:
            return TopKResult(
                g["scores"][()], g["train_ids"][()], f["query_ids"][()], str(f.attrs["mode"]), float(f.attrs["damping"])
            )

        out = get(f)
        out.info = {
            k: f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k] for k in f.attrs if k.startswith("ann")
        }
        out.groups = {name: get(f[f"groups/{name}"]) for name in json.loads(f.attrs.get("groups", "[]"))}
    return out


def listing(
    result: TopKResult,
    query_text: TextLookup = None,
    train_text: TextLookup = None,
    query_fields: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One record per query: its text and ranked training examples (with texts when given);
    query_fields: more JSON-able facts per query id (e.g. a prompt and the model's completion)."""

    def ranked(r: TopKResult, q: int) -> list[dict[str, Any]]:
        return [
            {"rank": j + 1, "train_id": int(t), "score": float(s), "text": _text(train_text, int(t))}
            for j, (t, s) in enumerate(zip(r.train_ids[q], r.scores[q]))
        ]

    records = []
    for q, qid in enumerate(np.asarray(result.query_ids).tolist()):
        rec = {
            "query_id": int(qid),
            "query_text": _text(query_text, int(qid)),
            **(query_fields or {}).get(int(qid), {}),
            "results": ranked(result, q),
        }
        if result.groups:
            rec["groups"] = {name: ranked(sub, q) for name, sub in result.groups.items()}
        records.append(rec)
    return records


def _cell(text: str | None, limit: int = 200) -> str:
    if text is None:
        return ""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def markdown(records: list[dict[str, Any]], result: TopKResult) -> str:
    lines = [
        f"# Top-{result.scores.shape[1]} training examples per query",
        "",
        f"mode: {result.mode}, damping: {result.damping:g}",
        "",
    ]
    if result.info.get("ann"):
        lines[-1:] = [
            f"ANN: {result.info.get('ann_candidates')} candidates per query and shard "
            f"({result.info.get('ann_factory')}, sketch dim {result.info.get('ann_sketch_dim')}), re-scored exactly",
            "",
        ]
    for rec in records:
        lines += [f"## Query {rec['query_id']}", ""]
        if rec["query_text"] is not None:
            lines += [f"> {_cell(rec['query_text'], 1000)}", ""]
        sections = [("all layers", rec["results"])] + list(rec.get("groups", {}).items())
        for title, rows in sections:
            if len(sections) > 1:
                lines += [f"### {title}", ""]
            lines += ["| rank | train id | score | text |", "|---:|---:|---:|---|"]
            lines += [f"| {r['rank']} | {r['train_id']} | {r['score']:.6g} | {_cell(r['text'])} |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_results(
    out_dir: str | Path,
    result: TopKResult,
    *,
    index_dir: str | Path | None = None,
    config: Any = None,
    query_text: TextLookup = None,
    train_text: TextLookup = None,
    attrs: Mapping[str, Any] | None = None,
    query_fields: Mapping[int, Mapping[str, Any]] | None = None,
) -> dict[str, Path] | None:
    """On rank 0: out_dir/topk.h5, topk.jsonl and topk.md. Returns their paths (None elsewhere).
    config: the index's LoGraConfig (or anything JSON-able) recorded in topk.h5's attributes."""
    if comm.rank() != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(attrs or {})
    if index_dir is not None:
        meta["index"] = str(Path(index_dir).resolve())
    if config is not None:
        meta["config"] = config.to_json() if hasattr(config, "to_json") else json.dumps(config, sort_keys=True)
    paths = {"h5": write_topk_h5(out / "topk.h5", result, meta)}
    records = listing(result, query_text, train_text, query_fields)
    _write_text_atomic(out / "topk.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _write_text_atomic(out / "topk.md", markdown(records, result))
    paths.update(jsonl=out / "topk.jsonl", md=out / "topk.md")
    return paths
