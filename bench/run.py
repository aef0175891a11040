"""All CPU benchmarks in one command; writes JSON per figure, results.json and README-table.md.

    python bench/run.py --out bench/results            # full (< 20 min on 2 cores)
    python bench/run.py --out /tmp/bench --quick       # a few minutes

Figures: 1 logging step vs train step and floor (+ profile), 2 naive per-sample baseline,
3 LogIX (in bench/.bench-venv, created by bench/setup_logix.sh when missing, skip with
--no-logix; seconds: layered on the product venv), 4 writes on/off, 5 distributed (ZeRO-3 vs
1 process, with where the time goes),
6 scorer throughput (bench/scorer_throughput.py when present), 7 storage, 8 memory,
9 GPU (bench/gpu.py, not run here). One failing figure is recorded and the others still run;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
_USER_WANDB_MODE = os.environ.get("WANDB_MODE")  # what --wandb restores (unset: online with a key, else offline)
os.environ.setdefault("WANDB_MODE", "disabled")  # no figure's own jobs talk to W&B

import torch  # noqa: E402
from common import ROOT, machine, write_json  # noqa: E402
from report import render  # noqa: E402

LOGIX_VENV = HERE / ".bench-venv"


def _logix(quick: bool, out: Path, setup: bool) -> dict[str, Any]:
    py = LOGIX_VENV / "bin" / "python"
    setup_s = 0.0
    if not py.exists():
        if not setup:
            return {"status": "pending", "reason": "no bench/.bench-venv: run `bash bench/setup_logix.sh`"}
        t0 = time.perf_counter()  # layered on this interpreter's venv: only logix-ai is installed
        subprocess.run(
            ["bash", str(HERE / "setup_logix.sh")],
            check=True,
            cwd=ROOT,
            env={**os.environ, "LOGRA_PRODUCT_PYTHON": sys.executable},
        )
        setup_s = time.perf_counter() - t0
    target = out / "logix.json"
    cmd = [str(py), str(HERE / "logix_compare.py"), "--out", str(target)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"logix_compare.py failed:\n{proc.stderr[-4000:]}")
    import json

    return {"status": "measured", "venv_setup_s": setup_s, **json.loads(target.read_text())}


def _scorer(quick: bool, out: Path) -> dict[str, Any]:
    script = HERE / "scorer_throughput.py"
    if not script.exists():
        return {"status": "pending", "reason": "bench/scorer_throughput.py (branch `scorer`) not merged yet"}
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="logra-bench-scorer-") as index:
        cmd = [
            sys.executable,
            str(script),
            "--out",
            str(Path(index) / "index"),
            "--rows",
            "20000" if quick else "100000",
            "--rounds",
            "2" if quick else "4",
        ]
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
    if proc.returncode != 0:
        raise RuntimeError(f"scorer_throughput.py failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout)
    (out / "scorer_throughput.json").write_text(json.dumps(result, indent=2))
    return {"status": "measured", **result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--quick", action="store_true", help="fewer rounds and sizes (a few minutes)")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["logging", "naive", "logix", "distributed", "scorer", "storage", "memory"],
    )
    ap.add_argument("--no-logix", action="store_true", help="do not create bench/.bench-venv if missing")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument(
        "--wandb",
        action="store_true",
        help="send the figures and the target table to W&B (online with an API key, else offline)",
    )
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    if a.only and (out / "results.json").exists():  # update some figures of an earlier run
        import json

        results = json.loads((out / "results.json").read_text())
        results.setdefault("partial_reruns", []).append({"only": a.only, "machine": machine()})
    else:
        results.update({"machine": machine(), "quick": a.quick, "command": " ".join(sys.argv)})

    import distributed_overhead
    import logging_speed
    import memory
    import naive_baseline
    import storage

    figures: dict[str, Callable[[], dict[str, Any]]] = {
        "logging": lambda: logging_speed.run(a.quick, out),
        "naive": lambda: naive_baseline.run(a.quick),
        "logix": lambda: _logix(a.quick, out, not a.no_logix),
        "distributed": lambda: distributed_overhead.run(a.quick),
        "scorer": lambda: _scorer(a.quick, out),
        "storage": lambda: storage.run(a.quick),
        "memory": lambda: memory.run(a.quick),
    }
    keys = {
        "logging": "logging_speed",
        "naive": "naive_baseline",
        "logix": "logix",
        "distributed": "distributed",
        "scorer": "scorer",
        "storage": "storage",
        "memory": "memory",
    }
    failed = []
    for name, fn in figures.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            results[keys[name]] = fn()
        except Exception as e:  # recorded; the other figures still run
            failed.append(name)
            results[keys[name]] = {"status": "failed", "error": repr(e), "traceback": traceback.format_exc()[-4000:]}
        results[keys[name]]["wall_s"] = time.perf_counter() - t0
        print(f"[bench] {name}: {results[keys[name]]['wall_s']:.0f} s", flush=True)
        write_json(out / f"{keys[name]}.json", results[keys[name]])
    results["gpu"] = {"status": "not run", "reason": "needs CUDA: python bench/gpu.py --out bench/results/gpu.json"}
    if (out / "gpu.json").exists():
        results["gpu"] = {"status": "measured (see gpu.json)"}
    if a.only and results.get("partial_reruns"):
        results["partial_reruns"][-1]["wall_s"] = time.perf_counter() - t_start
    else:
        results["wall_s"] = time.perf_counter() - t_start
    write_json(out / "results.json", results)
    (out / "README-table.md").write_text(render(results))
    print((out / "README-table.md").read_text())
    if a.wandb:
        from wandb_log import log_results

        if _USER_WANDB_MODE is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = _USER_WANDB_MODE
        print(f"[bench] W&B run: {log_results(results, render(results))}", flush=True)
    if failed:
        print(f"[bench] FAILED figures: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
