"""Observability on the embedded default job: the offline W&B run of `logra-dist log` holds
plausible figures, `--no-wandb` records nothing, `inspect` describes complete and partial
indexes, and `report` renders in headless Chromium with the queries and their top texts."""

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from wandb_offline import read_run

from logra_dist import LoGraConfig, attach
from logra_dist.cli.main import main
from logra_dist.embedded import load_corpus
from logra_dist.index.inspect import inspect_index, render
from logra_dist.index.partial import read_record, write_record
from logra_dist.tracking import NULL_TRACKER, Tracker, wandb_mode

N_TRAIN, N_QUERIES, BATCH = 64, 6, 8


# -- the tracker on its own ---------------------------------------------------------------------
def test_tracker_accumulates_phases_counts_sources_and_prints_progress():
    stream = io.StringIO()
    t = Tracker("unit", total=20, progress_interval_s=0.0, stream=stream, rank=0)
    for _ in range(2):
        with t.phase("sleep"):
            time.sleep(0.02)
        t.step(samples=10, tokens=100, bytes_written=4_000_000)
    t.add_time("write", 0.5)
    t.add_source(lambda: {"time/write": 0.5, "count/bytes_read": 1e6})
    f = t.figures()
    assert 0.04 <= f["time/sleep"] < 1.0 and f["time/write"] == 1.0
    assert f["count/samples"] == 20 and f["count/tokens"] == 200 and f["count/batches"] == 2
    assert f["rate/bytes_written_MBps"] == pytest.approx(8.0)  # 8e6 bytes over the 1.0 s write phase
    assert f["count/bytes_read"] == 1e6 and "rate/bytes_read_MBps" not in f  # no read time, no rate
    assert 0 < f["rate/samples_per_s"] <= 20 / f["time/sleep"] and f["memory/peak_rss_MiB"] > 10
    per_rank = t.finish()  # one process, no group: just this rank's figures
    assert len(per_rank) == 1 and per_rank[0]["count/samples"] == 20 and per_rank[0]["time/write"] == 1.0
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[logra-dist unit] 10/20 (50%) samples") and "20/20 (100%)" in lines[-4]
    assert lines[-3].startswith("[logra-dist unit] done: 20 samples, 200 tokens on 1 rank(s) in ")  # the summary
    assert "peak memory (MiB): r0 " in lines[-2] and "write " in lines[-1] and "sleep " in lines[-1]
    assert Tracker("quiet", rank=1, stream=stream)._progress is None  # only rank 0 reports progress
    with NULL_TRACKER.phase("x"):
        NULL_TRACKER.step(samples=1)
    assert NULL_TRACKER.figures() == {}


def test_wandb_mode_rules(tmp_path):
    no_netrc = {"NETRC": str(tmp_path / "none")}
    assert wandb_mode(env=no_netrc) == "offline"  # no key: never try the network
    assert wandb_mode(env={**no_netrc, "WANDB_API_KEY": "x" * 40}) == "online"
    assert wandb_mode(env={**no_netrc, "WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode(env={**no_netrc, "WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}) == "disabled"
    assert wandb_mode(no_wandb=True, env={**no_netrc, "WANDB_MODE": "online"}) == "disabled"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode(env={"NETRC": str(tmp_path / "netrc")}) == "online"  # `wandb login` done


