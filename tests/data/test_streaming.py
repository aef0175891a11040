"""A rank's share, streamed: each rank tokenizes only its documents and reads no further than
--max-samples; the data identity summed over any world size equals one process's; truncation
is counted; --chunk windows cover every loss token exactly once, with document id and offset."""

from __future__ import annotations

import json

import pytest

from logra_dist.data import IGNORE, MAX_CHUNKS, DataSpec, RankShare, sample_digest, tokenize
from logra_dist.data.text import Document
from logra_dist.embedded.tokenizer import build_tokenizer


class CountingTokenizer:
    """The real byte-level tokenizer, counting the texts it is asked to encode."""

    def __init__(self):
        self.inner, self.texts = build_tokenizer(), 0

    def __call__(self, texts, **kw):
        self.texts += len(texts)
        return self.inner(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _corpus(path, n, bad_after=None):
    lines = [json.dumps({"id": f"d{i}", "text": f"document number {i} " * (1 + i % 5)}) for i in range(n)]
    if bad_after is not None:
        lines.insert(bad_after, "{not json")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_each_rank_tokenizes_only_its_share_and_stops_at_max_samples(tmp_path):
    data = _corpus(tmp_path / "c.jsonl", 50, bad_after=20)  # a bad line past --max-samples is never read
    spec = DataSpec([data], 32, max_samples=10)
    single = RankShare(spec, build_tokenizer(), 0, 1, None).plan()
    plans, counted = [], []
    for rank in range(3):
        tok = CountingTokenizer()
        plans.append(RankShare(spec, tok, rank, 3, None).plan())
        counted.append(tok.texts)
    assert counted == [4, 3, 3]  # documents r, r + 3, ... of the first 10
    assert sum(p.digest for p in plans) % (1 << 64) == single.digest
    assert sum(p.samples for p in plans) == single.samples == 10
    ids = sorted(i for p in plans for i in p.table.sample_id)
    assert ids == list(range(10)) and plans[1].table.keys[1] == '"d1"'


def test_second_pass_gives_the_planned_samples(tmp_path):
    data = _corpus(tmp_path / "c.jsonl", 12)
    share = RankShare(DataSpec([data], 16), build_tokenizer(), 1, 2, None)
    plan = share.plan()
    again = list(share.samples())
    assert [s.id for s in again] == list(plan.table.sample_id)
    digests = [sample_digest(p, s.id, s.input_ids, s.labels) for p, s in zip(plan.table.position, again)]
    assert digests == list(plan.table.digest)
    assert [s.id for s in share.samples({1, 5})] == [3, 7, 9, 11]


def test_truncation_is_counted(tmp_path):
    tok = build_tokenizer()
    docs = [Document(0, "x" * 30), Document(1, "y" * 3)]
    samples = tokenize(docs, tok, 10)
    assert [len(s.input_ids) for s in samples] == [10, 5]  # bos + 3 bytes + eos
    assert [s.truncated for s in samples] == [32 - 10, 0]  # bos + 30 bytes + eos = 32 tokens


@pytest.mark.parametrize(("length", "stride"), [(8, 8), (8, 5), (8, 3)])
def test_chunk_windows_count_every_token_once(tmp_path, length, stride):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": 4, "prompt": "question? ", "completion": "an answer that runs long"}) + "\n")
    plan_share = RankShare(DataSpec([str(path)], length, chunk=True, stride=stride), build_tokenizer(), 0, 1, None)
    windows = list(plan_share.samples())
    tok = build_tokenizer()
    full = tok("question? an answer that runs long")["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok("question? ")["input_ids"])
    counted = [0] * len(full)
    for w in windows:
        assert w.doc_id == 4 and w.id // MAX_CHUNKS == 4
        assert w.input_ids == full[w.offset : w.offset + length]
        for j, label in enumerate(w.labels):
            if label != IGNORE:
                assert label == full[w.offset + j]
                counted[w.offset + j] += 1
    assert counted == [0] * n_prompt + [1] * (len(full) - n_prompt)
    assert windows[-1].offset + len(windows[-1].input_ids) == len(full)


def test_stride_without_chunk_is_refused():
    with pytest.raises(ValueError, match="--stride needs --chunk"):
        DataSpec(["x"], 8, stride=4).check()
