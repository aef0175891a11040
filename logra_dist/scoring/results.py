"""Writing scoring results: `topk.h5` for programs, `topk.jsonl` and `topk.md` for people.

Only rank 0 writes (every rank holds the same merged result); no collective is involved, so a
caller may call this on every rank. Files appear atomically (temporary name, then rename).
`ResultsWriter` appends query chunk by query chunk (the CLI scores queries in bounded chunks),
so memory holds one chunk's results, not the run's. Every file carries the run's id (uuid4 hex:
topk.h5 attribute `run_id`, each topk.jsonl record, the topk.md header), so `report` can tell
files of different runs apart.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TextIO

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
        _put_attrs(f, result, attrs)
        for name, sub in result.groups.items():
            _put(f.create_group(f"groups/{name}"), sub)
    os.replace(tmp, path)
    return path


def _put_attrs(f: h5py.File, result: TopKResult, extra: Mapping[str, Any] | None) -> None:
    """topk.h5's attributes: format, mode, damping, k, groups, how it was scored (`result.info`:
    ANN) and the caller's (index path, config, run id), non-scalars as JSON."""
    f.attrs.update(
        {
            "format_version": FORMAT_VERSION,
            "mode": result.mode,
            "damping": float(result.damping),
            "k": int(result.scores.shape[1]),
            "groups": json.dumps(list(result.groups)),
            "bottomk": 0 if result.bottom is None else int(result.bottom.scores.shape[1]),
        }
    )
    for key, value in {**result.info, **(extra or {})}.items():
        f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True)


def _put(group: h5py.Group, result: TopKResult) -> None:
    """scores and train_ids; with a bottom-k, bottom_scores and bottom_train_ids beside them."""
    group.create_dataset("scores", data=np.asarray(result.scores, np.float32))
    group.create_dataset("train_ids", data=np.asarray(result.train_ids, np.int64))
    if result.bottom is not None:
        group.create_dataset("bottom_scores", data=np.asarray(result.bottom.scores, np.float32))
        group.create_dataset("bottom_train_ids", data=np.asarray(result.bottom.train_ids, np.int64))


def read_topk_h5(path: str | Path) -> TopKResult:
    with h5py.File(path, "r") as f:

        def get(g: h5py.Group, prefix: str = "") -> TopKResult:
            out = TopKResult(
                g[prefix + "scores"][()],
                g[prefix + "train_ids"][()],
                f["query_ids"][()],
                str(f.attrs["mode"]),
                float(f.attrs["damping"]),
            )
            if not prefix and "bottom_scores" in g:
                out.bottom = get(g, "bottom_")
            return out

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
        rows = [
            {"train_id": int(t), "score": float(s), "text": _text(train_text, int(t)), **_fields(train_text, int(t))}
            for t, s in zip(r.train_ids[q], r.scores[q])
        ]
        return [{"rank": j + 1, **row} for j, row in enumerate(by_document(rows))]

    records = []
    for q, qid in enumerate(np.asarray(result.query_ids).tolist()):
        rec = {
            "query_id": int(qid),
            "query_text": _text(query_text, int(qid)),
            **(query_fields or {}).get(int(qid), {}),
            "results": ranked(result, q),
        }
        if result.bottom is not None:
            rec["bottom"] = ranked(result.bottom, q)
        if result.groups:
            rec["groups"] = {name: ranked(sub, q) for name, sub in result.groups.items()}
            if result.bottom is not None:
                rec["groups_bottom"] = {name: ranked(sub.bottom, q) for name, sub in result.groups.items()}
        records.append(rec)
    return records


def _fields(lookup: TextLookup, key: int) -> dict[str, Any]:
    """More facts of a training sample when the lookup has them (`data.recorded.RecordedTexts`:
    its document and, for a window of a chunked index, the window's token offset)."""
    fields = getattr(lookup, "fields", None)
    return fields(key) if callable(fields) else {}


