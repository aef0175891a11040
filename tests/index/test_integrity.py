"""Every file of an index is verifiable against its manifest: foreign and tampered files are refused
with an error naming the file and the field (docs/reliability.md, the integrity rows)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings

import h5py
import numpy as np
import pytest
import torch
from scorer_helpers import TinyNet, capture_batches, config

import logra_dist as ld
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import read_stats
from logra_dist.index.inspect import inspect_index
from logra_dist.index.writer import write_index

TRAIN_IDS = np.arange(17)
QUERY_IDS = np.arange(100, 104)


def log(out, metadata=None, model=None, ids=TRAIN_IDS):
    logger = ld.attach(model or TinyNet(), config(), out, metadata=metadata)
    capture_batches(logger, ids)
    manifest = logger.finalize()
    logger.close()
    return manifest


def nudged() -> TinyNet:
    """TinyNet with one weight moved by one ulp: another checkpoint of the same architecture."""
    model = TinyNet()
    with torch.no_grad():
        w = model.self_attn.q.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    return model


def refused(match: str, call) -> float:
    """Seconds until `call` raises an IndexFormatError matching `match` (the fault table's time)."""
    start = time.perf_counter()
    with pytest.raises(ld.IndexFormatError, match=match):
        call()
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    log(root / "a", {"max_length": 16})
    log(root / "b", {"max_length": 32})  # another job of the same model: other --max-length
    log(root / "c", {"max_length": 16}, ids=np.arange(20, 37))  # same job key, other rows
    return root


def copy(indexes, name, tmp_path):
    shutil.copytree(indexes / name, tmp_path / name)
    return tmp_path / name


def test_foreign_shard_of_another_max_length_job_is_refused(indexes, tmp_path):
    a = copy(indexes, "a", tmp_path)
    shutil.copy(indexes / "b" / "shards" / "rank-00000.h5", a / "shards" / "rank-00000.h5")
    refused(r"rank-00000.h5: written by another job: its job_key is", lambda: ld.GradientStore(a))


def test_manifest_edited_to_another_setting_is_refused(indexes, tmp_path):
    a = copy(indexes, "a", tmp_path)
    m = json.loads((a / "manifest.json").read_text())
    m["metadata"]["max_length"] = 32
    (a / "manifest.json").write_text(json.dumps(m))
    refused(r"rank-00000.h5: written by another job: its job_key", lambda: ld.GradientStore(a))


def test_shard_with_other_block_checksums_fails_its_content_digest(indexes, tmp_path):
    a = copy(indexes, "a", tmp_path)
    with h5py.File(a / "shards" / "rank-00000.h5", "r+") as f:
        f["block_sums"][0] = f["block_sums"][0] + np.uint64(1)
    refused(r"rank-00000.h5: its content digest .* field 'content_digest'", lambda: ld.GradientStore(a))


@pytest.mark.parametrize("source", ["b", "c"])
def test_foreign_stats_h5_is_refused(indexes, tmp_path, source):
    a = copy(indexes, "a", tmp_path)
    shutil.copy(indexes / source / "stats.h5", a / "stats.h5")
    field = "job_key" if source == "b" else "shards_digest"  # c: the same job key, other shards
    refused(rf"stats.h5: statistics of another job or other shards: its {field} is", lambda: ld.GradientStore(a))
    refused(rf"stats.h5: .*its {field}", lambda: ld.Scorer(None, a))
    report = inspect_index(a)
    assert not report["complete"] and any(f"its {field} is" in p for p in report["problems"])


def test_one_flipped_bit_in_stats_h5_names_the_dataset(indexes, tmp_path):
    a = copy(indexes, "a", tmp_path)
    with h5py.File(a / "stats.h5", "r") as f:
        name = sorted(k for k in f if isinstance(f[k], h5py.Group))[0]
        name = f"{name}/{sorted(f[name])[0]}"
        offset = f[name].id.get_offset()
    with open(a / "stats.h5", "r+b") as raw:
        raw.seek(offset + 3)
        byte = raw.read(1)[0]
        raw.seek(offset + 3)
        raw.write(bytes([byte ^ 0x10]))
    seconds = refused(
        rf"stats.h5: dataset '{name}' fails its checksum \(field 'sha256'\)", lambda: read_stats(a / "stats.h5")
    )
    assert seconds < 5
    refused(rf"dataset '{name}' fails its checksum", lambda: ld.Scorer(None, a))


def test_manifest_with_a_rank_entry_and_its_file_deleted_is_refused(tmp_path):
    specs = [LayerSpec("l", "linear", 4, 4, 2, 2)]
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    cfg = ld.LoGraConfig(k_in=2, k_out=2, flush_rows=4).to_json()
    write_index(tmp_path, specs, cfg, [[(np.arange(3), rows[:3])], [(np.arange(3, 6), rows[3:])]])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"], m["total_rows"] = m["shards"][:1], 3
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "shards" / "rank-00001.h5").unlink()
    seconds = refused(
        r"manifest.json: field 'shards': world_size is 2 but it lists 1 shard entries",
        lambda: ld.GradientStore(tmp_path),
    )
    assert seconds < 5
    m["world_size"] = 1  # the world size edited too: the shard itself says 2
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    refused(r"rank-00000.h5: written by another job: its world_size is '2'", lambda: ld.GradientStore(tmp_path))
    m["world_size"], m["total_rows"] = 2, 6  # an entry's path edited
    m["shards"] = [m["shards"][0], {**m["shards"][0], "rank": 1}]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    refused(
        r"field 'shards': shard entry 1 is .* expected rank 1 at 'shards/rank-00001.h5'",
        lambda: ld.GradientStore(tmp_path),
    )


