"""Documents to token samples (truncated or cut into windows), and padded batches of them.

A document's tokens are its full text's (special tokens as the tokenizer adds them) plus eos;
prompt tokens get label IGNORE. `--max-length L` keeps the first L (the rest is counted as
truncated); `--chunk` instead cuts them into windows of L tokens every `stride` tokens, each a
sample carrying its document id and token offset. Where windows overlap, the overlap's labels
are IGNORE in the later window, so every token's loss is counted once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from logra_dist.data.text import Document

IGNORE = -100
MAX_CHUNKS = 1 << 16  # windows per document: a chunk's sample id is doc_id * MAX_CHUNKS + window


@dataclass
class TokenizedSample:
    id: int
    input_ids: list[int]
    labels: list[int]
    doc_id: int | None = None  # the document it comes from (None: the sample is the document)
    offset: int = 0  # its first token's position in the document's tokens
    truncated: int = 0  # tokens of the document cut off by --max-length (not chunked)


@dataclass(frozen=True)
class Windows:
    """--chunk: windows of `length` tokens starting every `stride` tokens (default: no overlap)."""

    length: int
    stride: int

    def starts(self, n: int) -> list[int]:
        out = []
        for start in range(0, max(n, 1), self.stride):
            out.append(start)
            if start + self.length >= n:
                break
        return out


def _token_lists(docs: Sequence[Document], tokenizer) -> tuple[list[list[int]], list[int]]:
    """(full token ids + eos, prompt token count) per document: one batched tokenizer call each."""
    full = tokenizer([d.full_text for d in docs], add_special_tokens=True, verbose=False)["input_ids"]
    prompts = [d.prompt for d in docs]
    n_prompt = [0] * len(docs)
    with_prompt = [i for i, p in enumerate(prompts) if p]
    if with_prompt:
        ids = tokenizer([prompts[i] for i in with_prompt], add_special_tokens=True, verbose=False)["input_ids"]
        for i, p in zip(with_prompt, ids):
            n_prompt[i] = len(p) - (1 if p and p[-1] == tokenizer.eos_token_id else 0)
    eos = tokenizer.eos_token_id
    if eos is not None:
        full = [f if f and f[-1] == eos else f + [eos] for f in full]
    return full, n_prompt


def tokenize_documents(
    docs: Sequence[Document], tokenizer, max_length: int, windows: Windows | None = None
) -> Iterator[tuple[int, TokenizedSample | ValueError]]:
    """(document's index in docs, sample) in order; a document with no loss tokens left yields a
    ValueError in its place (the caller raises it or, with --skip-bad, records it)."""
    full, n_prompt = _token_lists(docs, tokenizer)
    for i, (d, ids, n_p) in enumerate(zip(docs, full, n_prompt)):
        labels = [IGNORE] * min(n_p, len(ids)) + ids[n_p:]
        if windows is None:
            sample = TokenizedSample(
                d.id, ids[:max_length], labels[:max_length], truncated=max(len(ids) - max_length, 0)
            )
            if all(t == IGNORE for t in sample.labels[1:]):
                yield i, ValueError(f"document {d.id}: no completion tokens left within max_length={max_length}")
            else:
                yield i, sample
            continue
        starts = windows.starts(len(ids))
        if len(starts) > MAX_CHUNKS:
            yield i, ValueError(f"document {d.id}: {len(starts)} windows (> {MAX_CHUNKS}); use a larger --stride")
            continue
        kept = 0
        for w, start in enumerate(starts):
            window_labels = labels[start : start + windows.length]
            if w:  # the overlap with the previous window is context only
                overlap = max(starts[w - 1] + windows.length - start, 0)
                window_labels = [IGNORE] * min(overlap, len(window_labels)) + window_labels[overlap:]
            if all(t == IGNORE for t in window_labels[1:]):
                continue  # a window inside the prompt (or all overlap): nothing to attribute
            kept += 1
            yield (
                i,
                TokenizedSample(
                    d.id * MAX_CHUNKS + w, ids[start : start + windows.length], window_labels, doc_id=d.id, offset=start
                ),
            )
        if not kept:
            yield i, ValueError(f"document {d.id}: no completion tokens in any window")


def tokenize(docs: Sequence[Document], tokenizer, max_length: int) -> list[TokenizedSample]:
    """Prompt tokens get label IGNORE; documents longer than max_length are truncated."""
    out = []
    for _, sample in tokenize_documents(docs, tokenizer, max_length):
        if isinstance(sample, ValueError):
            raise sample
        out.append(sample)
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
