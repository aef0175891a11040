"""Reader for the committed stdlib-docstring corpus.

The corpus ships inside the package (``corpus.jsonl.gz``) so that every machine
and Python version trains and scores on exactly the same documents, offline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

CORPUS_PATH: Path = Path(__file__).with_name("corpus.jsonl.gz")


def load_corpus(path: str | Path | None = None) -> list[dict]:
    """Return the corpus as ``[{"id": int, "source": str, "text": str}, ...]``, ids 0..N-1."""
    docs: list[dict] = []
    with gzip.open(path or CORPUS_PATH, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                docs.append(json.loads(line))
    for i, doc in enumerate(docs):
        if doc["id"] != i:
            raise ValueError(f"corpus ids are not contiguous: line {i} has id {doc['id']}")
    return docs


def corpus_sha256(docs: list[dict] | None = None) -> str:
    """SHA-256 of the corpus content (independent of gzip framing)."""
    h = hashlib.sha256()
    for doc in load_corpus() if docs is None else docs:
        line = json.dumps(
            {"id": doc["id"], "source": doc["source"], "text": doc["text"]},
            ensure_ascii=False,
            sort_keys=True,
        )
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()
