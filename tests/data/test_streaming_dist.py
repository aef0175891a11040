"""`logra-dist log` on 2 ranks (torchrun, gloo) streaming a user's jsonl with --chunk and
--skip-bad equals one process: the same sample ids (windows), rows, data identity and sample
tables, each rank having read and tokenized only its own documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from logra_dist import GradientStore
from logra_dist.cli.main import main
from logra_dist.data.table import SampleTable, skipped_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from jobs import REPO, free_port, run_job

pytestmark = pytest.mark.distributed


def test_two_ranks_stream_the_same_samples_as_one_process(tmp_path):
    records = [{"id": f"doc-{i}", "text": f"document {i} says " + "word " * (3 + 7 * (i % 4))} for i in range(9)]
    records.insert(4, {"id": "broken", "text": 7})  # skipped, listed by rank 0
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["--data", str(data), "--max-length", "24", "--chunk", "--stride", "16", "--skip-bad"]
    common += ["--k-in", "4", "--k-out", "4", "--batch-size", "3", "--no-wandb"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    run_job([*cmd, str(REPO / "launch" / "log.py"), *common, "--out", str(tmp_path / "two")], tmp_path / "two.txt")
    assert main(["log", *common, "--out", str(tmp_path / "one")]) == 0

    two, one = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("two", "one"))
    assert two["world_size"] == 2 and two["data"]["digest"] == one["data"]["digest"]
    assert two["metadata"]["data_report"] == one["metadata"]["data_report"]
    assert one["metadata"]["data_report"]["skipped"] == 1 and one["data"]["samples"] > 9
    with GradientStore(tmp_path / "two") as a, GradientStore(tmp_path / "one") as b:
        ids = np.sort(b.ids)
        np.testing.assert_array_equal(np.sort(a.ids), ids)
        got, want = a.rows_for_ids(ids), b.rows_for_ids(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    t2, t1 = SampleTable(tmp_path / "two"), SampleTable(tmp_path / "one")
    for name in ("sample_id", "doc_id", "offset", "digest"):
        np.testing.assert_array_equal(getattr(t2, name), getattr(t1, name), err_msg=name)
    assert t2.document_key(4) == "doc-4"  # positions count the valid documents
    skipped = json.loads(skipped_path(tmp_path / "two", 0).read_text())
    assert skipped["id"] == "broken" and skipped["where"].endswith("own.jsonl:5")
    assert not skipped_path(tmp_path / "two", 1).exists()
