"""Store round trips per dtype, id order, validation errors at the edge."""

import json

import numpy as np
import pytest
import torch
from reference import log_classifier, mlp

import logra_dist as ld
from logra_dist.index.codecs import codec_for


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_store_round_trip_each_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    model = mlp()
    X, Y = torch.randn(13, 5), torch.randint(0, 3, (13,))
    ids = torch.tensor([90, 3, 57, 11, 0, 8, 71, 42, 5, 6, 64, 33, 2])  # not sorted: order must survive
    cfg = ld.LoGraConfig(k_in=3, k_out=2, storage_dtype=dtype, compute_dtype="float32", flush_rows=4)
    log_classifier(model, X, Y, tmp_path / "a", cfg, batch_size=5, ids=ids)
    cfg32 = ld.LoGraConfig(k_in=3, k_out=2, storage_dtype="float32", compute_dtype="float32")
    log_classifier(model, X, Y, tmp_path / "b", cfg32, batch_size=5, ids=ids)
    store, exact = ld.GradientStore(tmp_path / "a"), ld.GradientStore(tmp_path / "b")
    assert store.ids.tolist() == ids.tolist() and len(store) == 13
    want = exact[:]
    torch_dtype = getattr(torch, dtype)
    expected = torch.from_numpy(want).to(torch_dtype).float().numpy()
    np.testing.assert_array_equal(store[:], expected)  # bit-exact after the dtype's own rounding
    np.testing.assert_array_equal(store.rows_for_ids([57, 90]), expected[[2, 0]])
    np.testing.assert_array_equal(store[3:9], expected[3:9])
    with pytest.raises(KeyError, match="sample id 1000"):
        store.rows_for_ids([1000])
    chunks = list(store.iter_chunks(4))
    assert [c[0] for c in chunks] == [0, 4, 8, 12]
    np.testing.assert_array_equal(np.concatenate([c[2] for c in chunks]), expected)
    with __import__("h5py").File(tmp_path / "a" / "shards" / "rank-00000.h5") as f:
        assert f.attrs["complete"] and f.attrs["storage_dtype"] == dtype
        assert f["grads"].dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
        layout = json.loads(f.attrs["layout"])
        assert [(layer["name"], layer["k_out"], layer["k_in"], layer["offset"]) for layer in layout] == [
            ("0", 2, 3, 0),
            ("2", 2, 3, 6),
            ("4", 2, 3, 12),
        ]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["total_rows"] == 13 and manifest["shards"][0]["path"] == "shards/rank-00000.h5"
    assert not list((tmp_path / "a" / "shards").glob("*.partial"))


def test_bf16_encoding_is_the_bit_pattern():
    x = torch.tensor([[1.0, -2.5, 3.14159, 1e-3]])
    codec = codec_for("bfloat16")
    stored = codec.encode(x)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, x.bfloat16().view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(codec.decode(stored).numpy(), x.bfloat16().float().numpy())


def test_config_json_round_trip_and_validation():
    cfg = ld.LoGraConfig(k_in=8, k_out=4, init="pca", include=["mlp"], damping=0.5)
    assert ld.LoGraConfig.from_json(cfg.to_json()) == cfg
    for bad, msg in (
        ({"k_in": 0}, "k_in must be a positive integer"),
        ({"storage_dtype": "int3"}, "storage_dtype='int3' is not one of"),
        ({"init": "svd"}, "init='svd'"),
        ({"damping": -1}, "damping"),
        ({"include": ["("]}, "not a valid regex"),
    ):
        with pytest.raises(ld.ConfigError, match=msg):
            ld.LoGraConfig(**bad)
    with pytest.raises(ld.ConfigError, match="unknown field"):
        ld.LoGraConfig.from_dict({"k_inn": 3})


def test_bad_layer_selection_is_a_clear_error(tmp_path):
    with pytest.raises(ld.ConfigError, match="select no Linear"):
        ld.attach(mlp(), ld.LoGraConfig(include=["nope"]), tmp_path)
    with pytest.raises(ld.ConfigError, match=r"ranks pattern\(s\) \['nope'\] match no logged layer"):
        ld.attach(mlp(), ld.LoGraConfig(ranks={"nope": [2, 2]}), tmp_path)


def test_complete_shard_is_never_overwritten(tmp_path):
    torch.manual_seed(0)
    model, X, Y = mlp(), torch.randn(4, 5), torch.randint(0, 3, (4,))
    cfg = ld.LoGraConfig(k_in=2, k_out=2)
    log_classifier(model, X, Y, tmp_path, cfg)
    with pytest.raises(ld.IndexFormatError, match=r"rank-00000\.h5: a complete shard already exists"):
        log_classifier(model, X, Y, tmp_path, cfg)
    assert len(ld.GradientStore(tmp_path)) == 4


def test_failed_attach_leaves_the_model_untouched(tmp_path):
    model, X, Y = mlp(), torch.randn(4, 5), torch.randint(0, 3, (4,))
    log_classifier(model, X, Y, tmp_path, ld.LoGraConfig(k_in=2, k_out=2))
    with pytest.raises(ld.IndexFormatError):
        ld.attach(model, ld.LoGraConfig(k_in=2, k_out=2), tmp_path)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
