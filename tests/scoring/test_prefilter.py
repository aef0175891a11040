"""The bfloat16 prefilter of the exact scan (scoring/prefilter.py): its bound holds for the
GEMM it relies on, and with it the scan returns the lists of the plain float32 scan (the same
ids; scores to float32 rounding) while skipping rows: every mode, layer groups, bottom-k, near-ties, non-finite rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scorer_helpers import skipped_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from ann import queries, structured_rows

import logra_dist as ld
from logra_dist import LoGraConfig
from logra_dist.core.curvature import CURVATURES
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import stats_attrs, write_stats
from logra_dist.index.writer import write_index
from logra_dist.scoring import prefilter

GROUPS = {"first": r"layers\.0\.", "rest": r"layers\.[123]\."}


@pytest.mark.parametrize("width", [16, 256, 4096])
def test_bfloat16_gemm_error_is_within_the_bound(width):
    """Rows nearly orthogonal to the queries (the dot cancels: the relative error is largest) and
    norms over 12 orders of magnitude: |s~ - s| <= eps(K) ||q|| ||r|| everywhere, and the bound
    is not vacuous (the worst case uses a visible share of it)."""
    gen = torch.Generator().manual_seed(width)
    q = torch.randn(32, width, generator=gen, dtype=torch.float64)
    r = torch.randn(500, width, generator=gen, dtype=torch.float64)
    r[:250] -= (r[:250] @ q[0] / q[0].dot(q[0]))[:, None] * q[0]  # orthogonal to query 0
    q *= torch.logspace(-6, 6, 32, dtype=torch.float64)[:, None]
    exact = q @ r.T
    approx = (q.float().bfloat16() @ r.float().bfloat16().T).double()
    ratio = (approx - exact).abs() / (q.norm(dim=1)[:, None] * r.norm(dim=1)[None, :])
    assert float(ratio.max()) <= prefilter.eps(width)
    assert float(ratio.max()) > prefilter.eps(width) / 64


def write_rows(out: Path, rows: np.ndarray, shards: int = 2, fisher_rows: np.ndarray | None = None) -> None:
    """An index of these rows (4 layers of 16 x 16, float32) with the raw projected Fisher of
    `fisher_rows` (default: the rows)."""
    specs = [LayerSpec(f"model.layers.{i}.mlp", "linear", 64, 64, 16, 16) for i in range(4)]
    cfg = LoGraConfig(k_in=16, k_out=16, storage_dtype="float32", hessian="raw")
    acc = CURVATURES.get("raw")(specs, torch.float64)
    acc.update_rows(torch.from_numpy(rows if fisher_rows is None else fisher_rows).double())
    parts = np.array_split(np.arange(len(rows)), shards)
    blocks = [[(torch.from_numpy(p), torch.from_numpy(rows[p]))] for p in parts]
    manifest = write_index(out, specs, cfg.to_json(), blocks)
    state = acc.preconditioner(cfg.damping).state()
    write_stats(out / "stats.h5", "raw", cfg.damping, state, stats_attrs(manifest, acc.samples))


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """6000 structured rows (bench/ann.py: low rank, decaying spectrum, norm outliers), D = 1024;
    rows 0-39 repeat rows 40-79 (exact ties: the smaller id wins) and rows 80-89 are rows 90-99
    scaled by 1 + 1e-6 (near-ties a loose filter would get wrong)."""
    x = structured_rows(6000, 1024, 0, np.random.default_rng(1))
    x[0:40] = x[40:80]
    x[80:90] = x[90:100] * np.float32(1 + 1e-6)
    return x


def scan(index: Path, q: np.ndarray, mode: str, monkeypatch, on: str, dtype=torch.float32, **kw):
    monkeypatch.setenv(prefilter.ENV, on)
    sc = ld.Scorer(None, index, mode=mode, dtype=dtype)
    sc.add_query_gradients(q, np.arange(len(q)))
    try:
        return sc.topk(10, groups=GROUPS, bottomk=5, **kw)
    finally:
        sc.close()


def assert_same(a, b, what: str) -> None:
    for name, x, y in [("total", a, b), *((g, a.groups[g], b.groups[g]) for g in GROUPS)]:
        for side, u, v in [("top", x, y), ("bottom", x.bottom, y.bottom)]:
            np.testing.assert_array_equal(u.train_ids, v.train_ids, err_msg=f"{what} {name} {side}")
            # the exact scores of kept rows come from a GEMM over fewer columns: float32 rounding apart
            np.testing.assert_allclose(u.scores, v.scores, rtol=2e-6, atol=0, err_msg=f"{what} {name} {side}")


@pytest.mark.parametrize(
    ("mode", "dtype"), [("dot", "float32"), ("relatif", "float32"), ("cosine", "float32"), ("relatif", "float64")]
)
def test_prefiltered_scan_is_the_plain_scan(tmp_path, rows, mode, dtype, monkeypatch):
    """Queries include copies of tied rows (their lists hold the ties), thresholds refreshed every
    256-row chunk; rows are skipped, and the lists are the plain scan's (ids exactly, scores to
    float32 rounding)."""
    write_rows(tmp_path / "index", rows)
    q = np.concatenate([queries(13, 1024, seed=3), rows[[40, 95]]])
    dtype = getattr(torch, dtype)  # float64: scores and thresholds compared in float64
    plain = scan(tmp_path / "index", q, mode, monkeypatch, "0", dtype)
    monkeypatch.setattr(ld.scoring.scan, "REFRESH_ROWS", 256)
    monkeypatch.setattr(ld.scoring.scan, "PREFILTER_CHUNK_ROWS", 256)
    skipped = skipped_rows(monkeypatch)
    fast = scan(tmp_path / "index", q, mode, monkeypatch, "1", dtype)
    assert_same(fast, plain, mode)
    # dot: norm outliers set the lists and most rows are skipped at once; relatif and cosine
    # divide the norms away, so at 6000 rows only a few percent fall below the bounds (at 1M rows:
    # 97%, bench/results/prefilter.json)
    assert sum(skipped) > (0.5 if mode == "dot" else 0.02) * len(rows), skipped
    assert set(plain.train_ids[13]) >= {0, 40}  # the tie is in the list: both copies, smaller id first
    assert list(plain.train_ids[13]).index(0) < list(plain.train_ids[13]).index(40)


def test_non_finite_rows_are_never_skipped(tmp_path, rows, monkeypatch):
    """A NaN row ranks first in the plain scan (the index is corrupt: the Scorer shows it, never
    hides it); it must do so with the prefilter too."""
    x = rows.copy()
    x[3000, 7] = np.nan
    write_rows(tmp_path / "index", x, fisher_rows=rows)  # a corrupt row, not a corrupt Fisher
    q = queries(4, 1024, seed=5)
    monkeypatch.setattr(ld.scoring.scan, "REFRESH_ROWS", 256)
    monkeypatch.setattr(ld.scoring.scan, "PREFILTER_CHUNK_ROWS", 256)
    plain = scan(tmp_path / "index", q, "dot", monkeypatch, "0")
    fast = scan(tmp_path / "index", q, "dot", monkeypatch, "1")
    np.testing.assert_array_equal(fast.train_ids, plain.train_ids)
    assert (plain.train_ids == 3000).any()


def test_enabled_follows_the_setting_and_the_measured_thresholds(monkeypatch):
    """ENV "0" never, "1" always (the GEMM being sound); unset: the CPU flag and `worthwhile`."""
    monkeypatch.setenv(prefilter.ENV, "0")
    assert not prefilter.enabled(64, 10, 10**6)
    monkeypatch.setenv(prefilter.ENV, "1")
    assert prefilter.enabled(1, 10**6, 10)
    monkeypatch.delenv(prefilter.ENV)
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert prefilter.enabled(64, 10, 10**6) == fast
    assert not prefilter.enabled(prefilter.MIN_QUERIES - 1, 10, 10**6)
    assert not prefilter.enabled(64, 1000, 999_999) and prefilter.enabled(64, 1000, 10**6) == fast
