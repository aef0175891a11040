"""The query texts of `logra-dist score --queries`, read lazily so memory does not grow with them.

One validating pass over the files (UTF-8, JSON, ids, duplicates: every error before any model
loads) keeps only each document's id and where it lies (file, byte offset, length). Chunks are
consecutive ranges of the sorted ids, read back by offset when they are scored, so results
concatenate in id order exactly as one pass over all queries (every rank makes the same chunks).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from logra_dist.data import Document, decode_text, json_record, record_to_document


class QueryFile:
    def __init__(self, paths: str | Path | Sequence[str | Path]):
        self.paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        ids, files, offsets, sizes = array("q"), array("q"), array("q"), array("q")
        for f_no, path in enumerate(self.paths):
            if not path.exists():
                raise FileNotFoundError(f"data file {path} does not exist")
            for doc, offset, size in _scan(path, len(ids)):
                ids.append(doc.id), files.append(f_no), offsets.append(offset), sizes.append(size)
        where = f"data {[str(p) for p in self.paths]}"
        if not ids:
            raise ValueError(f"{where}: no documents")
        self.ids = np.frombuffer(ids, np.int64)
        self._order = np.argsort(self.ids, kind="stable")
        if bool((np.diff(self.ids[self._order]) == 0).any()):
            raise ValueError(f"{where}: duplicate document ids")
        self._files, self._offsets, self._sizes = (np.frombuffer(a, np.int64) for a in (files, offsets, sizes))

    def __len__(self) -> int:
        return len(self.ids)

    def chunks(self, size: int) -> Iterator[list[Document]]:
        """Documents in id order, `size` at a time (read from disk chunk by chunk)."""
        fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        try:
            for a in range(0, len(self.ids), size):
                yield [self._read(fds, int(i)) for i in self._order[a : a + size]]
        finally:
            for fd in fds:
                os.close(fd)

    def _read(self, fds: list[int], i: int) -> Document:
        f_no, offset, size = int(self._files[i]), int(self._offsets[i]), int(self._sizes[i])
        raw, path = os.pread(fds[f_no], size, offset), self.paths[f_no]
        if path.suffix in (".jsonl", ".json"):
            return record_to_document(json_record(raw, path, -1), int(self.ids[i]), str(path))
        return Document(int(self.ids[i]), decode_text(raw, path).strip())


def _scan(path: Path, first_id: int) -> Iterator[tuple[Document, int, int]]:
    """(document, byte offset, byte length) of each document, validated as data.read_documents."""
    if path.suffix in (".jsonl", ".json"):
        offset, n = 0, first_id
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():
                    yield record_to_document(json_record(raw, path, line_no), n, f"{path}:{line_no}"), offset, len(raw)
                    n += 1
                offset += len(raw)
        return
    raw = path.read_bytes()
    decode_text(raw, path)
    offset, n = 0, first_id
    for part in raw.split(b"\n\n"):  # "\n" is never inside a UTF-8 sequence: same split as the text
        text = part.decode("utf-8").strip()
        if text:
            yield Document(n, text), offset, len(part)
            n += 1
        offset += len(part) + 2
