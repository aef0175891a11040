"""The command line end to end under DeepSpeed ZeRO-3 on 2 ranks, against one process.

Four launches of 2 ranks, each with a timeout: `launch/log.py` (deepspeed, ZeRO-3) logs the first
40 samples of the embedded corpus; `launch/score.py` (deepspeed, ZeRO-3) scores the example
queries against it; query_worker.py captures query gradients and greedy completions with the
model sharded by ZeRO-3 (deepspeed), then by FSDP2 and FSDP1 (one torchrun job). Everything else
runs in this process, on one rank: the same `score` command on the same index (top-k must
match), `score --query-index` (no model loaded), `score --prompts`, and the single-process
reference of the query worker (issue 4: query gradients under ZeRO-3 equal one process's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import query_worker as qw
import torch
from jobs import REPO, deepspeed_cmd, free_port, run_job

from logra_dist import GradientStore
from logra_dist.cli.main import main

pytestmark = pytest.mark.distributed
N, K = 40, 5
QUERIES = REPO / "launch" / "example_queries.jsonl"
ZERO3 = REPO / "configs" / "zero3.json"
WORKER = REPO / "tests" / "distributed" / "query_worker.py"


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a busy 2-core runner are far slower than 1
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory, one_thread) -> Path:
    from logra_dist.embedded import ensure_default_model

    ensure_default_model()  # trained (once per machine) here, not by the ranks
    root = tmp_path_factory.mktemp("cli-zero3")
    seconds = {
        "log": run_job(
            deepspeed_cmd(
                REPO / "launch" / "log.py",
                "--config",
                ZERO3,
                "--max-samples",
                N,
                "--batch-size",
                8,
                "--out",
                root / "index",
                "--no-wandb",
            ),
            root / "log.txt",
        ),
        "score": run_job(
            deepspeed_cmd(
                REPO / "launch" / "score.py",
                "--config",
                ZERO3,
                "--index",
                root / "index",
                "--queries",
                QUERIES,
                "--topk",
                K,
                "--out",
                root / "zero3",
                "--no-wandb",
            ),
            root / "score.txt",
        ),
        "query_worker": run_job(
            deepspeed_cmd(WORKER, "--index", root / "index", "--out", root / "worker"), root / "worker.txt"
        ),
        "query_worker_fsdp": run_job(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(free_port()),
                str(WORKER),
                "--index",
                str(root / "index"),
                "--out",
                str(root / "worker"),
                "--configs",
                "fsdp2,fsdp1",
            ],
            root / "worker-fsdp.txt",
        ),
    }
    (root / "seconds.json").write_text(json.dumps(seconds))
    return root


def read_topk(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path / "topk.h5") as f:
        return {
            "query_ids": f["query_ids"][:],
            "train_ids": f["train_ids"][:],
            "scores": f["scores"][:],
            "world_size": int(f.attrs["world_size"]),
            "mode": str(f.attrs["mode"]),
        }


def listing(path: Path) -> dict[int, dict]:
    return {rec["query_id"]: rec for rec in map(json.loads, (path / "topk.jsonl").read_text().splitlines())}


def assert_same_topk(got: dict, ref: dict, rtol: float, what: str) -> None:
    np.testing.assert_array_equal(got["query_ids"], ref["query_ids"], err_msg=what)
    """Same ranking, scores within rtol of the largest score."""
    atol = rtol * np.abs(ref["scores"]).max()
    # ids must be equal; that is a fair demand only if no two ranked scores lie within the tolerance
    assert (-np.diff(ref["scores"], axis=1) > 2 * atol).all(), f"{what}: near-tie in the test data"
    np.testing.assert_array_equal(got["train_ids"], ref["train_ids"], err_msg=what)
    np.testing.assert_allclose(got["scores"], ref["scores"], rtol=0, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def single(root) -> Path:
    """`score` on one process, no engine config, on the index ZeRO-3 logged."""
    assert (
        main(
            [
                "score",
                "--index",
                str(root / "index"),
                "--queries",
                str(QUERIES),
                "--topk",
                str(K),
                "--out",
                str(root / "single"),
                "--no-wandb",
            ]
        )
        == 0
    )
    return root / "single"


def test_cli_log_under_zero3_logs_every_sample_once(root):
    manifest = json.loads((root / "index" / "manifest.json").read_text())
    assert manifest["engine"] == "deepspeed-zero3" and manifest["world_size"] == 2
    assert [s["rows"] for s in manifest["shards"]] == [N // 2, N // 2]
    with GradientStore(root / "index") as store:
        assert sorted(store.ids.tolist()) == list(range(N))


def test_cli_log_under_zero3_records_the_data_of_one_process(root):
    """Each rank read and digested only its share; the summed identity and the per-rank sample
    tables equal one process's plan of the same data."""
    from logra_dist.cli.jobs import bundled_items
    from logra_dist.data import DataSpec, RankShare
    from logra_dist.data.table import SampleTable
    from logra_dist.embedded import build_tokenizer

    manifest = json.loads((root / "index" / "manifest.json").read_text())
    plan = RankShare(DataSpec(None, 128, N), build_tokenizer(), 0, 1, bundled_items()).plan()
    assert manifest["data"]["samples"] == plan.samples == N
    assert manifest["data"]["digest"] == f"{plan.digest:016x}"
    table = SampleTable(root / "index")
    assert table.sample_id.tolist() == list(plan.table.sample_id)
    assert table.digest.tolist() == list(plan.table.digest)
    assert manifest["metadata"]["data_report"]["documents"] == N


