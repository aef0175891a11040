"""The benchmark harness itself: interleaving, target evaluation in the table, and that the GPU
script runs end to end on CPU with its tiny --smoke size (it must never need a GPU here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import interleaved, ratio  # noqa: E402
from report import render  # noqa: E402


def test_interleaved_rotates_order_blocks_calls_and_pairs_ratios():
    calls = []
    steps = {n: (lambda b, n=n: calls.append((n, b))) for n in ("a", "b", "c")}
    res = interleaved(steps, batches=[0, 1, 2, 3], reps=3, warmup=1, block=2)
    # warmup: one call each; then 3 rounds x 3 steps x block 2
    assert len(calls) == 3 + 3 * 3 * 2
    firsts = [calls[3 + r * 6][0] for r in range(3)]
    assert firsts == ["b", "c", "a"]  # the order rotates every round
    assert [c[1] for c in calls[3:5]] == [1, 2]  # a block walks through consecutive batches
    assert all(len(t) == 3 for t in res["times_s"].values())
    fake = {"times_s": {"x": [2.0, 3.0, 10.0], "ref": [1.0, 1.0, 2.0]}}
    r = ratio(fake, "x", "ref")
    assert r["ratio"] == 3.0 and r["min"] == 2.0 and r["max"] == 5.0


def _logging_result(floor_ratio, train_ratio):
    v = {
        "k": 16,
        "hessian": "kfac",
        "width_D": 3840,
        "vs_floor": {"ratio": floor_ratio, "min": floor_ratio, "max": floor_ratio},
        "vs_train": {"ratio": train_ratio},
    }
    model = {"name": "large", "parameters": 25e6, "batch_size": 4, "seq_len": 128}
    return {"models": {"large": {"model": model, "floor_vs_train": {"ratio": 0.7}, "variants": {"k16-kfac": v}}}}


def test_table_marks_targets_met_and_missed():
    met = render({"logging_speed": _logging_result(1.05, 0.75)})
    assert "1.05x" in met and "**missed**" not in met
    missed = render({"logging_speed": _logging_result(1.30, 0.9)})
    line = next(text for text in missed.splitlines() if "logging / floor" in text)
    assert "1.30x" in line and "**missed**" in line
    assert "pending" in render({})  # figures without results say so, never "met"
    assert "met" not in render({}).replace("measured", "")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_script_smoke_runs_on_cpu(tmp_path, dtype):
    """bfloat16 is the CUDA run's dtype: on CPU it walks the same dtype paths before a GPU does."""
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--device", "cpu", "--dtype", dtype]
    proc = subprocess.run(
        [*cmd, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dtype"] == dtype
    variants = res["figure1_logging"]["variants"]
    assert set(variants) == {"train", "floor"} | {f"k{k}-{h}" for k in (16, 64) for h in ("none", "kfac", "raw")}
    assert all(v["step_s"] > 0 for v in variants.values())
    assert [r["k"] for r in res["figure2_naive"]["results"]] == [16, 64]
    assert all(r["speedup"] > 0 for r in res["figure2_naive"]["results"])
    assert res["figure6_scorer"]["status"] in ("pending", "measured")


def test_checkpointing_bench_smoke_reports_every_variant(tmp_path):
    out = tmp_path / "ckpt.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "bench" / "checkpointing.py"), "--seq-len", "64", "--batch-size", "2"]
    proc = subprocess.run(
        [*cmd, "--steps", "1", "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["plain", "non-reentrant", "reentrant"]
    assert all(r["peak_increment_bytes"] > 0 and r["step_s_median"] > 0 for r in rows)
    assert rows[0]["peak_increment_vs_plain"] == 1.0


def test_wandb_receives_every_figure_and_the_target_table(tmp_path, monkeypatch):
    """`run.py --wandb`: the numeric leaves of results.json in the summary, the README rows as a
    table (read back from the offline run's log)."""
    from wandb_log import log_results, numeric_leaves, table_rows
    from wandb_offline import read_run

    results = {
        "machine": {"cpus": 2},
        "command": "bench/run.py",
        "quick": True,
        "logging_speed": _logging_result(1.30, 0.9),
        "storage": {
            "results": [
                {"ratio": 1.02, "k": 16, "storage_dtype": "float16", "hessian": "none", "samples": 64, "D": 3840}
            ]
        },
    }
    leaves = dict(numeric_leaves(results))
    assert leaves["logging_speed/models/large/variants/k16-kfac/vs_floor/ratio"] == 1.30
    assert leaves["storage/results/0/ratio"] == 1.02
    markdown = render(results)
    rows = table_rows(markdown)
    assert any(r[1].startswith("logging / floor") and r[5] == "**missed**" for r in rows)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = log_results(results, markdown)
    import wandb

    wandb.teardown()  # the service writes the run's log asynchronously: wait for it to exit
    run = read_run(Path(run_dir).parent)
    assert run["job_type"] == "bench" and run["config"]["machine"] == {"cpus": 2}
    assert run["summary"]["logging_speed/models/large/variants/k16-kfac/vs_floor/ratio"] == 1.30
    logged = next(row for row in run["history"] if row.get("targets/_type") == "table-file")
    assert logged["targets/nrows"] == len(rows) and logged["targets/ncols"] == 6
    table = json.loads((Path(run_dir) / logged["targets/path"]).read_text())
    assert table["columns"][5] == "status" and table["data"] == rows


def test_exclusive_timers_split_nested_phases_and_sum_to_wall():
    import time

    from phase_timers import ExclusiveTimers

    t = ExclusiveTimers()
    inner = t.wrap("inner", lambda: time.sleep(0.02))
    t0 = time.perf_counter()
    with t.phase("outer"):
        time.sleep(0.01)
        inner()
        inner()
    wall = time.perf_counter() - t0
    s = t.snapshot()
    assert t.calls == {"outer": 1, "inner": 2} and not t.stack
    assert s["inner"] >= 0.04 and 0.01 <= s["outer"] < 0.04  # outer excludes its nested calls (>= 0.05 if not)
    assert abs(s["inner"] + s["outer"] - wall) < 2e-3
