"""The scorer's stream reads shard bytes straight from the file where HDF5 stores rows as plain
bytes: the layout check must accept the shards this package writes and refuse anything else,
the raw reads must equal h5py's, and every row served must still be checked (fast path and
HDF5 fallback alike)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scorer_helpers import write_synthetic_index

import logra_dist as ld
from logra_dist.index import stream
from logra_dist.index.codecs import codec_for
from logra_dist.index.stream import ChunkStream, _Source, plain_runs
from logra_dist.index.verify import ShardInfo


def _shards(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("rank-*.h5"))


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"])
def test_the_shards_this_package_writes_take_the_raw_path(tmp_path, storage):
    write_synthetic_index(tmp_path, [7, 10], storage)
    for path in _shards(tmp_path):
        with h5py.File(path) as f:
            g = f["grads"]
            runs = plain_runs(g, g.dtype.itemsize)
            assert runs is not None and runs[0, 0] == 0
            assert runs[0, 1] == g.id.get_chunk_info(0).byte_offset


def test_layouts_that_are_not_plain_row_bytes_are_refused(tmp_path):
    rows = np.arange(40 * 6, dtype=np.float16).reshape(40, 6)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("gzip", data=rows, chunks=(4, 6), compression="gzip")
        f.create_dataset("big_endian", data=rows.astype(">f2"), chunks=(4, 6))
        f.create_dataset("half_rows", data=rows, chunks=(4, 3))
        f.create_dataset("unwritten", shape=(40, 6), dtype=np.float16, chunks=(4, 6))
        f.create_dataset("contiguous", data=rows)
        f.create_dataset("plain", data=rows, chunks=(4, 6))
    with h5py.File(tmp_path / "f.h5") as f:
        for name in ("gzip", "big_endian", "half_rows", "unwritten"):
            assert plain_runs(f[name], 2) is None, name
        assert plain_runs(f["plain"], 4) is None  # not the expected item size
        assert plain_runs(f["contiguous"], 2).tolist() == [[0, f["contiguous"].id.get_offset()]]
        assert plain_runs(f["plain"], 2) is not None


def _interleaved_shard(path: Path, n: int = 23, width: int = 5, chunk: int = 3) -> np.ndarray:
    """grads written chunk by chunk, last first, between writes of another dataset, with no
    chunk cache: its chunks are scattered over the file, out of row order, in several runs."""
    rows = np.random.default_rng(0).standard_normal((n, width)).astype(np.float16)
    with h5py.File(path, "w", rdcc_nbytes=0) as f:
        g = f.create_dataset("grads", shape=(n, width), dtype=np.float16, chunks=(chunk, width))
        other = f.create_dataset("other", shape=(n * 50,), dtype=np.float64, chunks=(50,))
        for c, lo in enumerate(reversed(range(0, n, chunk))):
            g[lo : lo + chunk] = rows[lo : lo + chunk]
            if c % 2:
                other[c * 50 : (c + 1) * 50] = c
    return rows


def test_raw_reads_equal_h5py_across_scattered_chunks(tmp_path):
    path = tmp_path / "s.h5"
    rows = _interleaved_shard(path)
    src = _Source(ShardInfo(path, len(rows), 0), 2, rows.shape[1] * 2, {})
    try:
        assert src.runs is not None and len(src.runs) > 2  # several runs: the boundaries are exercised
        for lo, hi in [(0, 23), (0, 1), (2, 4), (3, 6), (5, 22), (22, 23), (7, 7)]:
            out = np.full((hi - lo, rows.shape[1]), np.nan, np.float16)
            src.read(lo, hi, out, memoryview(out.reshape(-1).view(np.uint8)))
            np.testing.assert_array_equal(out, rows[lo:hi])
        os.truncate(path, int(src.runs[-1, 1]) + 2)  # the file loses its last chunk's bytes
        with pytest.raises(ld.IndexFormatError, match=r"s\.h5: rows 20\.\.23 unreadable: end of file"):
            out = np.empty((3, rows.shape[1]), np.float16)
            src.read(20, 23, out, memoryview(out.reshape(-1).view(np.uint8)))
    finally:
        src.close()


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("raw", [True, False])
def test_stream_in_small_pieces_equals_store_reads(tmp_path, monkeypatch, storage, raw):
    write_synthetic_index(tmp_path, [5, 0, 9, 4], storage)
    row_bytes = 12 * (4 if storage == "float32" else 2)
    for name in ("PIECE_BYTES", "IO_PIECE_BYTES"):  # pieces cut chunks and blocks
        monkeypatch.setattr(stream, name, 2 * row_bytes)
    if not raw:
        monkeypatch.setattr(stream, "plain_runs", lambda *a: None)  # the HDF5 fallback
    with ld.GradientStore(tmp_path) as store:
        for ranges, chunk in [([(0, 18)], 4), ([(2, 12)], 5), ([(0, 3), (6, 14), (17, 18)], 7)]:
            for decode in (True, False):
                seen = []
                for start, ids, rows, _ in ChunkStream(store, ranges, chunk, decode=decode):
                    want = store.read(start, start + len(ids))
                    if decode:
                        assert rows.dtype == torch.float32
                        np.testing.assert_array_equal(rows.numpy(), want)
                    else:
                        assert rows.dtype == codec_for(storage).h5_dtype
                        np.testing.assert_array_equal(codec_for(storage).decode(rows).numpy(), want)
                    seen += list(range(start, start + len(ids)))
                assert seen == [r for lo, hi in ranges for r in range(lo, hi)]


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("piece_rows", [1, 2, 100])
def test_a_flipped_byte_fails_the_stream_on_either_path(tmp_path, monkeypatch, raw, piece_rows):
    write_synthetic_index(tmp_path, [20], "float16")  # checksum blocks of 3 rows
    shard = _shards(tmp_path)[0]
    with h5py.File(shard) as f:
        offset = f["grads"].id.get_chunk_info(3).byte_offset + 12 * 2 + 5  # row 10 of block 9..12
    with open(shard, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    for name in ("PIECE_BYTES", "IO_PIECE_BYTES"):
        monkeypatch.setattr(stream, name, piece_rows * 12 * 2)
    if not raw:
        monkeypatch.setattr(stream, "plain_runs", lambda *a: None)
    with ld.GradientStore(tmp_path) as store:
        for ranges, chunk in [([(0, 20)], 4), ([(0, 20)], 20), ([(10, 11)], 4), ([(0, 10)], 3)]:
            for decode in (True, False):
                with pytest.raises(ld.IndexFormatError, match=r"rank-00000\.h5: rows 9\.\.12 fail their checksum"):
                    list(ChunkStream(store, ranges, chunk, decode=decode))
        assert sum(len(i) for _, i, _, _ in ChunkStream(store, [(0, 9), (12, 20)], 4)) == 17  # clean blocks


def test_stream_check_sees_every_block_at_any_piece_boundaries():
    from logra_dist.index.h5io import block_checksums, row_checksums
    from logra_dist.index.verify import StreamCheck

    rng = np.random.default_rng(1)
    rows = rng.integers(0, 2**16, (50, 6), dtype=np.uint16)
    sums = block_checksums(rows, 7)
    for trial in range(40):
        cuts = np.unique(np.r_[0, rng.integers(0, 51, rng.integers(0, 12)), 50])
        bad = int(rng.integers(0, len(sums)))
        info = ShardInfo(Path("x.h5"), 50, 0, 7, sums.copy())
        info.block_sums[bad] += np.uint64(trial % 2)  # odd trials: one block's recorded sum is wrong
        check = StreamCheck(info)
        lo, hi = sorted(int(x) for x in rng.integers(0, 51, 2))
        pieces = [(a, b) for a, b in itertools.pairwise(cuts) if a < hi and b > lo]
        pieces = [(max(a, lo), min(b, hi)) for a, b in pieces]
        if trial % 4 == 3 and pieces:  # a piece read twice
            pieces.append(pieces[0])
        touched = {b for a, z in pieces for b in range(a // 7, (z - 1) // 7 + 1)}
        try:
            for a, z in pieces:
                check.see_sums(a, row_checksums(rows[a:z]))
            check.finish(rows)
            failed = None
        except ld.IndexFormatError as e:
            failed = str(e)
        if trial % 2 and bad in touched:
            assert failed is not None and f"rows {bad * 7}..{min(bad * 7 + 7, 50)} fail" in failed, (trial, pieces)
        else:
            assert failed is None, (trial, pieces, failed)
            assert not check.pending


# -- records that are not whole words (int8: D + 4 L bytes) are read into zero-padded rows ----------
def _decoded_from_h5py(root: Path, storage: str, specs) -> np.ndarray:
    codec = codec_for(storage, specs)
    parts = []
    for path in _shards(root):
        with h5py.File(path) as f:
            parts.append(codec.decode(f["grads"][:]).numpy())
    return np.concatenate(parts)


@pytest.mark.parametrize("storage", ["int8", "int4", "sign"])
@pytest.mark.parametrize("raw", [True, False])
def test_padded_pieces_equal_the_decoded_records(tmp_path, monkeypatch, storage, raw):
    write_synthetic_index(tmp_path, [5, 0, 9, 4], storage)
    specs = [s for s in ld.GradientStore(tmp_path).layout]
    row_bytes = codec_for(storage, specs).bytes_per_row(12)
    assert row_bytes % 8  # 20, 14, 10 bytes: padded to 24, 16, 16
    monkeypatch.setattr(stream, "PADDED_ROW_MIN_BYTES", 1)
    monkeypatch.setattr(stream, "PIECE_BYTES", 2 * row_bytes)  # pieces cut chunks and blocks
    monkeypatch.setattr(stream, "IOV_MAX", 3)  # and one preadv reads at most 3 rows
    if not raw:
        monkeypatch.setattr(stream, "plain_runs", lambda *a: None)  # the HDF5 fallback
    want = _decoded_from_h5py(tmp_path, storage, specs)
    with ld.GradientStore(tmp_path) as store:
        for ranges, chunk in [([(0, 18)], 4), ([(2, 12)], 5), ([(0, 3), (6, 14), (17, 18)], 7)]:
            s = ChunkStream(store, ranges, chunk)
            assert s.padded
            seen = []
            for start, ids, rows, _ in s:
                np.testing.assert_array_equal(rows.numpy(), want[start : start + len(ids)])
                seen += list(range(start, start + len(ids)))
            assert seen == [r for lo, hi in ranges for r in range(lo, hi)]


def test_a_flipped_byte_fails_a_padded_stream(tmp_path, monkeypatch):
    write_synthetic_index(tmp_path, [20], "int8")  # 20-byte records, checksum blocks of 3 rows
    monkeypatch.setattr(stream, "PADDED_ROW_MIN_BYTES", 1)
    shard = _shards(tmp_path)[0]
    with h5py.File(shard) as f:
        offset = f["grads"].id.get_chunk_info(3).byte_offset + 20 + 19  # row 10's last byte (a scale's)
    with open(shard, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    with ld.GradientStore(tmp_path) as store:
        assert ChunkStream(store, [(0, 20)], 4).padded
        with pytest.raises(ld.IndexFormatError, match=r"rank-00000\.h5: rows 9\.\.12 fail their checksum"):
            list(ChunkStream(store, [(0, 20)], 4))


def test_row_reads_into_padded_rows_equal_h5py_and_name_a_truncated_row(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    rows = _interleaved_shard(path)  # 10-byte rows in scattered chunks of 3
    monkeypatch.setattr(stream, "IOV_MAX", 4)
    src = _Source(ShardInfo(path, len(rows), 0), 2, 10, {})
    padded = np.zeros((len(rows), 16), np.uint8)
    stage = padded[:, :10]
    views = [memoryview(r) for r in stage]
    try:
        for lo, hi in [(0, 23), (0, 1), (2, 4), (3, 6), (5, 22), (22, 23), (7, 7)]:
            padded[:] = 0
            src.read_rows(lo, hi, stage.view(np.float16), views)
            np.testing.assert_array_equal(stage[: hi - lo].view(np.float16), rows[lo:hi])
            assert not padded[:, 10:].any()  # the padding stays zero: the checksum sums it
        os.truncate(path, int(src.runs[-1, 1]) + 14)  # the last chunk keeps 1.4 rows
        with pytest.raises(ld.IndexFormatError, match=r"s\.h5: rows 20\.\.23 unreadable: end of file"):
            src.read_rows(20, 23, stage.view(np.float16), views)
    finally:
        src.close()


def test_wide_int8_records_take_the_padded_path_by_default(tmp_path):
    from logra_dist.core.projection import LayerSpec
    from logra_dist.index.writer import write_index

    specs = [LayerSpec("a", "linear", 20, 20, 17, 17)]  # 289 values + 4 scale bytes: 293 bytes
    rows = torch.randn(70, 289, generator=torch.Generator().manual_seed(0))
    cfg = ld.LoGraConfig(k_in=17, k_out=17, storage_dtype="int8", flush_rows=16)
    write_index(tmp_path, specs, cfg.to_json(), [[(torch.arange(40), rows[:40])], [(torch.arange(40, 70), rows[40:])]])
    want = _decoded_from_h5py(tmp_path, "int8", specs)
    with ld.GradientStore(tmp_path) as store:
        s = ChunkStream(store, [(0, 70)], 32)
        assert s.padded and s.row_bytes == 293
        got = np.concatenate([r.numpy().copy() for _, _, r, _ in s])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(store[:], want)
