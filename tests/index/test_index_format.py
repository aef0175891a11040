"""The index format's pieces on their own: row codecs (registered, round trip, record size,
checksummed as stored) and the one manifest builder (the Logger's and write_index's agree)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from reference import log_classifier, mlp
from scorer_helpers import write_synthetic_index

import logra_dist as ld
from logra_dist.config import STORAGE_DTYPES
from logra_dist.core.projection import LayerSpec
from logra_dist.index.codecs import CODECS, RowCodec, codec_for
from logra_dist.index.format import FORMAT_VERSION, Manifest, ShardAttrs, read_manifest
from logra_dist.index.h5io import block_checksums, row_checksums
from logra_dist.index.writer import write_index

SPECS = [LayerSpec("a", "linear", 4, 4, 2, 3), LayerSpec("b", "linear", 4, 4, 3, 2)]


def test_codec_names_are_the_configs_storage_dtypes():
    assert sorted(CODECS.names()) == sorted(STORAGE_DTYPES)
    for name in STORAGE_DTYPES:
        assert issubclass(CODECS.get(name), RowCodec) and CODECS.get(name).name == name
    with pytest.raises(ld.ConfigError, match="unknown storage codec 'int3'"):
        codec_for("int3")


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])  # quantized ones: test_codecs.py
def test_codec_round_trip_record_size_and_checksum(name):
    codec = codec_for(name, SPECS)
    assert codec.block_widths == (6, 6)
    rows = torch.randn(9, 12, generator=torch.Generator().manual_seed(0)) * 100
    stored = codec.encode(rows)
    assert stored.dtype == codec.h5_dtype and stored.shape == (9, codec.stored_width(12))
    assert stored.flags.c_contiguous and stored.nbytes == 9 * codec.bytes_per_row(12)
    assert codec.bytes_per_row(12) == {"float32": 48, "float16": 24, "bfloat16": 24}[name]
    want = rows.to(getattr(torch, name)).float()
    torch.testing.assert_close(codec.decode(stored), want, rtol=0, atol=0)
    out = torch.full((9, 12), float("nan"))  # decoding into a reader's buffer, piece by piece
    for lo in range(0, 9, 4):
        assert codec.decode(stored[lo : lo + 4], out[lo : lo + 4]).data_ptr() == out[lo:].data_ptr()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    # whole fixed-size records: the block checksums of the stored bytes see any flipped byte
    sums = block_checksums(stored, 4)
    for byte in (0, stored.nbytes // 2, stored.nbytes - 1):
        flipped = stored.copy()
        flipped.reshape(-1).view(np.uint8)[byte] ^= 0x10
        assert (block_checksums(flipped, 4) != sums).sum() == 1, byte
        assert (row_checksums(flipped) != row_checksums(stored)).sum() == 1


def test_a_codec_is_one_registered_subclass():
    class Halves(RowCodec):  # a record layout other than one item per value
        name = "test-halves"
        h5_dtype = np.dtype(np.float16)
        torch_dtype = torch.float16

        def stored_width(self, width: int) -> int:
            return 2 * width

    try:
        assert CODECS.get("test-halves") is Halves and codec_for("test-halves").bytes_per_row(5) == 20
    finally:
        CODECS._classes.pop("test-halves")


def test_logger_and_write_index_build_the_same_manifest(tmp_path):
    torch.manual_seed(0)
    X, Y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    cfg = ld.LoGraConfig(k_in=2, k_out=2, storage_dtype="float16", flush_rows=4)
    logged = log_classifier(mlp(), X, Y, tmp_path / "logged", cfg)
    on_disk = json.loads((tmp_path / "logged" / "manifest.json").read_text())
    store = ld.GradientStore(tmp_path / "logged")
    rows = store[:]
    built = write_index(tmp_path / "built", store.layout, cfg.to_json(), [[(store.ids, rows)]], model=logged["model"])
    assert set(logged) == set(on_disk) == set(built) == {f.name for f in Manifest.__dataclass_fields__.values()}
    assert read_manifest(tmp_path / "built" / "manifest.json") == built
    assert built["format_version"] == logged["format_version"] == FORMAT_VERSION
    for key in ("config", "layout", "width", "world_size", "shards", "total_rows", "nonfinite_total", "model"):
        assert built[key] == logged[key], key
    assert logged["samples_in_statistics"] == 6 and built["samples_in_statistics"] == 0
    assert logged["engine"] == "module" and built["engine"] is None and built["versions"] == logged["versions"]
    with ld.GradientStore(tmp_path / "built") as again:  # readers accept what the builder writes
        np.testing.assert_array_equal(again[:], rows)
        assert again.ids.tolist() == store.ids.tolist()


def test_shard_attrs_are_what_a_shard_carries(tmp_path):
    write_synthetic_index(tmp_path, [4, 3], "bfloat16")
    manifest = read_manifest(tmp_path / "manifest.json")
    for rank in range(2):
        want = ShardAttrs.for_job(
            SPECS, ld.LoGraConfig.from_dict(manifest["config"]).to_json(), "bfloat16", rank, 2, None
        )
        assert want == ShardAttrs.from_manifest(manifest, rank)
        with h5py.File(tmp_path / "shards" / f"rank-0000{rank}.h5") as f:
            assert {k: f.attrs[k] for k in want.to_dict()} == want.to_dict()
