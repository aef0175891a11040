"""Documents in, padded token batches with global sample ids out; knows nothing of LoGra.

A sample's id is its position in the document list (or the record's integer "id" field), fixed
before any sharding, so `--max-samples N` selects the same N samples whatever the world size,
and rank r takes samples r, r + world, r + 2 world, ... of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

IGNORE = -100


_SURROGATE = re.compile("[\ud800-\udfff]")
UTF8_FIX = "save the file as UTF-8 (e.g. `iconv -f <its encoding> -t utf-8`)"


def check_surrogates(text: str, where: str) -> None:
    """JSON escapes like "\\ud800" decode to a lone surrogate, which no tokenizer can encode."""
    found = _SURROGATE.search(text)
    if found:
        raise ValueError(
            f"{where}: lone surrogate {found.group()!r} (a \\uXXXX escape of half a UTF-16 pair, not UTF-8) at "
            f"character {found.start()}; replace it with the character it was meant to be, or drop it"
        )


def decode_text(raw: bytes, path: str | Path, line_no: int | None = None) -> str:
    """UTF-8 bytes as text; an error names the file, the line and the byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_no if line_no is not None else raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x}: {e.reason}); {UTF8_FIX}") from None
    return text  # strict UTF-8 never yields a surrogate; only JSON escapes can


def json_record(raw: bytes, path: str | Path, line_no: int) -> dict:
    """One jsonl line: valid UTF-8, a JSON object, no lone surrogate in its strings."""
    where = f"{path}:{line_no}"
    try:
        record = json.loads(decode_text(raw, path, line_no))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key, value in record.items():
        if isinstance(value, str):
            check_surrogates(value, f"{where}: field {key!r}")
    return record


@dataclass(frozen=True)
class Document:
    id: int
    text: str  # the part whose loss counts (the completion, for prompt/completion records)
    prompt: str = ""

    @property
    def full_text(self) -> str:
        return self.prompt + self.text


def record_to_document(record: dict, index: int, where: str) -> Document:
    doc_id = record.get("id", index)
    if not isinstance(doc_id, int) or isinstance(doc_id, bool) or doc_id < 0:
        raise ValueError(f"{where}: 'id' must be a non-negative integer, got {doc_id!r}")
    if "text" in record and isinstance(record["text"], str):
        return Document(doc_id, record["text"])
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return Document(doc_id, record["completion"], record["prompt"])
    raise ValueError(
        f'{where}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}, got keys {sorted(record)}'
    )


def read_documents(paths: str | Path | Sequence[str | Path]) -> list[Document]:
    """jsonl files (one record per line) or text files (documents separated by blank lines)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[Document] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        if path.suffix in (".jsonl", ".json"):
            with path.open("rb") as f:
                for line_no, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    record = json_record(raw, path, line_no)
                    docs.append(record_to_document(record, len(docs), f"{path}:{line_no}"))
        else:
            text = decode_text(path.read_bytes(), path)
            for para in (p.strip() for p in text.split("\n\n")):
                if para:
                    docs.append(Document(len(docs), para))
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"data {[str(p) for p in paths]}: duplicate document ids")
    if not docs:
        raise ValueError(f"data {[str(p) for p in paths]}: no documents")
    return docs


@dataclass
class TokenizedSample:
    id: int
    input_ids: list[int]
    labels: list[int]


def tokenize(docs: Sequence[Document], tokenizer, max_length: int) -> list[TokenizedSample]:
    """Prompt tokens get label IGNORE; documents longer than max_length are truncated."""
    out = []
    for d in docs:
        prompt_ids = (
            tokenizer(d.prompt, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
            if d.prompt
            else []
        )
        full_ids = tokenizer(d.full_text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if tokenizer.eos_token_id is not None and (not full_ids or full_ids[-1] != tokenizer.eos_token_id):
            full_ids = full_ids + [tokenizer.eos_token_id]
        n_prompt = len(prompt_ids) - (1 if prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id else 0)
        full_ids = full_ids[:max_length]
        labels = [IGNORE] * min(n_prompt, len(full_ids)) + full_ids[n_prompt:]
        if all(t == IGNORE for t in labels[1:]):
            raise ValueError(f"document {d.id}: no completion tokens left within max_length={max_length}")
        out.append(TokenizedSample(d.id, full_ids, labels))
    return out


@dataclass
class Batch:
    ids: torch.Tensor  # (B,) int64 global sample ids
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE on prompt and padding

    def to(self, device) -> Batch:
        return Batch(self.ids, self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(samples: Sequence[TokenizedSample], pad_id: int) -> Batch:
    length = max(len(s.input_ids) for s in samples)
    n = len(samples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for row, s in enumerate(samples):  # per-sample copy of token lists: data prep, not a hot path
        input_ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
        mask[row, : len(s.input_ids)] = 1
    return Batch(torch.tensor([s.id for s in samples], dtype=torch.long), input_ids, mask, labels)


def rank_samples(
    samples: Sequence[TokenizedSample], rank: int, world_size: int, max_samples: int | None = None
) -> list[TokenizedSample]:
    """The first max_samples samples, strided over ranks (uneven counts are fine)."""
    chosen = samples[:max_samples] if max_samples is not None else samples
    return list(chosen[rank::world_size])


def batches(samples: Sequence[TokenizedSample], batch_size: int, pad_id: int) -> Iterator[Batch]:
    for start in range(0, len(samples), batch_size):
        yield collate(samples[start : start + batch_size], pad_id)


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

    @classmethod
    def of(cls, samples: Sequence[TokenizedSample], paths: Sequence[str] | None = None, **settings: Any):
        given = [str(p) for p in paths] if paths else None
        absolute = [os.path.abspath(p) for p in given] if given else None
        return cls(len(samples), f"{samples_digest(samples):016x}", paths=given, abs_paths=absolute, **settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def compared(self) -> dict[str, Any]:
        """What must match to resume: everything but the paths as given (a relative path from
        another working directory names the same file when `abs_paths` agree)."""
        return {k: v for k, v in self.to_dict().items() if k != "paths"}


def summed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over samples of each sample's SUMMED next-token loss (per-sample gradients of a
    summed loss are what LoGra projects; a mean would rescale every sample differently)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its eos (Llama has no pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
