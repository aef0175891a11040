"""Readers by file kind and the record rules: every kind gives the same documents, ids of any
scalar type map to positions, and every bad record is an error naming its file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from logra_dist.data import DataSpec, documents, read_documents
from logra_dist.data.sources import ORDER, READERS, reader_for

TEXTS = ["first document", "second one", "third and last"]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _docs(path, **spec):
    skipped = []
    return [(p, d) for p, _, d in documents(DataSpec([str(path)], 8, **spec), skipped)], skipped


def test_every_registered_kind_is_tried_and_text_last():
    """A reader class missing from ORDER would never be picked; text takes any file."""
    assert sorted(ORDER) == sorted(READERS.names()) and ORDER[-1] == "text"


def test_every_kind_reads_the_same_documents(tmp_path):
    jsonl = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS])
    text = tmp_path / "a.txt"
    text.write_text("\n\n".join(TEXTS) + "\n")
    parquet = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": TEXTS}), parquet)
    saved = tmp_path / "saved"  # the layout of datasets' save_to_disk: state.json + Arrow stream files
    saved.mkdir()
    arrow = str(saved / "data-00000-of-00001.arrow")
    with pa.OSFile(arrow, "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": TEXTS}))
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    kinds = {reader_for(p).name: [d.full_text for d in read_documents(p)] for p in (jsonl, text, parquet, saved)}
    assert kinds == {"jsonl": TEXTS, "text": TEXTS, "parquet": TEXTS, "hf-disk": TEXTS}


def test_scalar_ids_map_to_positions_and_keep_their_value(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "a"}, {"id": 3.5, "text": "b"}, {"id": None, "text": "c"}])
    docs, _ = _docs(path)
    assert [(d.id, d.key) for _, d in docs] == [(0, "x"), (1, 3.5), (2, None)]
    ints = _jsonl(tmp_path / "b.jsonl", [{"id": 7, "text": "a"}, {"id": 9, "text": "b"}])
    assert [d.id for _, d in _docs(ints)[0]] == [7, 9]


@pytest.mark.parametrize(
    ("records", "line", "message"),
    [
        ([{"text": "a"}, {"text": 5}], 2, "'text' is int"),
        ([{"text": "a"}, {"text": "  "}], 2, "empty text"),
        ([{"prompt": "p", "completion": ""}], 1, "empty completion"),
        ([{"id": 1, "text": "a"}, {"id": "b", "text": "b"}], 2, "mixes integer ids"),
        ([{"id": [1], "text": "a"}], 1, "JSON scalar"),
        ([{"body": "a"}], 1, "got keys"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, records, line, message):
    path = _jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError, match=message) as e:
        _docs(path)
    assert f"bad.jsonl:{line}:" in str(e.value) and "--skip-bad" in str(e.value)


def test_invalid_json_and_utf8_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        _docs(path)
    docs, skipped = _docs(path, skip_bad=True)
    assert [d.text for _, d in docs] == ["ok"]
    assert [(s.where.rsplit(":", 1)[1], s.reason.split(":")[0]) for s in skipped] == [
        ("2", "not valid JSON"),
        ("3", "not valid UTF-8 (byte 0xff"),
    ]


def test_skip_bad_keeps_positions_of_the_valid_documents(tmp_path):
    """--max-samples counts valid documents: skipping one shifts nothing else's id."""
    path = _jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": ""}, {"text": "b"}, {"text": "c"}])
    docs, skipped = _docs(path, skip_bad=True, max_samples=2)
    assert [(p, d.id, d.text) for p, d in docs] == [(0, 0, "a"), (1, 1, "b")]
    assert len(skipped) == 1 and skipped[0].where.endswith("a.jsonl:2")


def test_parquet_without_a_text_column_is_refused(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"body": TEXTS}), path)
    with pytest.raises(ValueError, match="no 'text' or 'prompt'/'completion' column"):
        read_documents(path)


def test_duplicate_ids_are_refused_naming_one(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"id": 5, "text": "a"}, {"id": 2, "text": "b"}, {"id": 5, "text": "c"}])
    with pytest.raises(ValueError, match=r"duplicate document ids \(first: 5\)"):
        read_documents(path)
