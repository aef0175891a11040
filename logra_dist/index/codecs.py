"""Row codecs: how a row of D float32 values is stored in a shard, and read back as float32.

A codec stores each row as one fixed-size record of `stored_width(D)` items of `h5_dtype` (a
2-D HDF5 dataset of plain little-endian bytes), so the block checksums (`h5io.row_checksums`)
apply to the stored bytes whatever the codec, and the scorer's stream reads records with
`preadv` and decodes them piece by piece into its float32 buffers (`decode(stored, out)`).

A codec is built for one layer layout: `block_widths` are the layers' widths in row order, for
codecs whose records depend on it. The float codecs ignore it; the quantized ones (`int8`,
`int4`, `sign`, as in QLESS: 1-8 bit gradient stores) keep one float32 scale per row and layer
block after the packed values, so a layer with large gradients never flattens a small one, and
a record stays one fixed-size run of bytes (`stored_width` = packed values + 4 x layers).
The names are `config.STORAGE_DTYPES` (config cannot import the index; a test
checks that the two agree). HDF5 has no bfloat16: bf16 rows are stored as their uint16 bit
pattern, the shard's `storage_dtype` attribute naming the codec.

Adding a codec is one subclass with its own `name`: it registers itself in CODECS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

from logra_dist.core.projection import LayerSpec
from logra_dist.registry import Registry

CODECS: Registry[RowCodec] = Registry("storage codec")


class RowCodec:
    """float32 rows <-> stored records. Subclasses set `name` and `h5_dtype` (and override
    `stored_width`, `encode`, `decode` when a record is not one stored item per value)."""

    name: ClassVar[str]
    h5_dtype: ClassVar[np.dtype]  # dtype of the stored records' items (the HDF5 dataset's)
    torch_dtype: ClassVar[torch.dtype]  # the items as torch reads them (float codecs)
    # The stored records are the float32 rows themselves: a reader may read them straight into
    # its float32 buffer, with no decode step.
    passthrough: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CODECS.register(cls)

    def __init__(self, block_widths: Sequence[int] = ()):
        self.block_widths = tuple(int(w) for w in block_widths)

    def stored_width(self, width: int) -> int:
        """Items of `h5_dtype` in the stored record of a row of `width` values."""
        return width

    def bytes_per_row(self, width: int) -> int:
        return self.stored_width(width) * self.h5_dtype.itemsize

    def encode(self, rows: torch.Tensor) -> np.ndarray:
        """(n, width) rows -> (n, stored_width) records of `h5_dtype`, C-contiguous."""
        rows = rows.detach().cpu().to(self.torch_dtype)
        return rows.view(torch.uint16).numpy() if self.torch_dtype == torch.bfloat16 else rows.numpy()

    def decode(self, stored: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """(n, stored_width) records -> (n, width) float32, into `out` when given (a reader's
        reused buffer, e.g. a slice of the stream's) and returned."""
        items = torch.from_numpy(_rows_view(stored))
        if self.torch_dtype == torch.bfloat16:
            items = items.view(torch.bfloat16)
        if out is None:
            return items.float()
        return out.copy_(items)


def _rows_view(stored: np.ndarray) -> np.ndarray:
    """`stored` itself when torch can view it (rows of contiguous items, at any row stride: a
    stream's padded piece), else a contiguous copy."""
    if stored.ndim != 2 or stored.strides[1] != stored.itemsize:
        return np.ascontiguousarray(stored)
    row, item = stored.strides[0], stored.itemsize
    return stored if row % item == 0 and row >= item * stored.shape[1] else np.ascontiguousarray(stored)


class Float32Codec(RowCodec):
    name = "float32"
    h5_dtype = np.dtype(np.float32)
    torch_dtype = torch.float32
    passthrough = True


class Float16Codec(RowCodec):
    name = "float16"
    h5_dtype = np.dtype(np.float16)
    torch_dtype = torch.float16


class BFloat16Codec(RowCodec):
    """bfloat16 as its uint16 bit pattern (HDF5 has no bfloat16)."""

    name = "bfloat16"
    h5_dtype = np.dtype(np.uint16)
    torch_dtype = torch.bfloat16


class BlockQuantized(RowCodec):
    """Values quantized per row and layer block against that block's own scale; a record is the
    packed values (`value_bytes`) then the block scales as little-endian float32. Statistics are
    never computed from these rows: the Logger feeds the curvature the full-precision rows
    before they are encoded. Subclasses define `_quantize` (rows, per-column scale -> codes)
    and `_dequantize_into` (codes -> values in units of the scale, into the output) and how a block's scale is taken."""

    h5_dtype = np.dtype(np.uint8)

    def _blocks(self, width: int) -> tuple[int, ...]:
        blocks = self.block_widths or (width,)
        if sum(blocks) != width:
            raise ValueError(f"{self.name} codec: layer blocks {blocks} do not add up to a row of {width} values")
        return blocks

    def value_bytes(self, width: int) -> int:
        raise NotImplementedError

    def stored_width(self, width: int) -> int:
        return self.value_bytes(width) + 4 * len(self._blocks(width))

    def _scales(self, rows: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
        """(n, L) float32 scale of each row's layer blocks."""
        raise NotImplementedError

    def encode(self, rows: torch.Tensor) -> np.ndarray:
        rows = rows.detach().cpu().float()
        n, width = rows.shape
        blocks = self._blocks(width)
        scales = self._scales(rows, blocks)
        per_column = torch.repeat_interleave(scales, torch.tensor(blocks), dim=1)
        codes = self._quantize(rows, per_column)
        record = np.empty((n, self.stored_width(width)), np.uint8)
        vb = self.value_bytes(width)
        record[:, :vb] = codes
        record[:, vb:] = scales.numpy().astype("<f4").view(np.uint8).reshape(n, 4 * len(blocks))  # n may be 0
        return record

    def decode(self, stored: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes straight into `out` as float32, then each run of equal-width layer blocks scaled by
        one broadcast multiply (one op for the usual layout of equal layers, not one per layer)."""
        n = stored.shape[0]
        blocks = self.block_widths or (self._width_of(stored.shape[1] - 4),)
        width = sum(blocks)
        vb = self.value_bytes(width)
        if out is None:
            out = torch.empty(n, width)
        self._dequantize_into(stored[:, :vb], out)
        scales = torch.from_numpy(np.array(stored[:, vb:]).view("<f4").astype(np.float32, copy=False))  # aligned copy
        for first, count, col, w in _runs(blocks):
            out[:, col : col + count * w].view(n, count, w).mul_(scales[:, first : first + count, None])
        return out

    def _dequantize_into(self, values: np.ndarray, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _width_of(self, value_bytes: int) -> int:
        raise ValueError(f"{self.name} codec: a layer layout is needed to decode rows")


def _runs(blocks: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    """(first block, count, first column, width) of each run of consecutive equal-width blocks."""
    runs: list[list[int]] = []
    col = 0
    for i, w in enumerate(blocks):
        if runs and runs[-1][3] == w:
            runs[-1][1] += 1
        else:
            runs.append([i, 1, col, w])
        col += w
    return [tuple(r) for r in runs]


class Int8Codec(BlockQuantized):
    """Symmetric 8-bit: code = round(127 x / absmax of the block), value = code x absmax / 127
    (error at most absmax / 254 per value). 0.25x the bytes of float32, 0.5x of float16."""

    name = "int8"

    def value_bytes(self, width: int) -> int:
        return width

    def _width_of(self, value_bytes: int) -> int:
        return value_bytes

    def _scales(self, rows: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([b.abs().amax(1) for b in rows.split(blocks, 1)], 1) / 127.0

    def _quantize(self, rows: torch.Tensor, per_column: torch.Tensor) -> np.ndarray:
        codes = torch.where(per_column > 0, rows / per_column.clamp_min(1e-38), 0.0).round_().clamp_(-127, 127)
        return codes.to(torch.int8).numpy().view(np.uint8)

    def _dequantize_into(self, values: np.ndarray, out: torch.Tensor) -> None:
        out.copy_(torch.from_numpy(values.view(np.int8)))


class Int4Codec(BlockQuantized):
    """Symmetric 4-bit, two values a byte: code in -7..7 against absmax / 7 of the block (error at
    most absmax / 14), stored as code + 8 in a nibble (low nibble first)."""

    name = "int4"

    def value_bytes(self, width: int) -> int:
        return (width + 1) // 2

    def _scales(self, rows: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([b.abs().amax(1) for b in rows.split(blocks, 1)], 1) / 7.0

    def _quantize(self, rows: torch.Tensor, per_column: torch.Tensor) -> np.ndarray:
        codes = torch.where(per_column > 0, rows / per_column.clamp_min(1e-38), 0.0).round_().clamp_(-7, 7) + 8
        codes = codes.to(torch.uint8).numpy()
        if codes.shape[1] % 2:
            codes = np.concatenate([codes, np.full((codes.shape[0], 1), 8, np.uint8)], 1)
        return codes[:, 0::2] | (codes[:, 1::2] << 4)

    def _dequantize_into(self, values: np.ndarray, out: torch.Tensor) -> None:
        byte = torch.from_numpy(values)
        codes = torch.stack((byte & 15, byte >> 4), 2).reshape(len(values), 2 * values.shape[1])[:, : out.shape[1]]
        out.copy_(codes).sub_(8.0)


class SignCodec(BlockQuantized):
    """1 bit a value (its sign; 0 counts as +) and the block's mean |value| as its scale, the
    least-squares scale for sign codes, as QLESS stores gradients: 1/32 of float32."""

    name = "sign"

    def value_bytes(self, width: int) -> int:
        return (width + 7) // 8

    def _scales(self, rows: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([b.abs().mean(1) for b in rows.split(blocks, 1)], 1)

    def _quantize(self, rows: torch.Tensor, per_column: torch.Tensor) -> np.ndarray:
        return np.packbits((rows >= 0).numpy(), axis=1, bitorder="little")

    _SHIFTS = torch.arange(8, dtype=torch.uint8)

    def _dequantize_into(self, values: np.ndarray, out: torch.Tensor) -> None:
        bits = (torch.from_numpy(values)[:, :, None] >> self._SHIFTS) & 1  # low bit first
        out.copy_(bits.reshape(len(values), 8 * values.shape[1])[:, : out.shape[1]]).mul_(2.0).sub_(1.0)


def codec_for(storage_dtype: str, specs: list[LayerSpec] | None = None) -> RowCodec:
    """The codec named `storage_dtype` for rows of the layout `specs` (ConfigError if unknown)."""
    return CODECS.get(storage_dtype)([s.width for s in specs or []])
