"""`logra-dist report RESULTS`: one self-contained HTML page of top-k attributions.

Reads a `score --out` directory: `topk.h5` (scores, train_ids, query_ids, mode, damping; the
numbers shown) and `topk.jsonl` (the texts), refusing the pair when their run ids differ. Each
query's text stands beside its most valuable training texts with their scores; a histogram of
all top-k scores (and of the top-1 scores) sits on top. The plot is inline SVG drawn here: the
page loads nothing (no JS, no CDN, no fonts), so it renders the same offline, in CI's headless
Chromium and in a mail attachment. The listing layout read is `results.listing`'s:
`{"query_text", "results": [...]}`.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
  background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header .meta{font-size:13px;color:#c5cad6}
main{padding:18px 28px;max-width:1400px}
.panel{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:14px 18px;margin-bottom:16px}
.panel h2{font-size:15px;margin:0 0 8px}
.query{display:grid;grid-template-columns:minmax(260px,1fr) 2fr;gap:18px}
.qtext{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;
  word-break:break-word;
  background:#f0f3fa;border-left:4px solid #3b6fd8;padding:8px 10px;border-radius:4px}
.prompt{color:#6b7385}
ol.top{list-style:none;margin:0;padding:0}
ol.top li{display:grid;grid-template-columns:34px 120px 1fr;gap:10px;align-items:start;padding:7px 0;
  border-top:1px solid #eceef3}
ol.top li:first-child{border-top:none}
.rank{font-weight:700;color:#3b6fd8;font-size:18px;text-align:right}
.score{font-size:12px;color:#434a5a}
.score b{font-size:14px;color:#1d2330}
.bar{height:6px;background:#e4e8f1;border-radius:3px;margin-top:4px}
.bar span{display:block;height:6px;background:#e98b2a;border-radius:3px}
.bar.neg span{background:#9aa3b5}
.ttext{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
  word-break:break-word;color:#2a3140}
.tid{color:#6b7385;font-size:11px}
.note{color:#6b7385;font-size:12px}
"""


def _load_listing(path: Path, run_id: str | None = None) -> dict[int, dict[str, Any]]:
    """query id -> {"prompt", "completion", "train": {train id: text}} from either jsonl layout;
    every record must carry `run_id` (topk.h5's: both files from one run; None: written before
    run ids, and then no record may carry one)."""
    out: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return out
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from e
        if rec.get("run_id") != run_id:
            raise ValueError(
                f"{path}:{line_no}: run id {rec.get('run_id')} but {path.with_name('topk.h5')} has run id "
                f"{run_id}: the two files come from different `score` runs; score again into an empty --out"
            )
        out[int(rec["query_id"])] = {
            "prompt": "",
            "completion": rec.get("query_text") or "",
            "train": {int(t["train_id"]): t.get("text") for t in rec.get("results", []) + rec.get("bottom", [])},
            # a chunked index: the listing's results, one per document (its best window)
            "grouped": [t for t in rec.get("results", []) if "offset" in t],
        }
    return out


def _where(entry: dict[str, Any] | None) -> str:
    """Which document and window a grouped result is ("" for an ungrouped one)."""
    if not entry:
        return ""
    more = entry.get("windows_in_topk", 1)
    return f" · doc {json.dumps(entry['document'])} @ token {entry['offset']}" + (
        f" (best of {more} windows)" if more > 1 else ""
    )


