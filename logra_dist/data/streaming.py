"""A rank's share of the data, streamed: every rank reads the records (parsing only, cheap) up to
--max-samples documents, and tokenizes only its own (document position p goes to rank p mod
world), so memory and tokenizing time do not grow with the corpus or the world size.

Positions count the valid documents, so `--max-samples N` logs the same N documents whatever
the world size, also with `--skip-bad`. `RankShare.plan()` is the first pass: it checks ids,
counts, tokenizes and digests this rank's samples (the index's data identity is their sum over
ranks) and keeps one small row per sample (`TableRows`: id, document, token offset, digest);
`samples()` is the second pass that feeds the logger, tokenizing again instead of holding tokens.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from logra_dist.data.identity import DataIdentity, digest_from_words, digest_words, sample_digest
from logra_dist.data.samples import MAX_CHUNKS, TokenizedSample, Windows, tokenize_documents
from logra_dist.data.sources import Item, reader_for
from logra_dist.data.text import Document, native_id, record_to_document

BLOCK = 256  # documents per batched tokenizer call


@dataclass(frozen=True)
class DataSpec:
    """What to read and how to cut it; validated once (`check`), at the command line's edge."""

    paths: list[str] | None  # None: `items` given directly (the bundled corpus)
    max_length: int
    max_samples: int | None = None
    chunk: bool = False
    stride: int | None = None
    skip_bad: bool = False

    def check(self) -> DataSpec:
        if self.stride is not None and not self.chunk:
            raise ValueError("--stride needs --chunk (windows of --max-length tokens every --stride tokens)")
        if self.stride is not None and not 1 <= self.stride <= self.max_length:
            raise ValueError(f"--stride must be in 1..--max-length ({self.max_length}), got {self.stride}")
        return self

    @property
    def windows(self) -> Windows | None:
        return Windows(self.max_length, self.stride or self.max_length) if self.chunk else None


@dataclass
class Skipped:
    where: str
    reason: str
    id: Any = None
    tokens: bool = False  # found by tokenizing (on the document's rank), not by reading (on every rank)

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "id": self.id, "reason": self.reason}


class BadSample(ValueError):
    """A record that cannot be logged, without --skip-bad."""


def _fail(where: str, reason: str) -> BadSample:
    """reason names where already (every reader's message starts with file:line)."""
    return BadSample(f"{reason}; fix the record or pass --skip-bad to log the rest (skips listed in the index)")


def documents(
    spec: DataSpec, skipped: list[Skipped], items: Iterable[Item] | None = None
) -> Iterator[tuple[int, str, Document]]:
    """(position, where, document) of the valid documents, in order, at most spec.max_samples of them.
    Bad records raise (naming file and line) or, with skip_bad, go to `skipped`. A source mixing
    integer ids with other ids is refused: an integer id could collide with a mapped position."""
    sources: list[Iterable[Item]] = [items] if items is not None else [reader_for(p).items() for p in spec.paths or []]
    position, native = 0, None
    for source in sources:
        for where, record in source:
            if spec.max_samples is not None and position >= spec.max_samples:
                return
            try:
                if isinstance(record, ValueError):
                    raise record
                doc = record_to_document(record, position, where)
                has_id = record.get("id") is not None  # a null id is no id
                kind = has_id and native_id(record["id"])
                if has_id and native is not None and kind != native:
                    raise ValueError(
                        f"{where}: id {record['id']!r} mixes integer ids with other ids; give every record "
                        "the same kind of id (or none)"
                    )
                native = kind if has_id else native
            except ValueError as e:
                if not spec.skip_bad:
                    raise _fail(where, str(e)) from None
                key = record.get("id") if isinstance(record, dict) else None
                skipped.append(Skipped(where, str(e).removeprefix(f"{where}: "), key))
                continue
            yield position, where, doc
            position += 1


