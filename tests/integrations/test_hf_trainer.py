"""Hugging Face Trainer + DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun, gloo): `log_trainer_dataset`
logs every training sample exactly once, with the rows a plain single-process model with the
trained weights gives, and the tracker's offline W&B run holds both ranks' figures.

One process launch covers the Trainer path and the 2-rank W&B case (each launch costs ~20 s)."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from wandb_offline import read_run

from logra_dist import GradientStore, LoGraConfig, attach
from logra_dist.data import summed_lm_loss
from logra_dist.integrations.hf_trainer import dataset_identity, rank_batches

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workers"))
from hf_texts import Texts

N = 11  # odd: the ranks hold 6 and 5 samples
ROOT = Path(__file__).resolve().parents[2]


def test_rank_batches_cover_every_sample_once_with_equal_batch_counts():
    for n in range(1, 31):
        for world in range(1, 5):
            for bs in range(1, 6):
                if n < world:
                    with pytest.raises(ValueError, match="fewer than"):
                        rank_batches(n, 0, world, bs)
                    continue
                plans = [rank_batches(n, r, world, bs) for r in range(world)]
                ids = np.concatenate([b for plan in plans for b in plan])
                assert sorted(ids.tolist()) == list(range(n)), (n, world, bs)
                assert len({len(plan) for plan in plans}) == 1  # ZeRO-3: same number of forwards
                assert all(0 < len(b) <= bs + 1 for plan in plans for b in plan)
                assert all(len(b) <= bs for plan in plans for b in plan) or bs == 1


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    import accelerate  # noqa: F401  (transformers.Trainer needs it: pip install -e '.[test]')

    out = tmp_path_factory.mktemp("hf_zero3")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(out),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "workers"), os.environ.get("PYTHONPATH", "")]),
    }
    with socket.socket() as sock:  # torchrun's static rendezvous needs a real port number
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(ROOT / "tests" / "workers" / "hf_trainer_zero3.py"),
        str(out),
        str(N),
    ]
    proc = subprocess.Popen(
        cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # own process group: a hang is killed with its workers
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"2-rank Trainer job hung (killed after 300 s):\n{stdout[-3000:]}\n{stderr[-6000:]}"
        ) from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.distributed
def test_trainer_zero3_logs_every_sample_once_with_reference_rows(zero3_run):
    out, result = zero3_run
    assert result["stage"] == 3 and result["global_step"] == 2 and result["adapter"] == "deepspeed-zero3"
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [6, 5]
    # the data identity: the same digest a single process computes (world-size free), other batches too
    texts = Texts(N)
    expected = dataset_identity(texts, texts.collate, rank_batches(N, 0, 1, 4))
    assert manifest["data"] == {**expected.to_dict(), "model_dtype": "float32"} and manifest["data"]["samples"] == N
    assert manifest["metadata"]["precision"] == {"model": "float32", "storage": "float32"}
    with GradientStore(out / "index") as store:
        assert sorted(store.ids.tolist()) == list(range(N))  # every sample, once (the store refuses duplicates)
        rows = store.rows_for_ids(np.arange(N))

    trained = torch.load(out / "trained.pt")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_dict(trained["config"]))
    model.load_state_dict(trained["state"])
    data = Texts(N)
    ref = attach(model.eval(), LoGraConfig(k_in=4, k_out=4, storage_dtype="float32", seed=3), out / "reference")
    for i in range(N):
        batch = data.collate([data[i]])
        with ref.capture(torch.tensor([i]), mask=batch["attention_mask"]):
            logits = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref.backward(summed_lm_loss(logits, batch["labels"]))
    ref.finalize()
    ref.close()
    with GradientStore(out / "reference") as reference:
        expected = reference.rows_for_ids(np.arange(N))
    scale = np.abs(expected).max()
    assert np.abs(rows - expected).max() <= 1e-4 * scale, np.abs(rows - expected).max() / scale


@pytest.mark.distributed
def test_trainer_zero3_wandb_run_has_both_ranks(zero3_run):
    out, result = zero3_run
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # one run per job, not one per rank
    run = read_run(runs[0])
    assert run["job_type"] == "log" and run["config"]["logra"]["k_in"] == 4
    summary = run["summary"]
    assert summary["world_size"] == 2 and summary["index/total_rows"] == N
    assert summary["ranks/count/samples/min"] == 5 and summary["ranks/count/samples/max"] == 6
    assert summary["ranks/count/batches/min"] == summary["ranks/count/batches/max"] == 3  # ZeRO-3: same count
    for phase in ("forward", "backward", "write", "all-reduce"):
        assert summary[f"ranks/time/{phase}/min"] > 0, phase
    assert summary["ranks/count/bytes_written/min"] > 0 and summary["memory/peak_rss_MiB"] > 50
    assert [f["count/samples"] for f in result["per_rank"]] == [6, 5]
    assert len(run["history"]) >= 3 and all("time/forward" in row for row in run["history"][:3])
