"""The main job on the embedded default: log the bundled corpus with the bundled tiny Llama,
then query with training documents themselves. Any mix-up of ids or rows between logging,
storage and scoring breaks 'each document is its own top-1 (RelatIF)'."""

import json

import h5py
import numpy as np

from logra_dist.cli.main import main
from logra_dist.embedded import load_corpus

N_TRAIN, N_QUERIES = 200, 50


def test_each_training_document_is_its_own_top1(tmp_path, capsys):
    index, out = tmp_path / "index", tmp_path / "results"
    assert main(["log", "--out", str(index), "--max-samples", str(N_TRAIN), "--batch-size", "16"]) == 0
    corpus = load_corpus()
    queries = tmp_path / "queries.jsonl"
    # queries are the training documents, in shuffled order, with ids that differ from theirs
    order = np.random.default_rng(0).permutation(N_TRAIN)[:N_QUERIES]
    queries.write_text(
        "".join(json.dumps({"id": 1000 + i, "text": corpus[j]["text"]}) + "\n" for i, j in enumerate(order))
    )
    assert main(["score", "--index", str(index), "--queries", str(queries), "--topk", "3", "--out", str(out)]) == 0
    with h5py.File(out / "topk.h5") as f:
        query_ids, train_ids, scores = f["query_ids"][:], f["train_ids"][:], f["scores"][:]
        assert f.attrs["mode"] == "relatif"
    assert sorted(query_ids.tolist()) == [1000 + i for i in range(N_QUERIES)]
    expected_top1 = {1000 + i: int(corpus[j]["id"]) for i, j in enumerate(order)}
    assert [int(t) for t in train_ids[:, 0]] == [expected_top1[int(q)] for q in query_ids]
    assert (np.diff(scores, axis=1) <= 0).all()
    listing = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    by_query = {rec["query_id"]: rec for rec in listing}
    assert by_query[1000]["results"][0]["text"] == corpus[order[0]]["text"]
    assert by_query[1000]["query_text"] == corpus[order[0]]["text"]
    assert "training examples per query" in capsys.readouterr().out
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["total_rows"] == N_TRAIN and manifest["metadata"]["data"] == "embedded"