@dataclass
class TableRows:
    """One row per logged sample of a rank: the index keeps it (`samples/rank-NNNNN.h5`) to map
    sample ids to documents, token offsets and original ids, and to verify texts by digest
    (read back by `data.table.SampleTable`)."""

    sample_id: array = field(default_factory=lambda: array("q"))
    doc_id: array = field(default_factory=lambda: array("q"))
    position: array = field(default_factory=lambda: array("q"))
    offset: array = field(default_factory=lambda: array("q"))
    digest: array = field(default_factory=lambda: array("Q"))
    keys: dict[int, str] = field(default_factory=dict)  # doc id -> JSON of the record's own id

    def add(self, s: TokenizedSample, position: int, digest: int) -> None:
        self.sample_id.append(s.id), self.doc_id.append(s.id if s.doc_id is None else s.doc_id)
        self.position.append(position), self.offset.append(s.offset), self.digest.append(digest)

    def arrays(self) -> dict[str, np.ndarray]:
        names = ("sample_id", "doc_id", "position", "offset", "digest")
        return {n: np.frombuffer(getattr(self, n), np.uint64 if n == "digest" else np.int64) for n in names}


@dataclass
class Plan:
    """What the first pass found: global counts (the same on every rank) and this rank's share."""

    documents: int
    doc_ids: np.ndarray
    samples: int = 0  # this rank's
    digest: int = 0  # this rank's sum mod 2^64
    truncated_docs: int = 0
    truncated_tokens: int = 0
    table: TableRows = field(default_factory=TableRows)
    skipped: list[Skipped] = field(default_factory=list)  # parse-level ones on rank 0, own token-level ones


class RankShare:
    def __init__(self, spec: DataSpec, tokenizer, rank: int, world: int, items: Callable[[], Iterable[Item]] | None):
        self.spec, self.tokenizer, self.rank, self.world = spec.check(), tokenizer, rank, world
        self._items = items

    def _mine(
        self, skipped: list[Skipped], ids: array | None = None, keys: dict[int, str] | None = None
    ) -> Iterator[list[tuple[int, str, Document]]]:
        block: list[tuple[int, str, Document]] = []
        for position, where, doc in documents(self.spec, skipped, self._items() if self._items else None):
            if ids is not None:
                ids.append(doc.id)
            if position % self.world == self.rank:
                if keys is not None and doc.key is not None:
                    keys[doc.id] = json.dumps(doc.key)
                block.append((position, where, doc))
                if len(block) == BLOCK:
                    yield block
                    block = []
        if block:
            yield block

    def _tokenized(
        self, skipped: list[Skipped], ids: array | None = None, keys: dict[int, str] | None = None
    ) -> Iterator[tuple[int, TokenizedSample]]:
        """(digest position, sample); a document that tokenizes to nothing is raised or skipped."""
        for block in self._mine(skipped, ids, keys):
            docs = [d for _, _, d in block]
            for i, s in tokenize_documents(docs, self.tokenizer, self.spec.max_length, self.spec.windows):
                position, where, doc = block[i]
                if isinstance(s, ValueError):
                    reason = str(s).split(": ", 1)[1]
                    if not self.spec.skip_bad:
                        raise _fail(where, f"{where}: {reason}") from None
                    skipped.append(Skipped(where, reason, doc.key if doc.key is not None else doc.id, tokens=True))
                    continue
                window = s.id - doc.id * MAX_CHUNKS if s.doc_id is not None else 0
                yield (position * MAX_CHUNKS + window if s.doc_id is not None else position), s

    def plan(self) -> Plan:
        skipped: list[Skipped] = []
        ids = array("q")
        table, digest, samples, trunc_docs, trunc_tokens = TableRows(), 0, 0, 0, 0
        keys: dict[int, str] = {}
        for position, s in self._tokenized(skipped, ids, keys):
            d = sample_digest(position, s.id, s.input_ids, s.labels)
            table.add(s, position, d)
            digest, samples = digest + d, samples + 1
            trunc_docs, trunc_tokens = trunc_docs + (s.truncated > 0), trunc_tokens + s.truncated
        doc_ids = np.frombuffer(ids, np.int64)
        if len(doc_ids) == 0 and not skipped:
            raise ValueError(f"data {self.spec.paths}: no documents")
        check_unique(doc_ids, self.spec.paths, self.spec.chunk)
        table.keys = keys
        return Plan(
            len(doc_ids),
            doc_ids,
            samples,
            digest & ((1 << 64) - 1),
            trunc_docs,
            trunc_tokens,
            table,
            skipped if self.rank == 0 else [s for s in skipped if s.tokens],
        )

    def samples(self, skip: set[int] | None = None) -> Iterator[TokenizedSample]:
        """The second pass: this rank's samples in order, those in `skip` (already logged) left out."""
        for _, s in self._tokenized([]):
            if not skip or s.id not in skip:
                yield s