def test_cli_score_under_zero3_equals_one_process(root, single):
    zero3, ref = read_topk(root / "zero3"), read_topk(single)
    assert (zero3["world_size"], ref["world_size"]) == (2, 1) and zero3["mode"] == ref["mode"] == "relatif"
    assert zero3["train_ids"].shape == (4, K)
    assert_same_topk(zero3, ref, 1e-5, "score: ZeRO-3 on 2 ranks vs one process")  # measured: 2.7e-7
    got, expected = listing(root / "zero3"), listing(single)
    assert got.keys() == expected.keys() == {0, 1, 2, 3}
    for qid, rec in got.items():
        assert rec["query_text"] == expected[qid]["query_text"] and rec["query_text"]
        assert [r["text"] for r in rec["results"]] == [r["text"] for r in expected[qid]["results"]]


def test_score_query_index_needs_no_model(root, single, monkeypatch, tmp_path):
    """`log --data QUERIES --logra INDEX` builds the query index; `score --query-index` scores it
    without ever loading a model, and ranks as scoring the query texts with the model does."""
    assert (
        main(
            [
                "log",
                "--data",
                str(QUERIES),
                "--logra",
                str(root / "index"),
                "--out",
                str(tmp_path / "qidx"),
                "--no-wandb",
            ]
        )
        == 0
    )

    def no_model(*_args, **_kwargs):
        raise AssertionError("score --query-index loaded a model")

    monkeypatch.setattr("logra_dist.cli.jobs.load_engine", no_model)
    monkeypatch.setattr("logra_dist.cli.sources.load_engine", no_model)
    assert (
        main(
            [
                "score",
                "--index",
                str(root / "index"),
                "--query-index",
                str(tmp_path / "qidx"),
                "--topk",
                str(K),
                "--out",
                str(tmp_path / "res"),
                "--no-wandb",
            ]
        )
        == 0
    )
    # query rows went through fp16 storage (measured: scores within 3.4e-5 of the largest)
    assert_same_topk(read_topk(tmp_path / "res"), read_topk(single), 3e-4, "score --query-index vs --queries")
    assert {q: r["query_text"] for q, r in listing(tmp_path / "res").items()} == {
        q: r["query_text"] for q, r in listing(single).items()
    }


