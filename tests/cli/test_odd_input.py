"""Odd input to `logra-dist score` and `report`: named errors with file and line, before any
model loads; --topk beyond the index is capped; results of different runs are not mixed."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from logra_dist.cli.main import main
from logra_dist.cli.report import write_report
from logra_dist.scoring.kernels import TopKResult
from logra_dist.scoring.results import write_results, write_topk_h5

BAD = {
    "bad_utf8.jsonl": (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad_utf8\.jsonl:2: not valid UTF-8 \(byte 0xe9"),
    "bad_utf8.txt": (b"one\n\ntwo\n\nthr\xffee\n", r"bad_utf8\.txt:5: not valid UTF-8 \(byte 0xff"),
    "surrogate.jsonl": (
        b'{"text": "fine"}\n\n{"text": "half \\ud800 a pair"}\n',
        r"surrogate\.jsonl:3: field 'text': lone surrogate '\\ud800'",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_query_text_is_named_with_file_and_line_before_any_model(tmp_path, name):
    data, message = BAD[name]
    (tmp_path / name).write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as info:  # the index does not even exist: checked first
        main(["score", "--index", str(tmp_path / "no-index"), "--queries", str(tmp_path / name)])
    assert time.perf_counter() - start < 5
    assert "UTF-8" in str(info.value) and (
        "iconv" in str(info.value) or "replace it with the character" in str(info.value)
    )


def test_bad_prompts_are_named_with_file_and_line(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "\\udc00 x"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: field 'prompt': lone surrogate '\\udc00'"):
        main(["score", "--index", str(tmp_path / "no-index"), "--prompts", str(tmp_path / "p.jsonl")])
    (tmp_path / "p.txt").write_bytes(b"first prompt\nsecond \xc3\n")
    with pytest.raises(ValueError, match=r"p\.txt:2: not valid UTF-8"):
        main(["score", "--index", str(tmp_path / "no-index"), "--prompts", str(tmp_path / "p.txt")])


def test_topk_beyond_the_index_is_capped(tmp_path, capsys):
    index = tmp_path / "idx"
    assert main(["log", "--out", str(index), "--max-samples", "6", "--batch-size", "6", "--no-wandb"]) == 0
    (tmp_path / "q.jsonl").write_text('{"text": "a query"}\n{"text": "another query"}\n')
    argv = ["score", "--index", str(index), "--queries", str(tmp_path / "q.jsonl"), "--no-wandb"]
    assert main([*argv, "--topk", "1000000000000", "--out", str(tmp_path / "out")]) == 0
    assert "note: --topk 1000000000000 capped at the index's 6 rows" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "out" / "topk.jsonl").read_text().splitlines()]
    assert [sorted(r["train_id"] for r in rec["results"]) for rec in records] == [list(range(6))] * 2


def _result(seed: int) -> TopKResult:
    rng = np.random.default_rng(seed)
    return TopKResult(
        rng.standard_normal((3, 2)).astype(np.float32), rng.integers(0, 9, (3, 2)), np.arange(3), "dot", 1
    )


def test_report_refuses_files_of_different_runs(tmp_path):
    a = write_results(tmp_path / "a", _result(0), run_id="a" * 32)
    write_results(tmp_path / "b", _result(1), run_id="b" * 32)
    assert write_report(tmp_path / "a").exists()  # one run: fine
    shutil.copy(tmp_path / "b" / "topk.jsonl", a["jsonl"])
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        write_report(tmp_path / "a")
    message = str(info.value)
    assert f"{a['jsonl']}:1: run id {'b' * 32} but {a['h5']} has run id {'a' * 32}" in message, message
    assert "different `score` runs" in message and time.perf_counter() - start < 5


def test_report_reads_results_written_before_run_ids(tmp_path):
    """Neither file carries a run id (results of earlier versions): nothing to compare, accepted."""
    write_topk_h5(tmp_path / "topk.h5", _result(0))
    (tmp_path / "topk.jsonl").write_text(json.dumps({"query_id": 0, "query_text": "q", "results": []}) + "\n")
    assert "Query #0" in write_report(tmp_path).read_text()
    (tmp_path / "topk.jsonl").write_text(json.dumps({"query_id": 0, "results": [], "run_id": "c" * 32}) + "\n")
    with pytest.raises(ValueError, match=r"topk.jsonl:1: run id c{32} but .*topk.h5 has run id None"):
        write_report(tmp_path)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_training_text_is_named_before_any_shard(tmp_path, name):
    data, message = BAD[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=message):
        main(["log", "--out", str(tmp_path / "index"), "--data", str(tmp_path / name), "--no-wandb"])
    assert not (tmp_path / "index" / "shards").exists()