# -- one logging + scoring job on the embedded default, shared by the tests below ----------------
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("obs")
    corpus = load_corpus()
    queries = root / "queries.jsonl"
    picks = [3, 17, 29, 40, 51, 60][:N_QUERIES]
    queries.write_text(
        "".join(
            json.dumps({"id": 500 + i, "prompt": corpus[j]["text"][:40], "completion": corpus[j]["text"][40:160]})
            + "\n"
            for i, j in enumerate(picks)
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(root))
        mp.delenv("WANDB_API_KEY", raising=False)
        assert (
            main(
                [
                    "log",
                    "--out",
                    str(root / "index"),
                    "--max-samples",
                    str(N_TRAIN),
                    "--batch-size",
                    str(BATCH),
                    "--log-every",
                    "2",
                    "--storage-dtype",
                    "float16",
                ]
            )
            == 0
        )
        runs_after_log = sorted((root / "wandb").glob("offline-run-*"))
        assert (
            main(
                [
                    "score",
                    "--index",
                    str(root / "index"),
                    "--queries",
                    str(queries),
                    "--topk",
                    "4",
                    "--out",
                    str(root / "results"),
                    "--no-wandb",
                ]
            )
            == 0
        )
    return {"root": root, "runs_after_log": runs_after_log, "corpus": corpus, "picks": picks}


def test_log_job_wandb_offline_run_has_plausible_figures(job):
    runs = sorted((job["root"] / "wandb").glob("offline-run-*"))
    assert len(job["runs_after_log"]) == 1 and runs == job["runs_after_log"]  # score ran with --no-wandb
    run = read_run(runs[0])
    assert run["job_type"] == "log"
    cfg = run["config"]
    assert cfg["logra"]["k_in"] == 16 and cfg["logra"]["storage_dtype"] == "float16"
    assert cfg["args"]["max_samples"] == N_TRAIN and cfg["world_size"] == 1 and "torch" in cfg["versions"]

    history = [row for row in run["history"] if "count/samples" in row]
    batches = N_TRAIN // BATCH
    assert [row["count/samples"] for row in history[: batches // 2]] == [
        2 * BATCH * (i + 1) for i in range(batches // 2)
    ]
    forward = [row["time/forward"] for row in history]
    assert all(b >= a for a, b in itertools.pairwise(forward)) and forward[0] > 0  # cumulative

    s = run["summary"]
    manifest = json.loads((job["root"] / "index" / "manifest.json").read_text())
    width = manifest["width"]
    assert s["count/samples"] == N_TRAIN and s["count/batches"] == batches and s["index/total_rows"] == N_TRAIN
    assert s["count/bytes_written"] == N_TRAIN * (width * 2 + 8)  # float16 rows + int64 ids
    corpus_tokens = s["count/tokens"]
    assert N_TRAIN * 10 < corpus_tokens <= N_TRAIN * 128  # --max-length 128
    phases = ["forward", "backward", "rows", "batch-end"]
    assert all(s[f"time/{p}"] > 0 for p in phases + ["write", "all-reduce", "eigh", "stats", "finalize"])
    assert s["time/eigh"] + s["time/stats"] <= s["time/finalize"]  # finalize's parts (logger.py)
    assert sum(s[f"time/{p}"] for p in phases) <= s["time/elapsed"]
    assert s["rate/samples_per_s"] == pytest.approx(N_TRAIN / s["time/elapsed"], rel=0.05)
    assert s["rate/tokens_per_s"] == pytest.approx(corpus_tokens / s["time/elapsed"], rel=0.05)
    assert s["rate/bytes_written_MBps"] > 0 and 100 < s["memory/peak_rss_MiB"] < 24 * 1024
    assert s["world_size"] == 1 and s["ranks/count/samples/max"] == N_TRAIN


# -- inspect --------------------------------------------------------------------------------------
def test_inspect_complete_index(job):
    facts = inspect_index(job["root"] / "index", sample_rows=16)
    assert facts["complete"] and facts["problems"] == []
    assert facts["rows_on_disk"] == facts["rows_in_manifest"] == N_TRAIN and facts["world_size"] == 1
    assert facts["storage_dtype"] == "float16" and len(facts["layout"]) == 15 == len(facts["layer_norms"])
    assert facts["sampled_rows"] == 16
    assert all(0 < layer["mean_norm"] <= layer["max_norm"] for layer in facts["layer_norms"])
    assert facts["shards"][0]["id_range"] == [0, N_TRAIN - 1] and facts["disk_bytes"] > N_TRAIN * facts["width"] * 2
    text = render(facts)
    assert "COMPLETE" in text and "model.layers.0.self_attn.q_proj" in text
    out = subprocess.run(
        [sys.executable, "-m", "logra_dist.cli", "inspect", "--json", str(job["root"] / "index")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert out.returncode == 0 and json.loads(out.stdout)["rows_on_disk"] == N_TRAIN


def test_inspect_partial_index_says_what_is_missing(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    logger = attach(model, LoGraConfig(k_in=2, k_out=2, flush_rows=4), tmp_path / "index", commit_seconds=0)
    for start in range(0, 10, 2):  # 10 rows; commits every 4 rows -> 8 committed
        x = torch.randn(2, 8)
        with logger.capture(torch.arange(start, start + 2)):
            logger.backward(model(x).pow(2).sum())
    logger.close()  # killed before finalize: the shard stays partial
    shard = tmp_path / "index" / "shards" / "rank-00000.partial"
    record = read_record(shard / "commit.npz")
    record.meta["world_size"] = 2  # as if rank 1 of a 2-rank job never wrote anything
    write_record(shard / "commit.npz", record)
    facts = inspect_index(tmp_path / "index")
    assert not facts["complete"]
    problems = "\n".join(facts["problems"])
    assert "manifest.json missing" in problems and "stats.h5 missing" in problems
    assert "rank-00000.partial: incomplete (10 rows on disk, 8 committed" in problems
    assert "no shard at all for rank(s) [1]" in problems
    assert facts["sampled_rows"] == 8 and len(facts["layer_norms"]) == 2  # committed rows only
    # a damaged partial shard is reported, not a crash
    shutil.copytree(shard, tmp_path / "index" / "shards" / "rank-00001.partial")
    (tmp_path / "index" / "shards" / "rank-00001.partial" / "commit.npz").write_bytes(b"PK\x03\x04 truncated")
    facts = inspect_index(tmp_path / "index")
    assert any("rank-00001.partial: unreadable" in p for p in facts["problems"])
    assert "INCOMPLETE" in render(facts) and "ERROR" in render(facts)


# -- report ---------------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120
        )


def test_report_renders_queries_and_their_top_training_texts(job, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/setup installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium); CI installs it")
    from PIL import Image

    from logra_dist.cli.report import write_report

    page = write_report(job["root"] / "results", tmp_path / "report.html")
    listing = [json.loads(line) for line in (job["root"] / "results" / "topk.jsonl").read_text().splitlines()]
    png = tmp_path / "report.png"
    shot = _chromium(f"--screenshot={png}", "--window-size=1200,1600", page.as_uri())
    assert png.exists(), shot.stderr[-2000:]
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image).astype(np.int32)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and pixels.std() > 20  # not blank
    assert np.abs(pixels[20, 600] - [0x1D, 0x23, 0x30]).max() < 8  # the dark header was styled
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    import html

    text = html.unescape(dom)
    for item in listing:
        assert item["query_text"][:60] in text  # every query's text
        for top in item["results"][:2]:
            assert top["text"][:60] in text  # and its top training texts
        assert f"Query #{item['query_id']}" in text
    assert "<svg" in dom and "score distribution" in dom and "<script" not in dom.lower()
    # the queries are training texts cut in two: each one's own document is its top-1
    assert [item["results"][0]["train_id"] for item in listing] == [job["corpus"][j]["id"] for j in job["picks"]]


def test_progress_estimates_all_ranks_from_rank_0s_share(monkeypatch):
    """No collective per batch: rank 0's count x world, marked '~'; the last line is exact."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # no process group: the launcher's variable
    stream = io.StringIO()
    t = Tracker("unit", total=5, progress_interval_s=0.0, stream=stream, rank=0)
    t.step(samples=3, tokens=30)
    assert stream.getvalue().splitlines()[0].startswith("[logra-dist unit] ~6/~10 (60%) samples on 2 ranks, ~")
    t.step(samples=2, tokens=20)
    t._progress.close(t, exact=9)  # what finish() passes: the gathered count of every rank
    assert stream.getvalue().splitlines()[-1].startswith("[logra-dist unit] 9/9 (100%) samples on 2 ranks, ")
