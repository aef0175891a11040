"""Readers of data files, one small class per kind (registered by subclassing, picked from the path).

Each reader streams `(where, record)` pairs in file order, `where` naming the file and line (or
row) for error messages; a record that cannot be read comes as `(where, ValueError)` in its
place, so the caller decides to stop or (`--skip-bad`) to record it and go on. Nothing holds
more than one block of a file in memory.

Kinds: jsonl (one JSON object per line), text (documents separated by blank lines), parquet
(pyarrow), and Hugging Face `datasets` saved with `save_to_disk` (a directory of Arrow stream
files: read with pyarrow, so `datasets` itself need not be installed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from logra_dist.data.text import decode_text, json_record
from logra_dist.registry import Registry

Item = tuple[str, "dict[str, Any] | ValueError"]
COLUMNS = ("text", "prompt", "completion", "id")
ARROW_FIX = "install pyarrow (`pip install 'logra-dist[data]'`)"


class Reader:
    """A data file kind: `name` (the kind), `claims(path)` and `items()`. Subclassing registers it."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        READERS.register(cls)

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def claims(cls, path: Path) -> bool:
        raise NotImplementedError

    def items(self) -> Iterator[Item]:
        raise NotImplementedError


READERS: Registry[Reader] = Registry("data file kind")


class JsonlReader(Reader):
    name = "jsonl"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.suffix in (".jsonl", ".json")

    def items(self) -> Iterator[Item]:
        with self.path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{self.path}:{line_no}"
                try:
                    yield where, json_record(raw, self.path, line_no)
                except ValueError as e:
                    yield where, e


def _arrow():
    try:
        import pyarrow
    except ImportError:
        return None
    return pyarrow


class _ArrowReader(Reader):
    """Record batches of a table's text columns, turned into records row by row."""

    def _batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def items(self) -> Iterator[Item]:
        if _arrow() is None:
            raise ValueError(f"{self.path}: reading {self.name} needs pyarrow; {ARROW_FIX}")
        row = 0
        for batch in self._batches():
            for record in batch.to_pylist():
                yield f"{self.path}: row {row}", {k: v for k, v in record.items() if v is not None or k == "id"}
                row += 1

    def _columns(self, names: list[str]) -> list[str]:
        keep = [c for c in COLUMNS if c in names]
        if not {"text", "prompt"} & set(keep):
            raise ValueError(
                f"{self.path}: no 'text' or 'prompt'/'completion' column (columns: {names}); rename the text column"
            )
        return keep


class ParquetReader(_ArrowReader):
    name = "parquet"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.suffix == ".parquet"

    def _batches(self) -> Iterator[Any]:
        import pyarrow.parquet as pq

        file = pq.ParquetFile(self.path)
        yield from file.iter_batches(batch_size=1024, columns=self._columns(file.schema_arrow.names))


class HFDiskReader(_ArrowReader):
    """`Dataset.save_to_disk(DIR)`: state.json lists the Arrow stream files in order."""

    name = "hf-disk"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())

    def _batches(self) -> Iterator[Any]:
        import pyarrow as pa

        if not (self.path / "state.json").is_file():
            splits = json.loads((self.path / "dataset_dict.json").read_text()).get("splits", [])
            raise ValueError(f"{self.path}: a DatasetDict; name one split, e.g. --data {self.path / splits[0]}")
        files = [f["filename"] for f in json.loads((self.path / "state.json").read_text())["_data_files"]]
        for name in files:
            with pa.memory_map(str(self.path / name)) as source:
                stream = pa.ipc.open_stream(source)
                keep = self._columns(stream.schema.names)
                for batch in stream:
                    yield batch.select(keep)


class TextReader(Reader):
    """Plain text: paragraphs (separated by blank lines) are documents; where = their first line."""

    name = "text"

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file()

    def items(self) -> Iterator[Item]:
        lines: list[str] = []
        first = 0
        with self.path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = decode_text(raw, self.path, line_no)
                except ValueError as e:
                    yield f"{self.path}:{line_no}", e
                    lines = []
                    continue
                if line.strip():
                    first = first if lines else line_no
                    lines.append(line)
                elif lines:
                    yield f"{self.path}:{first}", {"text": "".join(lines).strip()}
                    lines = []
        if lines:
            yield f"{self.path}:{first}", {"text": "".join(lines).strip()}


ORDER = ("hf-disk", "jsonl", "parquet", "text")  # text last: it takes any file


def reader_for(path: str | Path) -> Reader:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    for kind in ORDER:
        if READERS.get(kind).claims(path):
            return READERS.get(kind)(path)
    raise ValueError(f"{path}: a directory but not a saved Hugging Face dataset (no state.json); name its files")
