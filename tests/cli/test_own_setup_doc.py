"""docs/your-own-setup.md runs as written: its Python block saves a tiny Qwen2 checkpoint and a
jsonl set with string ids, and every `python` command of its first shell block (log, inspect,
score, report) succeeds on them in a fresh directory, the top result naming the query's topic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "your-own-setup.md"


def _blocks(kind: str) -> list[str]:
    return [body for k, body in re.findall(r"```(\w+)\n(.*?)```", DOC.read_text(), re.S) if k == kind]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_worked_example_runs_as_written(tmp_path):
    (tmp_path / "make.py").write_text(_blocks("python")[0])
    _run([sys.executable, "make.py"], tmp_path)
    commands = [line for line in _blocks("bash")[0].splitlines() if line.startswith("python ")]
    assert len(commands) == 4, commands  # log, inspect, score, report: the page's promise
    outputs = []
    for line in commands:
        args = line.split()[1:]
        if args[0].startswith("launch/"):
            args[0] = str(ROOT / args[0])
        outputs.append(_run([sys.executable, *args], tmp_path))
    score_out = outputs[2]
    listing = [json.loads(r) for r in (tmp_path / "runs/my-scores/topk.jsonl").read_text().splitlines()]
    top = next(r for r in listing if "results" in r)["results"][0]
    assert "comets" in top["text"], top  # the texts come back from my_train.jsonl, verified
    assert top["document"] == f"doc-{top['train_id']:03d}", top  # the record's own (string) id, kept
    assert f'| {top["train_id"]} ("{top["document"]}") |' in score_out.stdout
    assert (tmp_path / "runs/my-scores/report.html").is_file()
    manifest = json.loads((tmp_path / "runs/my-index/manifest.json").read_text())
    assert manifest["total_rows"] == 48
    assert (tmp_path / "runs/my-index/metrics.json").is_file()

    # the data moves: score lists no texts; report --data reads them from the new place, verified
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "my_train.jsonl").rename(moved / "my_train.jsonl")
    score = commands[2].split()[1:]
    score[0] = str(ROOT / score[0])
    out = _run([sys.executable, *score[:-3], "--out", "runs/moved-scores", "--no-wandb"], tmp_path)
    assert "training texts unavailable" in out.stdout
    report = [sys.executable, "-m", "logra_dist.cli", "report", "runs/moved-scores"]
    _run(report, tmp_path)
    assert top["text"] not in (tmp_path / "runs/moved-scores/report.html").read_text()
    _run([*report, "--data", str(moved / "my_train.jsonl")], tmp_path)
    assert top["text"] in (tmp_path / "runs/moved-scores/report.html").read_text()
    lines = (moved / "my_train.jsonl").read_text().splitlines()
    lines[top["train_id"]] = lines[top["train_id"]].replace("comets", "planets")
    (moved / "my_train.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*report, "--data", str(moved / "my_train.jsonl")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and f"sample {top['train_id']} " in proc.stderr and "differs" in proc.stderr, (
        proc.stderr
    )
