"""Records to documents: UTF-8 and JSON checks that name the file and line, and the one rule for
what a record may hold (`{"text"}` or `{"prompt", "completion"}`, an optional scalar `id`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    key: Any = None  # the record's own id when it is not a non-negative integer (`id` is then its position)

    @property
    def full_text(self) -> str:
        return self.prompt + self.text


def native_id(value: Any) -> bool:
    """A record id used as the sample id as it is: a non-negative integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def record_to_document(record: dict, index: int, where: str) -> Document:
    """index: the record's position, its id when it has none. Any other JSON scalar id (a string,
    a float, a negative number) maps to the position, and the document keeps it as `key` (the
    index stores the table, `data.streaming`)."""
    doc_id, key = index, None
    if "id" in record:
        value = record["id"]
        if native_id(value):
            doc_id = value
        elif value is None:
            pass  # a null id is no id
        elif isinstance(value, (str, int, float, bool)):
            key = value
        else:
            raise ValueError(f"{where}: 'id' must be a JSON scalar (string or number), got {type(value).__name__}")
    fields = [k for k in ("text", "prompt", "completion") if k in record]
    if "text" in record and isinstance(record["text"], str):
        doc = Document(doc_id, record["text"], key=key)
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        doc = Document(doc_id, record["completion"], record["prompt"], key=key)
    elif fields:
        wrong = ", ".join(f"{k!r} is {type(record[k]).__name__}" for k in fields if not isinstance(record[k], str))
        raise ValueError(f"{where}: text fields must be strings ({wrong or 'prompt without completion'})")
    else:
        raise ValueError(
            f'{where}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}, got keys {sorted(record)}'
        )
    if not doc.text.strip():
        raise ValueError(f"{where}: empty {'completion' if doc.prompt else 'text'}")
    return doc
