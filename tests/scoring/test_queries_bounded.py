"""Queries scored in bounded chunks: the results equal one pass over all queries (order and ties
included), the training rows' self-influence is computed once for all chunks, and the peak
memory of `logra-dist score` does not grow with the number of queries."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import logra_dist as ld
from logra_dist.cli.main import main
from logra_dist.core.projection import LayerSpec
from logra_dist.index.format import read_manifest, stats_attrs, write_stats
from logra_dist.index.writer import write_index

ROOT = Path(__file__).resolve().parents[2]


def synthetic_index(out: Path, n: int = 40, seed: int = 0) -> None:
    """Rows with exact duplicates (ties), hessian "none", stats.h5 included."""
    specs = [LayerSpec("a", "linear", 4, 4, 2, 3), LayerSpec("b", "linear", 4, 4, 3, 2)]
    cfg = ld.LoGraConfig(k_in=2, k_out=2, hessian="none", storage_dtype="float32", flush_rows=8)
    rows = torch.randint(-3, 4, (n, 12), generator=torch.Generator().manual_seed(seed)).float()
    rows[n // 2 :] = rows[: n - n // 2]  # every row twice: equal scores, ties go to the smaller id
    write_index(out, specs, cfg.to_json(), [[(torch.arange(n), rows)]])
    write_stats(out / "stats.h5", "none", 1.0, {}, stats_attrs(read_manifest(out / "manifest.json"), n))


def test_score_in_chunks_equals_one_topk_and_plans_self_influence_once(tmp_path):
    synthetic_index(tmp_path / "idx")
    gen = torch.Generator().manual_seed(1)
    queries = torch.randint(-3, 4, (23, 12), generator=gen).float()
    ids = torch.arange(100, 123)
    sc = ld.Scorer(None, tmp_path / "idx", mode="relatif", chunk_rows=7, cache_self_influence=False)
    sc.add_query_gradients(queries, ids)
    whole = sc.topk(5)
    calls = []
    row_self = sc._row_self
    sc._row_self = lambda rows: calls.append(len(rows)) or row_self(rows)  # counts, computes the same
    feeds = [lambda a=a: sc.add_query_gradients(queries[a : a + 6], ids[a : a + 6]) for a in range(0, 23, 6)]
    parts = list(sc.score_in_chunks(5, feeds))
    sc.close()
    assert len(parts) == 4 and sum(calls) == 40, calls  # the 40 rows' self-influence once, not per chunk
    np.testing.assert_array_equal(np.concatenate([p.query_ids for p in parts]), whole.query_ids)
    np.testing.assert_array_equal(np.concatenate([p.train_ids for p in parts]), whole.train_ids)
    np.testing.assert_array_equal(np.concatenate([p.scores for p in parts]), whole.scores)
    ties = whole.train_ids[:, 0] < 20  # each best row has a twin 20 ids later with the same score
    assert ties.all(), whole.train_ids[:, :2]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """The bundled model on 12 documents, two of them identical (exactly tied scores)."""
    from logra_dist.embedded import load_corpus

    root = tmp_path_factory.mktemp("bounded")
    texts = [d["text"] for d in load_corpus()[:12]]
    texts[9] = texts[3]
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["log", "--out", str(root / "idx"), "--data", str(root / "train.jsonl"), "--batch-size", "6"]) == 0
    return root


def _read(out: Path) -> tuple[dict, list, str]:
    with h5py.File(out / "topk.h5") as f:
        arrays = {k: f[k][()] for k in ("scores", "train_ids", "query_ids")}
        run_id = f.attrs["run_id"]
    records = [json.loads(line) for line in (out / "topk.jsonl").read_text().splitlines()]
    assert {r.pop("run_id") for r in records} == {run_id}
    return arrays, records, (out / "topk.md").read_text().replace(run_id, "RUN")


def test_cli_chunks_give_the_results_of_one_pass(index, capsys):
    from logra_dist.embedded import load_corpus

    corpus = load_corpus()
    qids = np.random.default_rng(0).permutation(np.arange(500, 530))  # not in id order in the file
    lines = [{"id": int(q), "text": corpus[20 + i]["text"] if i % 5 else corpus[3]["text"]} for i, q in enumerate(qids)]
    (index / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = {}
    for chunk in ("4", "1000"):
        out = index / f"out{chunk}"
        argv = ["score", "--index", str(index / "idx"), "--queries", str(index / "q.jsonl"), "--topk", "5"]
        assert main([*argv, "--batch-size", "4", "--query-chunk", chunk, "--out", str(out)]) == 0
        got[chunk] = _read(out)
    (small, rec_small, md_small), (big, rec_big, md_big) = got["4"], got["1000"]
    assert small["query_ids"].tolist() == sorted(qids.tolist())
    for key in ("query_ids", "train_ids"):  # the same ranking, ties and order
        np.testing.assert_array_equal(small[key], big[key], err_msg=key)
    # the same query rows (same batches); score GEMMs of other shapes round differently (measured
    # up to 5.5e-6 relative; docs/scoring.md "Determinism")
    np.testing.assert_allclose(small["scores"], big["scores"], rtol=2e-5, atol=2e-5 * np.abs(big["scores"]).max())

    def drop_scores(records):
        return [{**r, "results": [{**x, "score": None} for x in r["results"]]} for r in records]

    assert drop_scores(rec_small) == drop_scores(rec_big)
    cells = re.compile(r"^(\| \d+ \| \d+ \| )[^|]+", re.M)  # the score column of the markdown tables
    assert cells.sub(r"\1", md_small) == cells.sub(r"\1", md_big)
    tied = small["train_ids"][small["query_ids"] == qids[0]][0]  # the query that is training doc 3 = 9
    assert tied[:2].tolist() == [3, 9]


PEAK = """
import json, os, resource, sys, contextlib
from logra_dist.cli.main import main
index, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(out + ".jsonl", "w") as f:
    f.writelines(json.dumps({"text": f"query {i} of many"}) + "\\n" for i in range(n))
