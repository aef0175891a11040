"""`--resume` refuses every setting that changes rows or ids, naming the field and both values.

Real CLI runs on the bundled tiny Llama: one job is SIGKILLed mid-epoch (fault hook), then
resumed with another --max-length, --data (another file; the same file reordered), --dtype,
--max-samples and --seed: each is refused before anything is written, and the partial shard is
left as it was; the same settings then finish it, equal to an uninterrupted run."""

import json
import re
import sys
import time
from pathlib import Path

import h5py
import pytest
from reliability_helpers import CLI_WORKER, assert_same_index, env, rows_by_id

import logra_dist as ld
from logra_dist.cli.main import main
from logra_dist.data import DataIdentity, TokenizedSample, samples_digest

TEXTS = [f"sample {i}: the {'quick' if i % 2 else 'lazy'} fox number {i} jumps over {i * 7} dogs" for i in range(24)]


def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_data_digest_is_order_sensitive_and_world_size_free():
    samples = [TokenizedSample(i, [1, 2, i], [-100, 2, i]) for i in range(10)]
    whole = samples_digest(samples)
    # a rank's share (positions r, r + w, ...) summed alone: the shares add up to the whole
    for world in (2, 3):
        assert sum(samples_digest(samples[r::world], r, world) for r in range(world)) % (1 << 64) == whole
    assert samples_digest(samples[::-1]) != whole  # same samples, another order
    relabel = [TokenizedSample(s.id, s.input_ids, [2] * 3) for s in samples]  # prompt/completion split differs
    assert samples_digest(relabel) != whole
    ident = DataIdentity.of(samples, ["x.jsonl"], max_length=8)
    assert ident.paths == ["x.jsonl"] and ident.abs_paths[0].endswith("/x.jsonl") and ident.samples == 10


def test_resume_refuses_other_rows_settings_and_finishes_with_the_same(tmp_path):
    import subprocess

    cfg = tmp_path / "logra.json"
    cfg.write_text(json.dumps({"k_in": 4, "k_out": 4, "flush_rows": 4, "storage_dtype": "float32"}))
    data = _write(tmp_path / "train.jsonl", TEXTS)
    other = _write(tmp_path / "other.jsonl", [t.replace("fox", "cat") for t in TEXTS])
    base = {"--max-samples": "20", "--max-length": "48", "--dtype": "float32", "--data": str(data), "--seed": "0"}

    def argv(out: Path, **change: str) -> list[str]:
        opts = {**base, **{f"--{k.replace('_', '-')}": v for k, v in change.items()}}
        return ["log", "--out", str(out), "--batch-size", "4", "--logra", str(cfg), *sum(opts.items(), ())]

    out = tmp_path / "index"
    killed = subprocess.run(
        [sys.executable, str(CLI_WORKER), *argv(out)],
        env=env("kill_after_batches:3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = out / "shards" / "rank-00000.partial"
    before = {p.name: p.read_bytes() for p in partial.iterdir()}
    digest = json.loads(_record_meta(partial)["data"])["digest"]
    cases = [
        ({"max_length": "32"}, r"data\.max_length is 48 in the interrupted job, 32 now"),
        (
            {"data": str(other)},
            rf"data\.abs_paths\[0\] is '{re.escape(str(data))}' in the interrupted job, '{re.escape(str(other))}' now; "
            rf"data\.digest is '{digest}' in the interrupted job, '[0-9a-f]{{16}}' now",
        ),
        ({"dtype": "bfloat16"}, r"data\.model_dtype is 'float32' in the interrupted job, 'bfloat16' now"),
        (
            {"max_samples": "16"},
            r"data\.max_samples is 20 in the interrupted job, 16 now; data\.samples is 20 "
            r"in the interrupted job, 16 now",
        ),
        ({"seed": "1"}, r"config\.seed is 0 in the interrupted job, 1 now"),
    ]
    for change, message in cases:
        start = time.monotonic()
        with pytest.raises(
            ld.IndexFormatError, match=rf"rank-00000\.partial: written with another (data|config): (.*; )?{message}"
        ):
            main(argv(out, **change) + ["--resume"])
        print(f"refused {change} in {time.monotonic() - start:.1f}s")
    _write(data, TEXTS[::-1])  # the same file, its samples in another order
    with pytest.raises(
        ld.IndexFormatError, match=rf"data\.digest is '{digest}' in the interrupted job, '[0-9a-f]+' now"
    ):
        main(argv(out) + ["--resume"])
    _write(data, TEXTS)
    assert {p.name: p.read_bytes() for p in partial.iterdir()} == before  # refusals wrote nothing
    assert main(argv(out) + ["--resume"]) == 0
    ref = tmp_path / "ref"
    assert main(argv(ref)) == 0
    assert rows_by_id(out)[0].tolist() == list(range(20))
    assert_same_index(out, ref)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["digest"] == digest and manifest["data"]["paths"] == [str(data)]
    assert manifest["data"]["samples"] == 20 and manifest["data"]["max_length"] == 48
    with h5py.File(out / "shards" / "rank-00000.h5") as f:  # the complete shard carries it too
        assert json.loads(f.attrs["data"])["digest"] == digest and "paths" not in json.loads(f.attrs["data"])


def _record_meta(partial: Path) -> dict:
    from logra_dist.index.partial import read_record

    return read_record(partial / "commit.npz").meta
