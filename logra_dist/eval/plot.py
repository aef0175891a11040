"""LDS against the storage dimension D per method family, as a standalone SVG (no plotting library).

A family is a method name with its rank/dimension token (`-k32`, `-D960`) removed, so
`logra-random-k4-dot-c1` ... `logra-random-k32-dot-c1` form one line. D is on a log axis; each
point carries its bootstrap 95% CI over queries as a vertical bar. Same hand-written SVG style as
the score histogram of `logra_dist.cli.report` (fixed palette, plain text labels).
"""

from __future__ import annotations

import math
import re
from typing import Any

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
_DIM = re.compile(r"-(k|D)\d+")


def families(methods: dict[str, Any]) -> dict[str, list[tuple[int, float, float, float]]]:
    """family -> [(D, LDS mean, CI low, CI high)] sorted by D, for families with 2+ dimensions."""
    out: dict[str, list[tuple[int, float, float, float]]] = {}
    for name, e in methods.items():
        v, d = e.get("lds"), e.get("storage_per_example", 0)
        if not v or not d or not _DIM.search(name) or v["mean"] != v["mean"]:
            continue
        out.setdefault(_DIM.sub("", name, count=1), []).append((int(d), v["mean"], *v["ci95"]))
    return {f: sorted(p) for f, p in out.items() if len({d for d, *_ in p}) >= 2}


def lds_vs_dim_svg(methods: dict[str, Any], title: str, width: int = 760, height: int = 420) -> str:
    fam = families(methods)
    left, right, top, bottom = 60, 250, 30, 50
    pw, ph = width - left - right, height - top - bottom
    pts = [p for ps in fam.values() for p in ps]
    if not pts:
        head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40">'
        return head + '<text x="10" y="25">no data</text></svg>'
    dmin, dmax = min(p[0] for p in pts), max(p[0] for p in pts)
    lo = min(min(p[2] for p in pts), 0.0)
    hi = max(max(p[3] for p in pts), 0.1)
    lx0, lx1 = math.log10(dmin) - 0.1, math.log10(dmax) + 0.1

    def x(d: float) -> float:
        return left + pw * (math.log10(d) - lx0) / (lx1 - lx0)

    def y(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    s = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="11">',
        f'<text x="{left}" y="18" font-size="13">{title}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>',
    ]
    step = 0.1 if hi - lo <= 0.6 else 0.2
    t = math.ceil(lo / step) * step
    while t <= hi + 1e-9:
        s.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
        s.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{t:.1f}</text>')
        t += step
    for d in sorted({p[0] for p in pts}):
        s.append(f'<text x="{x(d):.1f}" y="{top + ph + 16}" text-anchor="middle">{d}</text>')
    s.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">D (numbers stored per example)</text>')
    s.append(f'<text x="14" y="{top + ph / 2}" transform="rotate(-90 14 {top + ph / 2})">LDS (mean, 95% CI)</text>')
    for i, (f, ps) in enumerate(sorted(fam.items())):
        c = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{x(d):.1f},{y(v):.1f}" for j, (d, v, _, _) in enumerate(ps))
        s.append(f'<path d="{path}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for d, v, a, b in ps:
            s.append(f'<line x1="{x(d):.1f}" x2="{x(d):.1f}" y1="{y(a):.1f}" y2="{y(b):.1f}" stroke="{c}"/>')
            s.append(f'<circle cx="{x(d):.1f}" cy="{y(v):.1f}" r="3" fill="{c}"/>')
        ly = top + 12 + 16 * i
        s.append(f'<line x1="{left + pw + 10}" x2="{left + pw + 28}" y1="{ly - 4}" y2="{ly - 4}" stroke="{c}"/>')
        s.append(f'<text x="{left + pw + 32}" y="{ly}">{f}</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


__all__ = ["families", "lds_vs_dim_svg"]