def test_score_prompts_attributes_the_models_own_completions(root, tmp_path):
    from logra_dist.embedded import ensure_default_model, load_model_and_tokenizer
    from logra_dist.scoring.completion import complete, read_prompts

    prompts = tmp_path / "prompts.txt"  # one prompt per line
    prompts.write_text("Return a new \nOpen the file and \n\nDecode the object as JSON and \n")
    assert (
        main(
            [
                "score",
                "--index",
                str(root / "index"),
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                "8",
                "--topk",
                "3",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "res"),
                "--no-wandb",
            ]
        )
        == 0
    )
    top, records = read_topk(tmp_path / "res"), listing(tmp_path / "res")
    assert top["query_ids"].tolist() == [0, 1, 2] and top["train_ids"].shape == (3, 3)
    assert (np.diff(top["scores"], axis=1) <= 0).all()
    model, tokenizer = load_model_and_tokenizer(ensure_default_model())
    expected = complete(model, tokenizer, read_prompts(prompts), max_new_tokens=8, batch_size=3)
    for c in expected:
        rec = records[c.id]
        assert (rec["prompt"], rec["completion"]) == (c.prompt, c.completion) and c.completion
        assert rec["query_text"] == c.prompt + c.completion
        generated = c.sample.input_ids[c.sample.labels.count(-100) :]
        assert len(generated) == 8 or (len(generated) < 8 and generated[-1] == tokenizer.eos_token_id)
    assert "Open the file and " in (tmp_path / "res" / "topk.md").read_text()


@pytest.fixture(scope="module")
def worker_reference(root, tmp_path_factory) -> dict[str, np.ndarray]:
    """The query worker's computation on one process, plain module, other batch size."""
    from logra_dist.embedded import ensure_default_model
    from logra_dist.engines.loading import build

    model_path = ensure_default_model()
    model, _ = build(None, model_path, None)
    return qw.run(model, model_path, root / "index", tmp_path_factory.mktemp("worker-ref"), batch=3)


@pytest.mark.parametrize("config, kind", [("zero3", "deepspeed-zero3"), ("fsdp2", "fsdp2"), ("fsdp1", "fsdp1")])
def test_query_gradients_and_completions_under_sharding_equal_one_process(root, worker_reference, config, kind):
    """Issue 4: what the Scorer captures with sharded weights (each rank its share, one shadow
    batch) and gathers equals one process's; greedy completions equal one process's."""
    ref = worker_reference
    ranks = [dict(np.load(root / "worker" / config / f"rank{r}.npz")) for r in (0, 1)]
    ref_rows = dict(zip(ref["local_ids"].tolist(), ref["local_rows"]))
    scale = np.abs(ref["local_rows"]).max()
    assert sorted(ref_rows) == [0, 1, 2, 3, 9]
    for r, got in enumerate(ranks):
        assert str(got["engine"]) == kind
        assert got["local_ids"].tolist() == sorted(ref_rows)[r::2]  # this rank's share, in order
        np.testing.assert_allclose(
            got["local_rows"],
            np.stack([ref_rows[i] for i in got["local_ids"].tolist()]),
            rtol=1e-4,
            atol=1e-5 * scale,
            err_msg=f"rank {r} query rows",
        )
        # the Scorer's gathered queries: identical on both ranks, equal to one process's
        np.testing.assert_array_equal(got["ids"], ref["ids"])
        for key in ("pre", "self_layers"):
            np.testing.assert_allclose(
                got[key], ref[key], rtol=1e-4, atol=1e-6 * np.abs(ref[key]).max(), err_msg=f"rank {r} gathered {key}"
            )
        np.testing.assert_array_equal(got["top_ids"], ref["top_ids"])
        np.testing.assert_allclose(got["top_scores"], ref["top_scores"], rtol=1e-4)
        # generation: the same greedy tokens, and no ZeRO-3 weight left gathered afterwards
        assert json.loads(str(got["completions"])) == json.loads(str(ref["completions"]))
        assert int(got["left_gathered"]) == 0
    tokens = json.loads(str(ref["completion_tokens"]))
    for r, got in enumerate(ranks):
        mine = json.loads(str(got["completion_tokens"]))
        assert mine == {k: tokens[k] for k in mine} and len(mine) == len(qw.PROMPTS[r::2])
    # the ranks' first generate calls stopped after different numbers of steps, so lockstep
    # generation (synced_gpus) was really needed
    lengths = {int(k): n for k, n in json.loads(str(ref["completion_lengths"])).items()}
    first = [max(lengths[p.id] for p in qw.PROMPTS[r::2][: qw.BATCH]) for r in (0, 1)]
    assert first[0] != first[1], first
