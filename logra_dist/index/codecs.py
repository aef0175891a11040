"""Row codecs: how a row of D float32 values is stored in a shard, and read back as float32.

A codec stores each row as one fixed-size record of `stored_width(D)` items of `h5_dtype` (a
2-D HDF5 dataset of plain little-endian bytes), so the block checksums (`h5io.row_checksums`)
apply to the stored bytes whatever the codec, and the scorer's stream reads records with
`preadv` and decodes them piece by piece into its float32 buffers (`decode(stored, out)`).

A codec is built for one layer layout: `block_widths` are the layers' widths in row order, for
codecs whose records depend on it (a per-row, per-layer absmax int8 codec would store each
layer block's scale beside its values: `stored_width` = D + 4 * layers bytes). The float
codecs ignore it. The names are `config.STORAGE_DTYPES` (config cannot import the index; a test
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
        items = torch.from_numpy(np.ascontiguousarray(stored))
        if self.torch_dtype == torch.bfloat16:
            items = items.view(torch.bfloat16)
        if out is None:
            return items.float()
        return out.copy_(items)


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


def codec_for(storage_dtype: str, specs: list[LayerSpec] | None = None) -> RowCodec:
    """The codec named `storage_dtype` for rows of the layout `specs` (ConfigError if unknown)."""
    return CODECS.get(storage_dtype)([s.width for s in specs or []])
