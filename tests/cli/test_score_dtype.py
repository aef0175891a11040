"""`score` makes query gradients in the precision the index was logged in (issue 12): without
--dtype it takes the index's recorded model dtype (`metadata.precision.model`); a different
--dtype, an engine config stating another precision, or a query index logged in another dtype is
refused naming both and the fix; the Python Scorer refuses a model computing in another dtype
the same way. Real CLI runs on the bundled tiny model, a few samples."""

import json

import h5py
import numpy as np
import pytest

from logra_dist.cli.main import main
from logra_dist.engines.spec import EngineConfigError
from logra_dist.index.format import IndexFormatError

LOG = ["--max-samples", "6", "--batch-size", "6", "--storage-dtype", "float32", "--k-in", "4", "--k-out", "4"]


@pytest.fixture(scope="module")
def bf16_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_dtype")
    assert main(["log", "--out", str(root / "index"), *LOG, "--dtype", "bfloat16"]) == 0
    queries = root / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(["def f(x):", "a b c"])))
    return root


def _score(root, out, *extra):
    args = ["score", "--index", str(root / "index"), "--queries", str(root / "q.jsonl"), "--topk", "3"]
    assert main([*args, "--out", str(root / out), *extra]) == 0
    with h5py.File(root / out / "topk.h5") as f:
        return f["train_ids"][:], f["scores"][:]


def test_score_without_dtype_uses_the_index_dtype(bf16_index):
    manifest = json.loads((bf16_index / "index" / "manifest.json").read_text())
    assert manifest["metadata"]["precision"]["model"] == "bfloat16"
    ids, scores = _score(bf16_index, "default")
    ids_bf16, scores_bf16 = _score(bf16_index, "asked", "--dtype", "bfloat16")
    # Bit-equal to an explicit bf16 run (a float32 query pass differs at bf16 resolution).
    assert np.array_equal(ids, ids_bf16) and np.array_equal(scores, scores_bf16)


def test_score_with_another_dtype_or_config_precision_is_refused(bf16_index, tmp_path):
    args = ["score", "--index", str(bf16_index / "index"), "--queries", str(bf16_index / "q.jsonl")]
    with pytest.raises(IndexFormatError) as err:
        main([*args, "--dtype", "float32"])
    message = str(err.value)
    assert "logged in bfloat16" in message and "--dtype is float32" in message and "drop --dtype" in message
    config = tmp_path / "fp32.json"
    config.write_text(json.dumps({"engine": "none", "dtype": "float32"}))
    with pytest.raises(EngineConfigError, match=r"logged in bfloat16 but --config .*fp32\.json states another"):
        main([*args, "--config", str(config)])


def test_query_index_logged_in_another_dtype_is_refused(bf16_index):
    queries = bf16_index / "q-index"
    assert main(["log", "--out", str(queries), "--data", str(bf16_index / "q.jsonl"), *LOG]) == 0
    args = ["score", "--index", str(bf16_index / "index"), "--query-index", str(queries)]
    with pytest.raises(IndexFormatError, match=r"logged in bfloat16 .* but query index .*q-index is float32; log the"):
        main(args)


def test_python_scorer_refuses_a_model_in_another_dtype(bf16_index):
    from logra_dist import Scorer
    from logra_dist.embedded.cache import ensure_default_model, load_model_and_tokenizer

    model = load_model_and_tokenizer(ensure_default_model())[0]  # float32
    with pytest.raises(IndexFormatError, match=r"logged in bfloat16 .* the scoring model computes in float32; load"):
        Scorer(model, bf16_index / "index")
    assert all(p.requires_grad for p in model.parameters())  # refused before leaving hooks or frozen weights
    with pytest.warns(RuntimeWarning, match="scoring across models"):
        scorer = Scorer(model, bf16_index / "index", allow_model_mismatch=True)
    assert scorer.model_mismatch
    scorer.close()
