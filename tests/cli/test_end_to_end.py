"""The main job on the embedded default: log the bundled corpus with the bundled tiny Llama,
then query with training documents themselves. Any mix-up of ids or rows between logging,
storage and scoring breaks 'each document is its own top-1 (RelatIF)'."""

import json

import h5py
import numpy as np

from logra_dist import GradientStore
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


def test_score_with_another_checkpoint_needs_allow_model_mismatch(tmp_path):
    """A checkpoint one ulp of one logged weight away (a 'fine-tuned' one) is refused by score,
    naming both fingerprints; --allow-model-mismatch scores and records it in topk.h5."""
    import pytest
    import torch

    from logra_dist.embedded.cache import ensure_default_model, load_model_and_tokenizer
    from logra_dist.index.format import IndexFormatError

    index, other = tmp_path / "index", tmp_path / "other"
    assert main(["log", "--out", str(index), "--max-samples", "8", "--batch-size", "8"]) == 0
    model, tokenizer = load_model_and_tokenizer(ensure_default_model())[:2]
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"text": "def f(x): return x"}) + "\n")
    args = ["score", "--index", str(index), "--queries", str(queries), "--topk", "2", "--model", str(other)]
    with pytest.raises(IndexFormatError, match=r"field 'model.fingerprint.weights' is '[0-9a-f]+' in the index"):
        main(args)
    with pytest.warns(RuntimeWarning, match="scoring across models as allowed"):
        assert main([*args, "--allow-model-mismatch", "--out", str(tmp_path / "out")]) == 0
    with h5py.File(tmp_path / "out" / "topk.h5") as f:
        assert bool(f.attrs["allow_model_mismatch"])
        assert "model.fingerprint.weights" in json.loads(f.attrs["model_mismatch"])
        assert "model.fingerprint.config" not in json.loads(f.attrs["model_mismatch"])


def test_activation_checkpointing_logs_the_same_rows_and_says_so(tmp_path):
    """`log --activation-checkpointing`: train mode for the recompute, every dropout-applying
    module kept in eval mode; the rows equal a plain run's, and the manifest records the flag."""
    runs = {}
    for name, extra in (("plain", []), ("ckpt", ["--activation-checkpointing"])):
        out = tmp_path / name
        args = ["log", "--out", str(out), "--max-samples", "12", "--batch-size", "4", "--storage-dtype", "float32"]
        assert main([*args, "--no-wandb", *extra]) == 0
        with GradientStore(out) as store:
            runs[name] = (store.ids.copy(), store[:].copy(), store.manifest["metadata"]["activation_checkpointing"])
    (ids_a, rows_a, flag_a), (ids_b, rows_b, flag_b) = runs["plain"], runs["ckpt"]
    assert (flag_a, flag_b) == (False, True)
    assert np.array_equal(ids_a, ids_b)
    np.testing.assert_allclose(rows_b, rows_a, rtol=1e-5, atol=1e-6 * np.abs(rows_a).max())