with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # a StringIO would grow
    main(["score", "--index", index, "--queries", out + ".jsonl", "--topk", "3", "--out", out, "--no-wandb",
          "--batch-size", "128", "--max-length", "12", "--query-chunk", "256"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_peak_memory_does_not_grow_with_the_queries(index):
    """Unchunked, 5000 queries took ~200 MB more than 500 (rows, float64 preconditioning, gathered
    copies: ~45 kB a query at D = 3840); in chunks of 256 the peak stays flat."""
    peaks = {}
    for n in (500, 5000):
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(index / "idx"), str(n), str(index / f"peak{n}")],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[n] = int(done.stdout.split()[-1])
    assert peaks[5000] - peaks[500] < 50, peaks  # MB; the results themselves are 0.2 MB


def test_query_index_in_chunks_gives_the_results_of_one_pass(index, monkeypatch):
    """--query-index reads its queries chunk by chunk (consecutive sorted ids): the same ranking,
    ties and id order as one chunk holding them all."""
    from logra_dist.embedded import load_corpus

    corpus = load_corpus()
    qids = np.random.default_rng(1).permutation(np.arange(700, 718))
    lines = [{"id": int(q), "text": corpus[40 + i]["text"] if i % 4 else corpus[3]["text"]} for i, q in enumerate(qids)]
    (index / "qi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    qidx = index / "qidx"
    argv = ["log", "--data", str(index / "qi.jsonl"), "--logra", str(index / "idx"), "--out", str(qidx)]
    assert main([*argv, "--batch-size", "4"]) == 0
    got, loads = {}, []
    add = ld.Scorer.add_query_gradients
    monkeypatch.setattr(ld.Scorer, "add_query_gradients", lambda sc, *a, **k: loads.append(1) or add(sc, *a, **k))
    for chunk in ("4", "1000"):
        out = index / f"qout{chunk}"
        argv = ["score", "--index", str(index / "idx"), "--query-index", str(qidx), "--topk", "5"]
        loads.clear()
        assert main([*argv, "--batch-size", "2", "--query-chunk", chunk, "--out", str(out)]) == 0
        assert len(loads) == (5 if chunk == "4" else 1), (chunk, len(loads))  # 18 queries, chunks of 4
        got[chunk] = _read(out)
    (small, rec_small, _), (big, rec_big, _) = got["4"], got["1000"]
    assert small["query_ids"].tolist() == sorted(qids.tolist()) == big["query_ids"].tolist()
    np.testing.assert_array_equal(small["train_ids"], big["train_ids"])
    np.testing.assert_allclose(small["scores"], big["scores"], rtol=2e-5, atol=2e-5 * np.abs(big["scores"]).max())
    assert [r["query_text"] for r in rec_small] == [r["query_text"] for r in rec_big]
    assert all(r["query_text"] for r in rec_small)
    tied = small["train_ids"][small["query_ids"] == qids[0]][0]  # the query that is training doc 3 = 9
    assert tied[:2].tolist() == [3, 9]
