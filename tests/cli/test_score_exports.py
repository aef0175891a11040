"""`score --bottomk/--groups/--export-matrix` and `logra-dist selfinf` on a real index of the
bundled model, against numpy built from the raw shard rows and stats.h5 (scorer_helpers), and
the job figures each writes to metrics.json."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from scorer_helpers import group_mask, inverse_hessian, raw_rows, reference_scores

from logra_dist.cli.main import main
from logra_dist.cli.report import write_report
from logra_dist.embedded import load_corpus
from logra_dist.scoring import export

N_TRAIN, BOTTOM = 12, 4
GROUPS = {"attn": "self_attn", "rest": "^(?!.*self_attn)"}  # a partition of the layers


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    index, qindex, out = root / "index", root / "qindex", root / "out"
    corpus = load_corpus()
    (root / "q.jsonl").write_text(
        "".join(json.dumps({"id": 500 + i, "text": corpus[40 + i]["text"]}) + "\n" for i in range(3))
    )
    common = ["--batch-size", "12", "--no-wandb"]
    assert main(["log", "--out", str(index), "--max-samples", str(N_TRAIN), *common]) == 0
    assert main(["log", "--out", str(qindex), "--data", str(root / "q.jsonl"), "--logra", str(index), *common]) == 0
    score = ["score", "--index", str(index), "--query-index", str(qindex), "--mode", "dot", "--no-wandb"]
    groups = [f"{k}={v}" for k, v in GROUPS.items()]
    argv = [*score, "--topk", str(N_TRAIN), "--bottomk", str(BOTTOM), "--groups", *groups]
    assert main([*argv, "--export-matrix", str(out / "matrix.h5"), "--out", str(out)]) == 0
    assert main(["selfinf", str(index), "--out", str(out / "selfinf.h5")]) == 0
    ids, g, layout = raw_rows(index)
    qids, q, _ = raw_rows(qindex)
    order = np.argsort(qids)
    return {"root": root, "index": index, "out": out, "score": score, "ids": ids, "g": g, "layout": layout,
            "qids": qids[order], "q": q[order], "hinv": inverse_hessian(index, layout)}  # fmt: skip


def _reference(job, pattern=None):
    return reference_scores(job["q"], job["g"], job["hinv"], "dot", group_mask(job["layout"], pattern))


def _by_id(job, ids):
    """Column positions of `ids` in raw_rows order."""
    where = {int(t): c for c, t in enumerate(job["ids"])}
    return np.array([[where[int(t)] for t in row] for row in np.atleast_2d(ids)])


def test_matrix_export_equals_explicit_scores(job):
    with h5py.File(job["out"] / "matrix.h5") as f:
        scores, qids, tids = f["scores"][()], f["query_ids"][()], f["train_ids"][()]
        assert f.attrs["mode"] == "dot"
    np.testing.assert_array_equal(qids, job["qids"])
    assert sorted(tids.tolist()) == sorted(job["ids"].tolist()) and scores.shape == (3, N_TRAIN)
    ref = _reference(job)[:, _by_id(job, tids)[0]]
    np.testing.assert_allclose(scores, ref, rtol=2e-4, atol=1e-5 * np.abs(ref).max())


def test_bottomk_is_the_lowest_scores_of_the_explicit_matrix(job):
    ref = _reference(job)
    order = np.lexsort((np.broadcast_to(job["ids"], ref.shape), ref), axis=1)[:, :BOTTOM]
    with h5py.File(job["out"] / "topk.h5") as f:
        got_ids, got = f["bottom_train_ids"][()], f["bottom_scores"][()]
        assert f.attrs["bottomk"] == BOTTOM and "bottom_scores" in f["groups/attn"]
    np.testing.assert_array_equal(got_ids, job["ids"][order])
    np.testing.assert_allclose(got, np.take_along_axis(ref, order, 1), rtol=2e-4, atol=1e-5 * np.abs(ref).max())
    records = [json.loads(line) for line in (job["out"] / "topk.jsonl").read_text().splitlines()]
    assert [r["train_id"] for r in records[0]["bottom"]] == got_ids[0].tolist()
    assert "most opposing" in (job["out"] / "topk.md").read_text()
    assert "most opposing examples" in write_report(job["out"]).read_text()


def test_groups_sum_to_the_total_in_dot_mode(job):
    with h5py.File(job["out"] / "topk.h5") as f:
        total = dict(zip(f["train_ids"][0].tolist(), f["scores"][0].tolist()))
        parts = [dict(zip(f[f"groups/{g}/train_ids"][0].tolist(), f[f"groups/{g}/scores"][0].tolist())) for g in GROUPS]
    assert len(total) == N_TRAIN  # top-k over every row: each id once per output
    for tid, s in total.items():
        assert sum(p[tid] for p in parts) == pytest.approx(s, rel=1e-4, abs=1e-5 * max(map(abs, total.values())))
    ref = _reference(job, GROUPS["attn"])[0, _by_id(job, list(parts[0]))[0]]
    np.testing.assert_allclose(list(parts[0].values()), ref, rtol=2e-4, atol=1e-5 * np.abs(ref).max())


def test_selfinf_export_equals_explicit(job):
    with h5py.File(job["out"] / "selfinf.h5") as f:
        tids, total, per_layer = f["train_ids"][()], f["self_influence"][()], f["per_layer"][()]
        layers = json.loads(f.attrs["layers"])
    g, h = job["g"][_by_id(job, tids)[0]], job["hinv"]
    ref = np.einsum("nd,de,ne->n", g, h, g)
    np.testing.assert_allclose(total, ref, rtol=2e-4)
    assert per_layer.shape == (N_TRAIN, len(layers)) == (N_TRAIN, len(job["layout"]))
    np.testing.assert_allclose(per_layer.sum(1), total, rtol=1e-5)


def test_metrics_json_beside_the_index_and_the_results(job):
    log = json.loads((job["index"] / "metrics.json").read_text())
    assert log["job"] == "log" and log["samples"] == N_TRAIN and log["world_size"] == 1
    assert log["tokens"] > 0 and log["tokens_per_s"] > 0 and log["ranks"][0]["peak_rss_MiB"] > 0
    assert {"forward", "backward", "finalize"} <= set(log["phases"])
    assert 0 < log["phases"]["forward"]["share"] < 1 and log["summary"]["index/total_rows"] == N_TRAIN
    score = json.loads((job["out"] / "metrics.json").read_text())
    assert score["job"] == "score" and score["summary"]["score/queries"] == 3 and "gemm" in score["phases"]


def test_matrix_export_refused_above_the_limit_unless_forced(job, monkeypatch, tmp_path):
    monkeypatch.setattr(export, "MATRIX_LIMIT_BYTES", 100)  # 3 x 12 float32 = 144 bytes
    argv = [*job["score"], "--export-matrix", str(tmp_path / "m.h5")]
    with pytest.raises(ValueError, match=r"3 queries x 12 training rows is 144 B .*\(limit 100 B.* or --force"):
        main(argv)
    assert not (tmp_path / "m.h5").exists()
    assert main([*argv, "--force"]) == 0 and (tmp_path / "m.h5").exists()
    texts = ["score", "--index", str(job["index"]), "--queries", str(job["root"] / "q.jsonl")]
    with pytest.raises(ValueError, match=r"3 queries x 12 training rows"):  # before the model loads
        main([*texts, "--export-matrix", str(tmp_path / "t.h5"), "--no-wandb"])
