"""Markdown tables (for the README) from the JSON results, with the targets checked plainly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from logra_dist.eval.metrics import bootstrap_ci

ORDER = ("digits", "lm", "synthetic")


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _lds_cell(entry: dict[str, Any], key: str = "lds") -> str:
    v = entry.get(key)
    if not v:
        return ""
    return f"{_f(v['mean'])} ± {_f(v['std'], 2)} [{_f(v['ci95'][0])}, {_f(v['ci95'][1])}]"


def _brittle_cells(entry: dict[str, Any]) -> list[str]:
    b = entry.get("brittleness")
    if not b:
        return ["", "", "", ""]
    return [
        f"{_f(b['delta_top_mean'], 4)} ± {_f(b['delta_top_std'], 4)}",
        f"{_f(b['diff_mean'], 4)} [{_f(b['diff_ci95'][0], 4)}, {_f(b['diff_ci95'][1], 4)}]",
        _ratio(b),
        f"{b['win_rate']:.0%}",
    ]


def _ratio(b: dict[str, Any]) -> str:
    if b["ratio_of_means"] is None:
        return "unbounded (random Δ ≤ 0)"
    ci = b["ratio_ci95"]
    if not ci:
        return f"{_f(b['ratio_of_means'], 2)} [CI unbounded]"
    return f"{_f(b['ratio_of_means'], 2)} [{_f(ci[0], 2)}, {'∞' if ci[1] is None else _f(ci[1], 2)}]"


def _hessian(m: dict[str, Any], cost: dict[str, Any] | None = None) -> str:
    if m["family"] == "random":
        return "none (Gaussian random scores: the floor)"
    if m["family"] == "peer":
        used = (cost or {}).get("damping_used")
        d = "default" if m["damping"] is None else f"{m['damping']:g}"
        return f"{m['peer']} (damping {d}{'' if used is None else f' = {used}'})"
    raw = {"full": "full Fisher", "dense": "projected Fisher (D x D)"}.get(m["family"], "projected Fisher")
    h = {"raw": raw, "kfac": "KFAC", "ekfac": "EKFAC", "none": "none"}[m["hessian"]]
    if m["hessian"] != "none":
        h += f" ({m['fisher']}, c={m['damping']:g})"
    if m.get("optimizer"):
        h += " + Adam normalization"
    return h


def _cost_cells(entry: dict[str, Any]) -> list[str]:
    c = entry.get("cost") or {}
    if "logging_vs_floor" in c:
        return [f"{c['logging_vs_floor']:.2f}x", f"{c['finalize_seconds']:.1f}"]
    if "fit_seconds" in c:  # peers: their own fit (factors / features) and scoring
        return [f"fit {c['fit_seconds']:.0f} s", f"score {c.get('score_seconds', float('nan')):.0f} s"]
    return ["", ""]


def _targets(res: dict[str, Any]) -> list[str]:
    meth = res["methods"]
    lines = []
    if res["benchmark"] in ("digits", "synthetic"):

        def mean(name):
            return meth[name]["lds"]["mean"] if name in meth and "lds" in meth[name] else float("nan")

        ks = sorted(
            {
                m["method"]["k"]
                for m in meth.values()
                if m["method"]["family"] == "logra" and m["method"]["init"] != "identity"
            }
        )
        for k in (k for k in ks if f"logra-random-k{k}" in meth):  # the rank sweep's ranks
            d = 3 * k * k
            for init in ("random", "pca"):
                ours = mean(f"logra-{init}-k{k}")
                rivals = {n: mean(n) for n in (f"graddot-k{k}", f"dense-D{d}", f"dense-fisher-D{d}")}
                verdict = "yes" if all(ours > v for v in rivals.values()) else "NO"
                lines.append(
                    f"- D={d}: LoGra {init} + projected Fisher LDS {_f(ours)} vs "
                    + ", ".join(f"{n} {_f(v)}" for n, v in rivals.items())
                    + f": beats all? **{verdict}**"
                )
            pca, rnd = mean(f"logra-pca-k{k}"), mean(f"logra-random-k{k}")
            lines.append(
                f"- D={d}: PCA {_f(pca)} vs random {_f(rnd)}: PCA at least as accurate? "
                f"**{'yes' if pca >= rnd else 'NO'}**"
            )
    lines += _peer_targets(meth)
    for name, m in meth.items():
        b = m.get("brittleness")
        if b and res["benchmark"] == "lm":
            clear = b["diff_ci95"][0] > 0 and b["win_rate"] > 0.5
            lines.append(
                f"- {name}: removing the top-{res['plan']['brittle_k']} raises the query loss by "
                f"{_f(b['delta_top_mean'], 4)} vs {_f(b['delta_random_mean'], 4)} for random removal "
                f"(difference 95% CI [{_f(b['diff_ci95'][0], 4)}, {_f(b['diff_ci95'][1], 4)}]; ratio "
                f"{_ratio(b)}; wins on {b['win_rate']:.0%} of queries): clearly more? "
                f"**{'yes' if clear else 'NO'}**"
            )
    return lines


def _per_query(entry: dict[str, Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in entry["lds"]["per_query"]], dtype=np.float64)


def _peer_slots(meth: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per peer recipe (and dimension): the name of its row at its own default damping and of its
    best row over the sweep (tuned on the test queries)."""

    def mean(name):
        return meth[name]["lds"]["mean"]

    slots: dict[str, dict[str, str]] = {}
    for name, e in meth.items():
        m = e["method"]
        if "lds" not in e or not (m["family"] == "peer" or name.startswith("trackstar")):
            continue
        recipe = m["peer"] if m["family"] == "peer" else f"trackstar-k{m['k']}"
        if m["family"] == "peer" and m["dim"]:
            recipe += f"-D{m['dim']}"
        slot = slots.setdefault(recipe, {})
        if (m["damping"] is None) if m["family"] == "peer" else name == recipe:  # trackstar-k32: no Hessian
            slot["default"] = name
        if "best" not in slot or mean(name) > mean(slot["best"]):
            slot["best"] = name
    return slots


