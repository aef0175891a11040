"""Quantized row codecs (int8, int4, sign): bounded error per layer block, whole records under the
checksums, scores computed from exactly the decoded rows, statistics from the full-precision
rows, and resume of a quantized job exact."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from reference import log_classifier, mlp
from reliability_helpers import assert_same_index, run_mlp
from scorer_helpers import write_synthetic_index

import logra_dist as ld
from logra_dist.core.projection import LayerSpec
from logra_dist.index.codecs import codec_for
from logra_dist.index.h5io import block_checksums

QUANTIZED = ("int8", "int4", "sign")
# layer blocks of 5 and 7 values: the int4 record packs an odd width, sign a width not a multiple of 8
SPECS = [LayerSpec("a", "linear", 5, 5, 5, 1), LayerSpec("b", "linear", 7, 7, 1, 7)]
WIDTH = 12


def _rows(n: int = 40) -> torch.Tensor:
    rows = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(0))
    rows[:, 5:] *= 1000.0  # one layer's gradients 1000x the other's: its scale must not flatten layer a
    rows[3] = 0.0  # an all-zero row decodes to zeros
    return rows


@pytest.mark.parametrize("name", QUANTIZED)
def test_record_size_and_error_bound_per_layer_block(name):
    codec = codec_for(name, SPECS)
    values = {"int8": WIDTH, "int4": 6, "sign": 2}[name]
    assert codec.stored_width(WIDTH) == values + 4 * 2 == codec.bytes_per_row(WIDTH)
    rows = _rows()
    stored = codec.encode(rows)
    assert stored.dtype == np.uint8 and stored.shape == (len(rows), codec.stored_width(WIDTH))
    got = codec.decode(stored)
    assert got.dtype == torch.float32 and got.shape == rows.shape
    assert torch.equal(got[3], torch.zeros(WIDTH))
    for lo, hi in ((0, 5), (5, 12)):
        block, dec = rows[:, lo:hi], got[:, lo:hi]
        if name == "sign":  # sign codes and the block's mean |x|: the least-squares scale
            assert torch.equal(torch.sign(dec[block != 0]), torch.sign(block[block != 0]))
            torch.testing.assert_close(dec.abs().mean(1), block.abs().mean(1), rtol=1e-6, atol=0)
        else:
            levels = {"int8": 127, "int4": 7}[name]
            bound = block.abs().amax(1, keepdim=True) / (2 * levels)
            assert bool(((dec - block).abs() <= bound * (1 + 1e-5) + 1e-30).all()), name
    out = torch.full_like(rows, float("nan"))  # decoded piece by piece into a reader's buffer
    for lo in range(0, len(rows), 7):
        codec.decode(stored[lo : lo + 7], out[lo : lo + 7])
    assert torch.equal(out, got)
    # no rows (a batch whose every sample was non-finite appends none): an empty record block
    assert codec.encode(rows[:0]).shape == (0, codec.stored_width(WIDTH))
    assert codec.decode(codec.encode(rows[:0])).shape == (0, WIDTH)


@pytest.mark.parametrize("name", QUANTIZED)
def test_a_flipped_byte_in_values_or_scales_changes_one_block_checksum(name):
    codec = codec_for(name, SPECS)
    stored = codec.encode(_rows())
    sums = block_checksums(stored, 8)
    values = codec.stored_width(WIDTH) - 8
    for row, col in ((5, 0), (20, values), (39, codec.stored_width(WIDTH) - 1)):  # values, first and last scale byte
        flipped = stored.copy()
        flipped[row, col] ^= 0x04
        assert (block_checksums(flipped, 8) != sums).sum() == 1, (row, col)


def test_corrupted_scale_in_an_int8_shard_is_named_by_the_reader(tmp_path):
    write_synthetic_index(tmp_path / "idx", [9, 7], "int8")
    with h5py.File(tmp_path / "idx" / "shards" / "rank-00001.h5", "r+") as f:
        g = f["grads"]
        row = g[4]
        row[-1] ^= 0x01  # the last scale byte of row 4
        g[4] = row
    with ld.GradientStore(tmp_path / "idx") as store, pytest.raises(ld.IndexFormatError) as err:
        store[:]
    assert "rank-00001.h5" in str(err.value) and "fail their checksum" in str(err.value)


@pytest.mark.parametrize("name", QUANTIZED)
def test_store_rows_are_the_codec_decoding_of_what_was_written(tmp_path, name):
    given = write_synthetic_index(tmp_path / "idx", [9, 7], name)
    with ld.GradientStore(tmp_path / "idx") as store:
        codec = codec_for(name, store.layout)
        want = codec.decode(codec.encode(torch.from_numpy(given))).numpy()
        np.testing.assert_array_equal(store[:], want)
        chunks = np.concatenate([rows for _, _, rows in store.iter_chunks(4)])
        np.testing.assert_array_equal(chunks, want)


@pytest.mark.parametrize("mode", ["dot", "relatif"])
def test_scores_of_an_int8_index_are_those_of_its_decoded_rows(tmp_path, mode):
    """Statistics from the full-precision rows (equal to a float32 run's), scores from exactly the
    decoded stored rows (checked against a numpy computation on them)."""
    torch.manual_seed(0)
    X, Y = torch.randn(24, 5), torch.randint(0, 3, (24,))
    net = mlp()
    for dtype in ("float32", "int8"):
        cfg = ld.LoGraConfig(k_in=2, k_out=2, storage_dtype=dtype, flush_rows=8, hessian="raw")
        log_classifier(net, X, Y, tmp_path / dtype, cfg)
    with h5py.File(tmp_path / "float32" / "stats.h5") as a, h5py.File(tmp_path / "int8" / "stats.h5") as b:
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert names
        for n in names:
            np.testing.assert_array_equal(a[n][()], b[n][()], err_msg=n)
    with ld.GradientStore(tmp_path / "int8") as store, ld.GradientStore(tmp_path / "float32") as full:
        rows, exact = store[:].astype(np.float64), full[:].astype(np.float64)
        assert not np.array_equal(rows, exact)  # the codec did quantize
        np.testing.assert_allclose(rows, exact, atol=np.abs(exact).max() / 127)
        ids = store.ids
    scorer = ld.Scorer(None, tmp_path / "int8", mode=mode)
    queries = exact[:3]  # full-precision query rows
    scorer.add_query_gradients(queries, np.arange(3))
    got = scorer.scores()
    pre = scorer.preconditioner.apply(torch.from_numpy(queries)).numpy()
    want = pre @ rows.T
    if mode == "relatif":
        self_inf = np.einsum("nd,nd->n", scorer.preconditioner.apply(torch.from_numpy(rows)).numpy(), rows)
        want = want / np.sqrt(self_inf)[None, :]
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * np.abs(want).max())
    scorer.close()
    assert len(ids) == 24


def test_resume_of_an_int8_job_is_exact(tmp_path):
    args = ("--storage-dtype", "int8", "--hessian", "raw")
    ref = run_mlp(tmp_path / "ref", *args)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = run_mlp(tmp_path / "idx", *args, fault="kill_in_commit:2")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_mlp(tmp_path / "idx", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_index(tmp_path / "idx", tmp_path / "ref")
    with ld.GradientStore(tmp_path / "idx") as a, ld.GradientStore(tmp_path / "ref") as b:
        assert a.storage_dtype == "int8"
        order_a, order_b = np.argsort(a.ids), np.argsort(b.ids)
        np.testing.assert_array_equal(a[:][order_a], b[:][order_b])  # bit-identical rows