def _scores(index, **kw):
    sc = ld.Scorer(TinyNet(), index, mode="relatif", **kw)
    capture_batches(sc, QUERY_IDS)
    result = sc.topk(5)
    sc.close()
    return result


def test_edited_self_influence_cache_is_detected_and_recomputed(indexes, tmp_path):
    a = copy(indexes, "a", tmp_path)
    fresh = _scores(a, cache_self_influence=False)
    _scores(a)  # writes selfinf.h5
    with h5py.File(a / "selfinf.h5", "r+") as f:
        key = next(iter(f))
        f[key][3, 0] = f[key][3, 0] * 1000
    with pytest.warns(RuntimeWarning, match=r"selfinf.h5: entry .* fails its checksum \(field 'sha256'"):
        again = _scores(a)
    np.testing.assert_array_equal(again.train_ids, fresh.train_ids)
    np.testing.assert_allclose(again.scores, fresh.scores, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recomputed and replaced: now valid again
        np.testing.assert_allclose(_scores(a).scores, fresh.scores, rtol=1e-6)


def test_stale_self_influence_cache_is_not_reused(indexes, tmp_path):
    """A cache computed from other shards and statistics (index c) even with the manifest hash
    this index's: its sources (job key, shards digest, stats digest) differ, so it is recomputed."""
    a, c = copy(indexes, "a", tmp_path), copy(indexes, "c", tmp_path)
    fresh = _scores(a, cache_self_influence=False)
    _scores(c)
    sha = hashlib.sha256((a / "manifest.json").read_bytes()).hexdigest()
    with h5py.File(c / "selfinf.h5", "r+") as f:
        for key in f:
            f[key].attrs["manifest_sha256"] = sha
    shutil.copy(c / "selfinf.h5", a / "selfinf.h5")
    again = _scores(a)
    np.testing.assert_array_equal(again.train_ids, fresh.train_ids)
    np.testing.assert_allclose(again.scores, fresh.scores, rtol=1e-6)
    with h5py.File(a / "selfinf.h5") as f:
        assert all(f[k].attrs["sources"] != "" for k in f)


def test_fingerprint_changes_with_one_ulp_of_one_weight(indexes, tmp_path):
    ref = json.loads((indexes / "a" / "manifest.json").read_text())["model"]["fingerprint"]
    same = log(tmp_path / "same")["model"]["fingerprint"]
    other = log(tmp_path / "other", model=nudged())["model"]["fingerprint"]
    assert same == ref and other["config"] == ref["config"] and other["weights"] != ref["weights"]


def test_score_with_another_model_is_refused_unless_allowed(indexes, tmp_path):
    a = copy(indexes, "a", tmp_path)
    seconds = refused(
        r"manifest.json: the index was made with another model or tokenizer: field 'model.fingerprint.weights' "
        r"is '[0-9a-f]+' in the index, '[0-9a-f]+' for the scoring model.*--allow-model-mismatch",
        lambda: ld.Scorer(nudged(), a),
    )
    assert seconds < 5
    refused(
        r"field 'metadata.tokenizer' is 'tok-a' in the index, 'tok-b'",
        lambda: ld.Scorer(None, log(tmp_path / "t", {"tokenizer": "tok-a"}) and tmp_path / "t", tokenizer="tok-b"),
    )
    with pytest.warns(RuntimeWarning, match="scoring across models as allowed"):
        sc = ld.Scorer(nudged(), a, allow_model_mismatch=True)
    capture_batches(sc, QUERY_IDS)
    paths = sc.write_results(tmp_path / "out", sc.topk(3))
    sc.close()
    with h5py.File(paths["h5"]) as f:
        assert bool(f.attrs["allow_model_mismatch"])
        assert "model.fingerprint.weights" in json.loads(f.attrs["model_mismatch"])


def test_query_index_of_another_model_is_refused(indexes, tmp_path):
    log(tmp_path / "q", model=nudged(), ids=QUERY_IDS)
    sc = ld.Scorer(None, indexes / "a")
    refused(
        r"q/manifest.json \(query index\): .*field 'model.fingerprint.weights'",
        lambda: sc.add_query_gradients(tmp_path / "q"),
    )