def _versus(meth: dict[str, Any], ours: str, rivals: list[str]) -> str:
    """Ours against every rival in the mean, and against the strongest one paired over queries
    (bootstrap 95% CI of the per-query difference): "yes" only when that interval is above 0."""
    top = max(rivals, key=lambda n: meth[n]["lds"]["mean"])
    diff = _per_query(meth[ours]) - _per_query(meth[top])
    lo, hi = bootstrap_ci(diff)
    mean_ok = all(meth[ours]["lds"]["mean"] > meth[n]["lds"]["mean"] for n in rivals)
    verdict = "yes" if mean_ok and lo > 0 else ("in the mean only (the interval reaches 0)" if mean_ok else "NO")
    return (
        f"{ours} LDS {_f(meth[ours]['lds']['mean'])} vs the strongest, {top} {_f(meth[top]['lds']['mean'])}: "
        f"{np.nanmean(diff):+.3f} [{lo:+.3f}, {hi:+.3f}] paired; beats all? **{verdict}**"
    )


def _peer_targets(meth: dict[str, Any], k: int = 32) -> list[str]:
    """Issue 14's statements on either benchmark: the defaults at k (both scoring modes) vs every
    peer at its default; the accurate preset at its own damping, and over the damping sweep (tuned
    on the test queries, as the peers' best), vs every peer tuned (at any dimension)."""
    slots = _peer_slots(meth)
    if not slots:
        return []
    defaults = [s["default"] for s in slots.values() if "default" in s]
    tuned = [s["best"] for s in slots.values()]
    lines = []
    for mode in ("relatif", "dot"):
        if f"preset-fast-k{k}-{mode}" in meth:
            lines.append(f"- defaults, {mode}: " + _versus(meth, f"preset-fast-k{k}-{mode}", defaults))
    for mode in ("relatif", "dot"):
        if f"preset-accurate-k{k}-{mode}" in meth:
            lines.append(f"- accurate preset, {mode}: " + _versus(meth, f"preset-accurate-k{k}-{mode}", tuned))
    sweep = [n for n in meth if n.startswith(f"preset-accurate-k{k}-dot") and "lds" in meth[n]]
    if len(sweep) > 1:
        best = max(sweep, key=lambda n: meth[n]["lds"]["mean"])
        lines.append("- accurate preset, dot, damping tuned on the test queries: " + _versus(meth, best, tuned))
    return lines