def _clip(text: str | None, limit: int) -> str:
    if text is None:
        return ""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def histogram_svg(all_scores: np.ndarray, top1: np.ndarray, width: int = 900, height: int = 260) -> str:
    """Inline SVG: histogram of every top-k score, with the top-1 scores overlaid."""
    values = all_scores[np.isfinite(all_scores)]
    if len(values) == 0:
        return '<p class="note">no finite scores to plot</p>'
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    bins = np.linspace(lo, hi, min(40, max(8, int(math.sqrt(len(values))) + 1)) + 1)
    h_all, _ = np.histogram(values, bins)
    h_top, _ = np.histogram(top1[np.isfinite(top1)], bins)
    left, right, top, bottom = 56, 16, 14, 42
    pw, ph = width - left - right, height - top - bottom
    ymax = max(1, int(h_all.max()))
    x = lambda v: left + (v - lo) / (hi - lo) * pw  # noqa: E731
    y = lambda c: top + ph - c / ymax * ph  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="score distribution">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fbfcfe" stroke="#d5d9e2"/>',
    ]
    for t in _nice_ticks(0, ymax, 4):
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e6e9ef"/>'
            f'<text x="{left - 6}" y="{y(t) + 4:.1f}" font-size="11" text-anchor="end" fill="#555">{int(t)}</text>'
        )
    for counts, color, opacity in ((h_all, "#3b6fd8", 0.85), (h_top, "#e98b2a", 0.9)):
        for i, c in enumerate(counts):
            if c:
                x0, x1 = x(bins[i]), x(bins[i + 1])
                parts.append(
                    f'<rect x="{x0 + 0.5:.1f}" y="{y(c):.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                    f'height="{top + ph - y(c):.1f}" fill="{color}" fill-opacity="{opacity}"/>'
                )
    for t in _nice_ticks(lo, hi, 6):
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#555"/>'
            f'<text x="{x(t):.1f}" y="{top + ph + 17}" font-size="11" text-anchor="middle" fill="#555">{_fmt(t)}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 6}" font-size="12" text-anchor="middle" fill="#333">score</text>'
        f'<text x="14" y="{top + ph / 2}" font-size="12" text-anchor="middle" fill="#333" '
        f'transform="rotate(-90 14 {top + ph / 2})">count</text>'
    )
    lx = left + pw - 210
    parts.append(
        f'<rect x="{lx}" y="{top + 8}" width="12" height="12" fill="#3b6fd8"/>'
        f'<text x="{lx + 18}" y="{top + 18}" font-size="12" fill="#333">all top-k scores ({len(values)})</text>'
        f'<rect x="{lx}" y="{top + 28}" width="12" height="12" fill="#e98b2a"/>'
        f'<text x="{lx + 18}" y="{top + 38}" font-size="12" fill="#333">'
        f"top-1 scores ({int(np.isfinite(top1).sum())})</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _ranked(
    ids: np.ndarray, scores: np.ndarray, texts: dict[int, str | None], max_chars: int, grouped: list | None = None
) -> list[str]:
    """<li> items of one ranked list (top-k or bottom-k), bars scaled to the list's largest |score|;
    `grouped` (a chunked index's listing entries) says which document and window each one is."""
    esc = html.escape
    by_id = {int(g["train_id"]): g for g in grouped or []}
    finite = scores[np.isfinite(scores)]
    scale = float(np.abs(finite).max()) if len(finite) else 1.0
    items = []
    for rank, (tid, s) in enumerate(zip(ids, scores), 1):
        if tid < 0:  # padding when the index holds fewer than k rows
            continue
        width = 100.0 * abs(float(s)) / scale if scale > 0 and math.isfinite(float(s)) else 0.0
        text = texts.get(int(tid))
        shown = esc(_clip(text, max_chars)) if text is not None else "<i>(text unavailable)</i>"
        items.append(
            f'<li><div class="rank">{rank}</div><div class="score"><b>{_fmt(float(s))}</b>'
            f'<div class="bar{" neg" if s < 0 else ""}"><span style="width:{width:.1f}%"></span></div>'
            f'<div class="tid">train #{int(tid)}{esc(_where(by_id.get(int(tid))))}</div></div>'
            f'<div class="ttext">{shown}</div></li>'
        )
    return items


