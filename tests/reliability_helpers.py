"""Shared pieces of the reliability tests: run fault workers as real processes, compare indexes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

import logra_dist as ld

ROOT = Path(__file__).resolve().parents[1]
FAULTS = ROOT / "tests" / "faults"
MLP_WORKER = FAULTS / "mlp_worker.py"
CLI_WORKER = FAULTS / "cli_worker.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))  # the venv's, whatever PATH says

sys.path.insert(0, str(FAULTS))
import mlp_worker  # noqa: E402


def env(fault: str | None = None, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOGRA_DIST_FAULT")}
    e.update(
        {
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "LOGRA_DIST_COMMIT_SECONDS": "0",
            "CUDA_VISIBLE_DEVICES": "",
            **extra,
        }
    )  # gloo even on a GPU machine: 2 ranks, 1 device
    if fault:
        e["LOGRA_DIST_FAULT"] = fault
    return e


def run_mlp(out: Path, *args: str, fault: str | None = None, timeout: float = 120, **extra: str):
    return subprocess.run(
        [sys.executable, str(MLP_WORKER), "--out", str(out), *args],
        env=env(fault, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, fault: str | None = None, timeout: float = 240, nproc: int = 2, **extra: str):
    cmd = [
        TORCHRUN,
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env(fault, **extra), capture_output=True, text=True, timeout=timeout)
    proc.elapsed = time.monotonic() - start
    return proc


def bare_ranks(
    script: Path, *args: str, fault: str | None = None, world: int = 2, **extra: str
) -> list[subprocess.Popen]:
    """`world` processes that form a gloo group themselves: no launcher to tear them down."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=env(
                fault,
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                **extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]


def mlp_args(out: Path, *args: str):
    return mlp_worker.parser().parse_args(["--out", str(out), *args])


# -- comparing indexes -----------------------------------------------------------------------------
def rows_by_id(index: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, their rows); asserts every id appears once."""
    with ld.GradientStore(index) as store:
        ids, rows = store.ids, store[:]
    assert len(np.unique(ids)) == len(ids), "an id was logged twice"
    order = np.argsort(ids)
    return ids[order], rows[order]


def fisher_matrices(index: Path) -> dict[str, np.ndarray]:
    """Per-layer F (or KFAC factors) rebuilt from stats.h5: V diag(e) V^T does not depend on the
    eigenvectors' signs or order, so it compares across runs that summed in another order."""
    out = {}
    with h5py.File(index / "stats.h5") as f:
        for name in f:
            g = f[name]
            for prefix in ("", "act_", "grad_"):
                if f"{prefix}evecs" in g:
                    v, e = g[f"{prefix}evecs"][()], g[f"{prefix}evals"][()]
                    out[f"{name}/{prefix}"] = (v * e) @ v.T
    return out


def assert_same_index(got: Path, want: Path, rtol: float = 1e-5, shards: bool = True) -> None:
    """Same ids (each once), same rows per id, same statistics up to float summation order;
    shards=True: also the same shards holding the same ids in the same order."""
    gi, gr = rows_by_id(got)
    wi, wr = rows_by_id(want)
    np.testing.assert_array_equal(gi, wi)
    np.testing.assert_allclose(gr, wr, rtol=rtol, atol=rtol * np.abs(wr).max())
    gf, wf = fisher_matrices(got), fisher_matrices(want)
    assert gf.keys() == wf.keys() and gf
    for key in wf:
        np.testing.assert_allclose(gf[key], wf[key], rtol=rtol, atol=rtol * np.abs(wf[key]).max(), err_msg=key)
    gm, wm = (json.loads((p / "manifest.json").read_text()) for p in (got, want))
    for key in ("total_rows", "samples_in_statistics", "nonfinite_total", "layout", "config"):
        assert gm[key] == wm[key], key
    with ld.GradientStore(got) as g, ld.GradientStore(want) as w:  # the same ids left out, in the shards
        assert sorted(g.nonfinite_ids().tolist()) == sorted(w.nonfinite_ids().tolist())
    if shards:
        assert [s["ids_digest"] for s in gm["shards"]] == [s["ids_digest"] for s in wm["shards"]]


def committed_rows(index: Path, rank: int = 0) -> int:
    with np.load(index / "shards" / f"rank-{rank:05d}.partial" / "commit.npz", allow_pickle=False) as z:
        return int(z["rows"])