def section(res: dict[str, Any]) -> str:
    p, t = res["plan"], res["task"]
    title = f"### {res['benchmark']}{' (fast)' if res['fast'] else ''}"
    if res.get("smaller"):
        title += " (SMALLER plan than the full one: see the notes)"
    out = [
        title,
        "",
        f"Command: `{res['command']}`  ",
        f"Task: {t['name']}, {t['n_train']} training examples, "
        f"recipe `{json.dumps({k: v for k, v in t['recipe'].items() if 'sha' not in k}, sort_keys=True)}`  ",
    ]
    if p["lds_subsets"]:
        out.append(
            f"LDS: {p['lds_subsets']} subsets of {p['lds_fraction']:.0%} (subset seed {p['subset_seed']}), "
            f"retrained with seeds {p['lds_seeds']}, {p['lds_queries']} queries; mean ± std over queries "
            "[bootstrap 95% CI of the mean].  "
        )
        c = res.get("retrain_consistency")
        if c:
            out.append(
                f"Retraining noise: Spearman between two seeds' query losses over the subsets = "
                f"{_f(c['mean'])} (a single-seed ceiling for LDS).  "
            )
    if p["brittle_queries"]:
        out.append(
            f"Brittleness: top-{p['brittle_k']} removed per query, {p['brittle_queries']} queries, seeds "
            f"{p['brittle_seeds']}; Δ = query loss after removal − full-data loss (seed means); ratio = mean Δ "
            f"top-k / mean Δ random (bootstrap 95% CI over queries, unbounded when the resampled random mean "
            "reaches 0); win = share of queries where top-k beats random.  "
        )
        rnd = next((m["brittleness"] for m in res["methods"].values() if "brittleness" in m), None)
        if rnd:
            out.append(f"Random removal: Δ = {_f(rnd['delta_random_mean'], 4)} ± {_f(rnd['delta_random_std'], 4)}.  ")
    for note in p.get("notes", []):
        out.append(f"Note: {note}.  ")
    out.append(
        f"Time of this run: {res['timing_seconds']['total']:.0f} s "
        f"(retraining {res['timing_seconds']['retraining']:.0f} s, "
        f"cache {res['cache']['hits']} hits / {res['cache']['misses']} misses)."
    )
    out.append("")
    has_lds = bool(p["lds_subsets"])
    head = (
        ["method", "D", "Hessian", "mode", "log step / floor", "finalize s"]
        + (["LDS (loss)", "LDS (margin)"] if has_lds else [])
        + ["Δ loss top-k", "Δ top-k − Δ random [95% CI]", "ratio vs random", "win"]
    )
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in res["methods"].items():
        md = m["method"]
        row = [name, str(m["storage_per_example"]), _hessian(md, m.get("cost")), md["mode"], *_cost_cells(m)]
        if has_lds:
            row += [_lds_cell(m), _lds_cell(m, "lds_margin")]
        out.append("| " + " | ".join(row + _brittle_cells(m)) + " |")
    targets = _targets(res)
    if targets:
        out += ["", "Targets:", *targets]
    return "\n".join(out) + "\n"


def write_markdown(out_dir: str | Path, path: str | Path) -> str:
    files = sorted(
        Path(out_dir).glob("*.json"),
        key=lambda f: (
            f.stem.endswith("-fast"),
            ORDER.index(f.stem.split("-")[0]) if f.stem.split("-")[0] in ORDER else 99,
        ),
    )
    parts = [
        "## Accuracy: counterfactual evaluation",
        "",
        "Generated by `python -m logra_dist.eval` (see docs/evaluation.md). Sign convention: a positive "
        "score means the training example lowers the query's loss; LDS is the Spearman correlation between "
        "the summed scores of a training subset and the NEGATIVE query loss after retraining on it.",
        "",
    ]
    parts += [section(json.loads(f.read_text())) for f in files]
    text = "\n".join(parts)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text
