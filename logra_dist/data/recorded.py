"""The training texts of an index, read back from the data it recorded and verified sample by
sample: each listed sample is tokenized again and its digest compared with the one the sample
table holds, so a changed or reordered file is refused (naming the first differing sample)
instead of showing another document's text beside a score. `--data` names moved files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from logra_dist.data.identity import sample_digest
from logra_dist.data.samples import MAX_CHUNKS, tokenize_documents
from logra_dist.data.sources import Item
from logra_dist.data.streaming import DataSpec, documents
from logra_dist.data.table import SampleTable


class DataChanged(ValueError):
    """The data named no longer holds what was logged."""


class RecordedTexts:
    """Callable sample id -> text (a window's own tokens, decoded, for chunked indexes); `load`
    reads and verifies the texts of the ids about to be listed, in one pass up to the last."""

    def __init__(
        self,
        index: str | Path,
        manifest: dict[str, Any],
        tokenizer,
        data: Sequence[str] | None = None,
        items: Callable[[], Iterable[Item]] | None = None,
    ):
        identity = manifest.get("data") or {}
        report = manifest.get("metadata", {}).get("data_report") or {}
        windows = identity.get("windows")
        self.paths = list(data) if data else identity.get("abs_paths")
        self.spec = DataSpec(
            self.paths,
            int(identity.get("max_length") or 0),
            chunk=windows is not None,
            stride=windows[1] if windows else None,
            skip_bad=bool(report.get("skipped")),
        )
        self.table = SampleTable(index)
        self.tokenizer, self._items = tokenizer, items
        self._texts: dict[int, str] = {}
        self.given = data is not None

    def __call__(self, sample_id: int) -> str | None:
        return self._texts.get(int(sample_id))

    def fields(self, sample_id: int) -> dict[str, Any]:
        """The document a sample comes from (its original id) and, for a window, its token offset."""
        row = int(self.table.rows([sample_id])[0])
        out: dict[str, Any] = {"document": self.table.document_key(int(self.table.doc_id[row]))}
        if self.spec.chunk:
            out["offset"] = int(self.table.offset[row])
        return out

    def load(self, sample_ids) -> None:
        ids = np.unique(np.asarray(sample_ids, np.int64))
        ids = ids[[int(i) not in self._texts for i in ids]]
        if not len(ids):
            return
        rows = self.table.rows(ids)
        doc_positions = self.table.position[rows] // (MAX_CHUNKS if self.spec.chunk else 1)
        wanted = set(doc_positions.tolist())
        expected = dict(zip(ids.tolist(), zip(self.table.position[rows].tolist(), self.table.digest[rows].tolist())))
        last = int(doc_positions.max())
        found: list[tuple[int, str, Any]] = []
        spec = DataSpec(self.spec.paths, self.spec.max_length, last + 1, self.spec.chunk, self.spec.stride, True)
        for position, where, doc in documents(spec, [], self._items() if self._items else None):
            if position in wanted:
                found.append((position, where, doc))
        if len(found) < len(wanted):
            missing = min(wanted - {p for p, _, _ in found})
            raise DataChanged(self._changed(f"it holds no document at position {missing} (shorter than logged)"))
        for i, s in tokenize_documents([d for _, _, d in found], self.tokenizer, spec.max_length, spec.windows):
            if isinstance(s, ValueError) or s.id not in expected:
                continue
            position, where, _ = found[i]
            digest_position, digest = expected[s.id]
            if sample_digest(digest_position, s.id, s.input_ids, s.labels) != digest:
                raise DataChanged(self._changed(f"sample {s.id} ({where}) differs from the one logged"))
            self._texts[s.id] = (
                found[i][2].full_text
                if not spec.chunk
                else self.tokenizer.decode(s.input_ids, skip_special_tokens=True)
            )
        absent = [int(i) for i in ids if int(i) not in self._texts]
        if absent:
            raise DataChanged(self._changed(f"sample {absent[0]} is not in it"))

    def _changed(self, what: str) -> str:
        named = "--data" if self.given else "the recorded data"
        return (
            f"training texts: {named} {self.paths} is not the data the index logged: {what}; "
            "pass --data with the files it was logged from"
        )
