"""What identifies the logged data: per-sample digests summed into one order-sensitive digest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from logra_dist.data.samples import TokenizedSample

# -- data identity ----------------------------------------------------------------------------------
# What a resumed job must see again to continue an index: the same samples (ids, token ids,
# labels) in the same order, cut at the same --max-length / --max-samples, under the same model
# dtype. A sample's digest keys its content by its position and id, so the index digest (their sum
# mod 2^64) is order-sensitive yet the same whatever the world size, and a rank's share can be
# summed on its own and all-reduced (`digest_words`).
_MASK64 = (1 << 64) - 1


def sample_digest(position: int, sample_id: int, input_ids: Sequence[int], labels: Sequence[int]) -> int:
    """64-bit digest of one sample: its position, id, token ids and labels (int32 bytes)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.array([position, sample_id, len(input_ids), len(labels)], "<i8").tobytes())
    h.update(np.asarray(input_ids, "<i4").tobytes())
    h.update(np.asarray(labels, "<i4").tobytes())
    return int.from_bytes(h.digest(), "little")


def samples_digest(samples: Sequence[TokenizedSample], first_position: int = 0, step: int = 1) -> int:
    """Sum mod 2^64 of the samples' digests, sample i at position first_position + i * step."""
    total = 0
    for i, s in enumerate(samples):
        total += sample_digest(first_position + i * step, s.id, s.input_ids, s.labels)
    return total & _MASK64


def digest_words(digest: int) -> torch.Tensor:
    """A digest as four 16-bit words (int64): their all-reduced sum is exact, `digest_from_words`."""
    return torch.tensor([(digest >> (16 * i)) & 0xFFFF for i in range(4)], dtype=torch.int64)


def digest_from_words(words: torch.Tensor) -> int:
    return sum(int(w) << (16 * i) for i, w in enumerate(words.tolist())) & _MASK64


@dataclass(frozen=True)
class DataIdentity:
    """The settings that decide which rows an index holds, recorded in every shard and the
    manifest; `--resume` refuses any difference (`compared`). `paths` as given, `abs_paths`
    resolved (None: the bundled corpus or an in-memory dataset)."""

    samples: int
    digest: str  # 16 hex digits: samples_digest of every logged sample
    max_length: int | None = None
    max_samples: int | None = None
    model_dtype: str | None = None
    paths: list[str] | None = None
    abs_paths: list[str] | None = None
    windows: list[int] | None = None  # --chunk: [window length, stride]; None: truncated documents

    @classmethod
    def of(cls, samples: Sequence[TokenizedSample], paths: Sequence[str] | None = None, **settings: Any):
        return cls.summed(len(samples), samples_digest(samples), paths, **settings)

    @classmethod
    def summed(cls, count: int, digest: int, paths: Sequence[str] | None = None, **settings: Any):
        """From a count and a digest already summed (over ranks, `digest_words`)."""
        given = [str(p) for p in paths] if paths else None
        absolute = [os.path.abspath(p) for p in given] if given else None
        return cls(count, f"{digest:016x}", paths=given, abs_paths=absolute, **settings)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["windows"] is None:  # absent unless chunked: the same record as before chunks existed
            del out["windows"]
        return out

    def compared(self) -> dict[str, Any]:
        """What must match to resume: everything but the paths as given (a relative path from
        another working directory names the same file when `abs_paths` agree)."""
        return {k: v for k, v in self.to_dict().items() if k != "paths"}
