"""`logra-dist log` on a user's own data, one process: string ids, a bad record skipped and listed,
long documents chunked; the manifest reports the counts and the sample table maps every logged
row to its document, window offset and original id. Then `score` shows the training texts
from the recorded data, refuses a changed file naming the first differing sample, and takes
`--data` for moved files."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from logra_dist.cli.main import main
from logra_dist.data import MAX_CHUNKS
from logra_dist.data.table import SampleTable, skipped_path
from logra_dist.index.reader import GradientStore

LONG = "a long document that needs several windows of tokens to fit " * 3


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    records = [
        {"id": "alpha", "text": LONG},
        {"id": "beta", "text": ""},  # bad: empty
        {"id": "gamma", "text": "short one"},
        {"id": "delta", "prompt": "Q: two plus two? A:", "completion": " four"},
    ]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["log", "--data", str(data), "--out", str(root / "index"), "--no-wandb", "--max-length", "48"]
    small = ["--batch-size", "2", "--k-in", "4", "--k-out", "4"]
    assert main([*args, "--chunk", "--stride", "40", "--skip-bad", *small]) == 0
    return root


def test_manifest_reports_chunks_and_skips(logged):
    manifest = json.loads((logged / "index" / "manifest.json").read_text())
    report = manifest["metadata"]["data_report"]
    assert report["documents"] == 3 and report["skipped"] == 1 and report["chunk"] == [48, 40]
    assert manifest["data"]["windows"] == [48, 40] and manifest["data"]["samples"] == report["samples"] > 3
    skipped = [json.loads(line) for line in skipped_path(logged / "index", 0).read_text().splitlines()]
    assert [(s["id"], s["where"].rsplit(":", 1)[1], s["reason"]) for s in skipped] == [("beta", "2", "empty text")]


def test_sample_table_maps_rows_to_documents_and_offsets(logged):
    table = SampleTable(logged / "index")
    with GradientStore(logged / "index") as store:
        assert sorted(store.ids.tolist()) == table.sample_id.tolist()
    alpha = table.doc_id == 0
    assert alpha.sum() >= 3 and table.offset[alpha].tolist() == list(range(0, 40 * alpha.sum(), 40))
    assert [table.document_key(d) for d in np.unique(table.doc_id)] == ["alpha", "gamma", "delta"]


def _score(logged, out, *extra):
    queries = logged / "queries.jsonl"
    queries.write_text(json.dumps({"text": "short one"}) + "\n")
    args = ["score", "--index", str(logged / "index"), "--queries", str(queries), "--topk", "3", "--out", str(out)]
    assert main([*args, "--no-wandb", "--max-length", "48", *extra]) == 0
    return [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]


def test_score_shows_recorded_texts_and_refuses_changed_data(logged, tmp_path):
    table = SampleTable(logged / "index")
    (rec,) = _score(logged, tmp_path / "a")
    assert 2 <= len(rec["results"]) <= 3  # top 3 windows, grouped by document
    for r in rec["results"]:
        assert r["text"] and r["text"] in LONG + "short one" + "Q: two plus two? A: four"
    moved = tmp_path / "moved.jsonl"
    shutil.copy(logged / "train.jsonl", moved)
    (logged / "train.jsonl").write_text((logged / "train.jsonl").read_text().replace("short one", "short two"))
    try:
        with pytest.raises(ValueError, match=r"sample 65536 \(.*train.jsonl:3\) differs from the one logged"):
            _score(logged, tmp_path / "b")
        (again,) = _score(logged, tmp_path / "c", "--data", str(moved))
        assert [r["text"] for r in again["results"]] == [r["text"] for r in rec["results"]]
    finally:
        shutil.copy(moved, logged / "train.jsonl")
    assert table.sample_id.size


def test_listing_groups_windows_by_document(logged, tmp_path):
    """The chunked document's windows are one entry, scored as its best window, which is shown."""
    (rec,) = _score(logged, tmp_path / "g", "--topk", "6")
    documents = [r["document"] for r in rec["results"]]
    assert sorted(documents) == ["alpha", "delta", "gamma"]  # 6 rows, 3 documents
    assert sum(r["windows_in_topk"] for r in rec["results"]) == 6
    scores = [r["score"] for r in rec["results"]]
    assert scores == sorted(scores, reverse=True)
    with h5py.File(tmp_path / "g" / "topk.h5") as f:
        raw_ids, raw_scores = f["train_ids"][0], f["scores"][0]
    alpha = next(r for r in rec["results"] if r["document"] == "alpha")
    mine = [s for t, s in zip(raw_ids, raw_scores) if t // MAX_CHUNKS == 0]
    assert alpha["score"] == pytest.approx(max(mine)) and alpha["offset"] == 40 * (alpha["train_id"] % MAX_CHUNKS)
    from logra_dist.cli.report import render_report

    page = render_report(tmp_path / "g")
    assert page.count('<div class="rank">') == len(rec["results"])  # one entry per document
    assert "doc &quot;alpha&quot; @ token" in page and "windows)" in page


def test_checkpoint_without_tokenizer_needs_tokenizer_flag(tmp_path):
    from logra_dist.embedded import ensure_default_model

    source = ensure_default_model()
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, bare / name)
    args = ["log", "--model", str(bare), "--max-samples", "2", "--no-wandb", "--k-in", "2", "--k-out", "2"]
    with pytest.raises(SystemExit, match=r"bare: no tokenizer files .*pass --tokenizer DIR"):
        main([*args, "--out", str(tmp_path / "a")])
    assert main([*args, "--out", str(tmp_path / "b"), "--tokenizer", str(source)]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["metadata"]["tokenizer_path"] == str(source) and manifest["total_rows"] == 2
