"""Read an offline W&B run back from its transaction log (`run-<id>.wandb`), for tests.

wandb 0.31 writes no wandb-summary.json or config.yaml offline, and its Python DataStore reader
is gone (the log is read by the Go core), so this decodes the documented LevelDB-style log
format: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of records, each
with a 7-byte header (crc32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)
and a `wandb_internal_pb2.Record` protobuf payload.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK, HEADER = 32768, 7


def records(path: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a W&B log"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        if length == 0 and kind == 0:
            break
        assert zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF == crc, f"{path}: bad crc at byte {pos}"
        pos += HEADER + length
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if len(item.nested_key) else item.key


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """{"config": {...}, "history": [rows], "summary": {...}, "job_type": str} of one offline run."""
    files = list(Path(run_dir).glob("run-*.wandb"))
    assert len(files) == 1, f"{run_dir}: expected one run-*.wandb, found {files}"
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "job_type": None}
    for r in records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["job_type"] = r.run.job_type
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return out