def check_unique(doc_ids: np.ndarray, paths: Sequence[str] | None, chunked: bool = False) -> None:
    """No two documents share an id; with --chunk, ids leave room for the window number."""
    order = np.sort(doc_ids, kind="stable")
    dup = order[1:][np.diff(order) == 0]
    if len(dup):
        raise ValueError(f"data {[str(p) for p in paths or []]}: duplicate document ids (first: {int(dup[0])})")
    if chunked and len(order) and order[-1] >= (1 << 63) // MAX_CHUNKS:
        raise ValueError(f"data {paths}: document id {int(order[-1])} too large for --chunk (ids must be < 2^47)")


def read_documents(paths: str | Path | Sequence[str | Path]) -> list[Document]:
    """Every document of the files, in memory (small inputs: queries, tests); bad records raise."""
    names = [str(paths)] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    docs = [d for _, _, d in documents(DataSpec(names, 1), [])]
    if not docs:
        raise ValueError(f"data {names}: no documents")
    check_unique(np.array([d.id for d in docs], np.int64), names)
    return docs


def plan_identity(share: RankShare, all_reduce: Callable[[Any], Any], model_dtype: str | None = None):
    """Collective through `all_reduce` (a sum over ranks of an int64 tensor: `comm.all_reduce_sum`):
    the first pass over this rank's share, and the data identity and report summed over ranks
    (the same on every rank, for any world size). Returns (plan, DataIdentity, report)."""
    import torch

    plan = share.plan()
    counts = [plan.samples, plan.truncated_docs, plan.truncated_tokens, len(plan.skipped)]
    sums = all_reduce(torch.cat([digest_words(plan.digest), torch.tensor(counts, dtype=torch.int64)]))
    samples, truncated_docs, truncated_tokens, skipped = (int(v) for v in sums[4:])
    spec = share.spec
    windows = [spec.windows.length, spec.windows.stride] if spec.windows else None
    identity = DataIdentity.summed(
        samples,
        digest_from_words(sums[:4]),
        spec.paths,
        max_length=spec.max_length,
        max_samples=spec.max_samples,
        model_dtype=model_dtype,
        windows=windows,
    )
    report = {
        "documents": plan.documents,
        "samples": samples,
        "truncated_documents": truncated_docs,
        "truncated_tokens": truncated_tokens,
        "skipped": skipped,
        "chunk": windows,
        "table": "samples/rank-*.h5",
        "skipped_files": "samples/skipped-rank-*.jsonl" if skipped else None,
    }
    return plan, identity, report


def data_summary(report: dict[str, Any], max_length: int) -> str:
    parts = [f"{report['documents']} documents -> {report['samples']} samples"]
    if report["chunk"]:
        parts.append(f"windows of {report['chunk'][0]} tokens every {report['chunk'][1]}")
    elif report["truncated_documents"]:
        parts.append(
            f"{report['truncated_documents']} truncated at --max-length {max_length} "
            f"({report['truncated_tokens']} tokens dropped; --chunk keeps them)"
        )
    if report["skipped"]:
        parts.append(f"{report['skipped']} skipped (--skip-bad; listed in {report['skipped_files']})")
    return "data: " + ", ".join(parts)