def by_document(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Windows of one document (rows with an "offset") listed once: a document scores as its best
    window, which is the one shown, with the number of its windows in the top k. topk.h5 keeps
    every window's row."""
    if not any("offset" in r for r in rows):
        return rows
    best: dict[Any, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: -r["score"]):
        key = json.dumps(row["document"])
        if key in best:
            best[key]["windows_in_topk"] += 1
        else:
            best[key] = {**row, "windows_in_topk": 1}
    return list(best.values())


def _cell(text: str | None, limit: int = 200) -> str:
    if text is None:
        return ""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def markdown_header(result: TopKResult, run_id: str | None = None) -> str:
    run = f", run id: {run_id}" if run_id else ""
    run += f", bottom-{result.bottom.scores.shape[1]} (most opposing) too" if result.bottom is not None else ""
    title = f"# Top-{result.scores.shape[1]} training examples per query"
    ann = ""
    if result.info.get("ann"):
        ann = (
            f"ANN: {result.info.get('ann_candidates')} candidates per query and shard "
            f"({result.info.get('ann_factory')}, sketch dim {result.info.get('ann_sketch_dim')}, search "
            f"parameters {result.info.get('ann_search_params') or 'none'}), re-scored exactly\n\n"
        )
    return f"{title}\n\nmode: {result.mode}, damping: {result.damping:g}{run}\n\n{ann}"


def markdown(records: list[dict[str, Any]], result: TopKResult, run_id: str | None = None) -> str:
    return markdown_header(result, run_id) + markdown_body(records)


def markdown_body(records: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for rec in records:
        lines += [f"## Query {rec['query_id']}", ""]
        if rec["query_text"] is not None:
            lines += [f"> {_cell(rec['query_text'], 1000)}", ""]
        sections = [("all layers", rec["results"])] + list(rec.get("groups", {}).items())
        if "bottom" in rec:  # the most opposing examples: lowest scores first
            sections.append(("bottom (most opposing), all layers", rec["bottom"]))
            sections += [(f"bottom (most opposing), {g}", rows) for g, rows in rec.get("groups_bottom", {}).items()]
        for title, rows in sections:
            if len(sections) > 1:
                lines += [f"### {title}", ""]
            lines += ["| rank | train id | score | text |", "|---:|---:|---:|---|"]
            lines += [f"| {r['rank']} | {_train_cell(r)} | {r['score']:.6g} | {_cell(r['text'])} |" for r in rows]
            lines.append("")
    return "".join(line + "\n" for line in lines)  # chunks concatenate like one listing


def _train_cell(row: dict[str, Any]) -> str:
    """The sample id, with the record's own id where it has one (a string id, say)."""
    if "offset" not in row:
        own = row.get("document", row["train_id"])
        return str(row["train_id"]) + ("" if own == row["train_id"] else f" ({_cell(json.dumps(own), 40)})")
    return f"{row['train_id']} (doc {_cell(json.dumps(row['document']), 40)}, token {row['offset']})"


def new_run_id() -> str:
    return uuid.uuid4().hex


class ResultsWriter:
    """Rank 0 (elsewhere a no-op): out_dir/topk.h5, topk.jsonl and topk.md, appended one query
    chunk at a time (h5 datasets grow along the query axis) under temporary names, renamed into
    place by close(); abort() removes them."""

    NAMES: ClassVar[dict[str, str]] = {"h5": "topk.h5", "jsonl": "topk.jsonl", "md": "topk.md"}

    def __init__(self, out_dir: str | Path, attrs: Mapping[str, Any] | None = None, run_id: str | None = None):
        self.run_id = run_id or new_run_id()
        self.active = comm.rank() == 0
        self.out, self.attrs, self.rows = Path(out_dir), dict(attrs or {}), 0
        self._h5: h5py.File | None = None
        self._text: dict[str, TextIO] = {}

    def _tmp(self, key: str) -> Path:
        return self.out / (self.NAMES[key] + ".tmp")

    def _open(self, result: TopKResult) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._h5 = f = h5py.File(self._tmp("h5"), "w")
        k = int(result.scores.shape[1])
        kb = 0 if result.bottom is None else int(result.bottom.scores.shape[1])
        for g in [f, *(f.create_group(f"groups/{name}") for name in result.groups)]:
            for prefix, width in (("", k), ("bottom_", kb)) if kb else (("", k),):
                chunks = (max(1, 65536 // max(1, width)), width)
                g.create_dataset(prefix + "scores", (0, width), np.float32, maxshape=(None, width), chunks=chunks)
                g.create_dataset(prefix + "train_ids", (0, width), np.int64, maxshape=(None, width), chunks=chunks)
        f.create_dataset("query_ids", (0,), np.int64, maxshape=(None,), chunks=(65536,))
        _put_attrs(f, result, {"run_id": self.run_id, **self.attrs})
        self._text = {key: self._tmp(key).open("w", encoding="utf-8") for key in ("jsonl", "md")}
        self._text["md"].write(markdown_header(result, self.run_id))

    def append(
        self,
        result: TopKResult,
        query_text: TextLookup = None,
        train_text: TextLookup = None,
        query_fields: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> list[dict[str, Any]] | None:
        """Add one chunk's results (queries after those already written); returns its records."""
        if not self.active:
            return None
        if self._h5 is None:
            self._open(result)
        n, lo = len(result.query_ids), self.rows
        for g, r in [(self._h5, result), *((self._h5[f"groups/{name}"], sub) for name, sub in result.groups.items())]:
            parts = [("scores", r.scores), ("train_ids", r.train_ids)]
            if r.bottom is not None:
                parts += [("bottom_scores", r.bottom.scores), ("bottom_train_ids", r.bottom.train_ids)]
            for key, value in parts:
                g[key].resize(lo + n, axis=0)
                g[key][lo:] = value
        self._h5["query_ids"].resize(lo + n, axis=0)
        self._h5["query_ids"][lo:] = np.asarray(result.query_ids, np.int64)
        self.rows += n
        records = listing(result, query_text, train_text, query_fields)
        self._text["jsonl"].write(
            "".join(json.dumps({**r, "run_id": self.run_id}, ensure_ascii=False) + "\n" for r in records)
        )
        self._text["md"].write(markdown_body(records))
        return records

    def _shut(self) -> None:
        if self._h5 is not None:
            self._h5.close()
        for f in self._text.values():
            f.close()

    def close(self) -> dict[str, Path] | None:
        """Finish the files and rename them into place (rank 0); their paths, None elsewhere."""
        if not self.active or self._h5 is None:
            return None
        self._shut()
        self._h5 = None
        paths = {key: self.out / name for key, name in self.NAMES.items()}
        for key, path in paths.items():
            os.replace(self._tmp(key), path)
        return paths

    def abort(self) -> None:
        if self.active:
            self._shut()
            for key in self.NAMES:
                self._tmp(key).unlink(missing_ok=True)


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
    run_id: str | None = None,
) -> dict[str, Path] | None:
    """On rank 0: out_dir/topk.h5, topk.jsonl and topk.md. Returns their paths (None elsewhere).
    config: the index's LoGraConfig (or anything JSON-able) recorded in topk.h5's attributes."""
    writer = ResultsWriter(out_dir, results_meta(index_dir, config, attrs), run_id)
    try:
        writer.append(result, query_text, train_text, query_fields)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def results_meta(index_dir: str | Path | None, config: Any, attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    """topk.h5 attributes beyond the result's own: the index path and config, and `attrs`."""
    meta = dict(attrs or {})
    if index_dir is not None:
        meta["index"] = str(Path(index_dir).resolve())
    if config is not None:
        meta["config"] = config.to_json() if hasattr(config, "to_json") else json.dumps(config, sort_keys=True)
    return meta