def render_report(results_dir: str | Path, *, max_queries: int = 50, max_chars: int = 600, data=None) -> str:
    """The HTML page (a string) for a `score --out` directory. The texts are those `score` read
    and verified; with `data` (the training files, moved since logging) they are read from there
    and verified against the index's per-sample digests again."""
    root = Path(results_dir)
    h5_path = root / "topk.h5"
    if not h5_path.exists():
        raise FileNotFoundError(f"{h5_path}: missing; `logra-dist score --out {root}` writes it")
    with h5py.File(h5_path, "r") as f:
        scores, train_ids, query_ids = f["scores"][()], f["train_ids"][()], f["query_ids"][()]
        bottom = (f["bottom_scores"][()], f["bottom_train_ids"][()]) if "bottom_scores" in f else None
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    if scores.shape != train_ids.shape or scores.shape[0] != len(query_ids):
        raise ValueError(
            f"{h5_path}: scores {scores.shape}, train_ids {train_ids.shape} and {len(query_ids)} query ids do not agree"
        )
    listing = _load_listing(root / "topk.jsonl", attrs.get("run_id"))
    if data:
        ranked = np.concatenate([train_ids] + ([bottom[1]] if bottom is not None else []), axis=1)
        _texts_from_data(attrs, data, query_ids, ranked, listing)
    esc = html.escape
    n_q, k = scores.shape
    meta = (
        f"mode <b>{esc(str(attrs.get('mode', '?')))}</b> · damping {esc(str(attrs.get('damping', '?')))} · "
        f"{n_q} queries · top-{k}" + (f" · index {esc(str(attrs['index']))}" if "index" in attrs else "")
    )
    top1 = scores[:, 0] if k else np.zeros(0)
    body = [
        f'<header><h1>LoGra: most valuable training examples per query</h1><div class="meta">{meta}</div></header>',
        "<main>",
        '<section class="panel"><h2>Score distribution</h2>',
        histogram_svg(scores.reshape(-1), top1),
        "</section>",
    ]
    if not listing:
        body.append(f'<p class="note">{esc(str(root / "topk.jsonl"))} not found: texts are not shown.</p>')
    for row in range(min(n_q, max_queries)):
        qid = int(query_ids[row])
        item = listing.get(qid, {"prompt": "", "completion": "", "train": {}})
        prompt = _clip(item["prompt"], max_chars)
        completion = _clip(item["completion"], max(0, max_chars - len(prompt)))
        grouped = item.get("grouped") or []
        if grouped:  # a chunked index: one entry per document, its best window
            ids = np.array([g["train_id"] for g in grouped])
            items = _ranked(ids, np.array([g["score"] for g in grouped]), item["train"], max_chars, grouped)
        else:
            items = _ranked(train_ids[row], scores[row], item["train"], max_chars)
        opposing = ""
        if bottom is not None:  # the most opposing examples, lowest score first
            low = _ranked(bottom[1][row], bottom[0][row], item["train"], max_chars)
            opposing = f'<h2>Bottom {len(low)}: most opposing examples</h2><ol class="top">{"".join(low)}</ol>'
        body.append(
            f'<section class="panel query" id="q{qid}"><div><h2>Query #{qid}</h2><div class="qtext">'
            f'<span class="prompt">{esc(prompt)}</span>{esc(completion)}</div></div>'
            f'<div><h2>Top {len(items)} training examples</h2><ol class="top">{"".join(items)}</ol>{opposing}</div>'
            "</section>"
        )
    if n_q > max_queries:
        body.append(f'<p class="note">{n_q - max_queries} more queries not shown (--max-queries).</p>')
    body.append("</main>")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>LoGra attributions</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def _texts_from_data(attrs: dict[str, Any], data: list[str], query_ids, ranked, listing: dict[int, dict]) -> None:
    """Fill each query's training texts (`ranked`: its listed train ids) from `data`, verified
    per sample against the index's digests (a changed file is refused)."""
    from logra_dist.cli.sources import _texts_of
    from logra_dist.index.format import read_manifest

    if "index" not in attrs:
        raise ValueError("report --data: topk.h5 does not name its index (scored by an older version)")
    index = Path(str(attrs["index"]))
    texts = _texts_of(index, read_manifest(index / "manifest.json"), f"training index {index}", data=data)
    if texts is None:
        return
    texts.load(ranked[ranked >= 0])
    for qid, row in zip(query_ids.tolist(), ranked):
        item = listing.setdefault(int(qid), {"prompt": "", "completion": "", "train": {}})
        item["train"] = {int(t): texts(int(t)) for t in row if t >= 0}


def write_report(results_dir: str | Path, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the page (default RESULTS/report.html) and return its path."""
    path = Path(out) if out else Path(results_dir) / "report.html"
    page = render_report(results_dir, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
