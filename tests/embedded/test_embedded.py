"""Tests for the embedded default corpus, tokenizer and tiny Llama (offline, CPU, fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from logra_dist import embedded
from logra_dist.embedded import (
    build_tokenizer,
    default_model_config,
    ensure_default_model,
    load_corpus,
    load_model_and_tokenizer,
    train_default_model,
)
from logra_dist.embedded.cache import _is_complete

REPO = Path(__file__).resolve().parents[2]
# Pinned: changes only if corpus.jsonl.gz is deliberately rebuilt.
CORPUS_SHA256 = "01d86f4fbd6a733dc1717c85e3dbdc7ac9d70fdc75beb312714c6b988a44afcf"
UNICODE_SAMPLES = [
    "",
    "plain ascii",
    "  leading and trailing spaces \n\n\ttabs\r\n",
    "Grüße, naïve café — «quotes» ‘single’",
    "日本語のテキスト and 中文 and 한국어",
    "emoji 🙂👍🏽 🏳️‍🌈 zero\u200bwidth",
    "literal specials <s> </s> <pad> stay text",
    "control \x00\x01\x7f chars",
]


def test_corpus_loads_with_contiguous_ids_and_pinned_hash() -> None:
    docs = load_corpus()
    assert 1500 <= len(docs) <= 2500
    assert [d["id"] for d in docs] == list(range(len(docs)))
    assert all(set(d) == {"id", "source", "text"} for d in docs)
    assert all(80 <= len(d["text"]) <= 1000 for d in docs)
    assert len({d["text"] for d in docs}) == len(docs)
    assert embedded.CORPUS_PATH.stat().st_size < 1_000_000
    assert embedded.corpus_sha256(docs) == CORPUS_SHA256
    assert load_corpus() == docs


def test_tokenizer_round_trips_and_saves(tmp_path: Path) -> None:
    tok = build_tokenizer()
    assert len(tok) == 259
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    for text in UNICODE_SAMPLES:
        raw = tok.encode(text, add_special_tokens=False)
        assert raw == list(text.encode("utf-8"))  # one id per byte
        assert tok.decode(raw) == text
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert len(loaded) == len(tok)
    assert loaded.pad_token_id == tok.pad_token_id
    for text in UNICODE_SAMPLES:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text


def test_default_config_has_15_linear_layers() -> None:
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    cfg = default_model_config(tok)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    model = LlamaForCausalLM(cfg)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15
    assert linears[-1] == "lm_head"


def test_train_save_and_reload_gives_identical_logits(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    model, info = train_default_model(out, steps=6, seed=0, max_length=64)
    meta = json.loads((out / "logra_default.json").read_text())
    assert meta["steps"] == 6 and meta["seed"] == 0
    assert meta["corpus_sha256"] == CORPUS_SHA256
    assert meta["final_loss"] == pytest.approx(info["final_loss"])
    assert info["final_loss"] < info["first_loss"]
    assert (out / "model.safetensors").is_file() and _is_complete(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp siblings left

    loaded, tok = load_model_and_tokenizer(out)
    assert not loaded.training
    batch = tok(["def f(x): return x", "Return the hash value of the object."], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**batch).logits
        b = loaded(**batch).logits
    assert torch.equal(a, b)

    # Same seed -> bitwise identical weights; retraining replaces the old checkpoint.
    sd_before = load_file(out / "model.safetensors")
    train_default_model(out, steps=6, seed=0, max_length=64)
    sd_after = load_file(out / "model.safetensors")
    assert sd_before.keys() == sd_after.keys()
    assert all(torch.equal(sd_before[k], sd_after[k]) for k in sd_before)


def test_failed_training_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logra_dist.embedded.model as model_mod

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(model_mod, "_train", boom)
    with pytest.raises(RuntimeError):
        train_default_model(tmp_path / "ckpt", steps=2)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGRA_DIST_HOME", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path
    monkeypatch.delenv("LOGRA_DIST_HOME")
    assert embedded.default_cache_dir() == Path("~/.cache/logra_dist").expanduser()


_CHILD = """
import sys, time
import logra_dist.embedded.cache as cache
real = cache.train_default_model
def fast(path, **kw):
    with open(sys.argv[2], "a") as f:
        f.write("x")
    time.sleep(1.0)
    return real(path, steps=3, max_length=32)
cache.train_default_model = fast
print(cache.ensure_default_model(sys.argv[1]))
"""


def test_ensure_default_model_concurrent_calls_train_once(tmp_path: Path) -> None:
    counter = tmp_path / "trained"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path / "cache"), str(counter)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert counter.read_text() == "x"
    paths = {Path(o[0].strip().splitlines()[-1]) for o in outs}
    assert paths == {tmp_path / "cache" / "default-model-v1"}
    path = paths.pop()
    assert _is_complete(path)
    assert ensure_default_model(tmp_path / "cache") == path  # cached: returns without training
    model, _tok = load_model_and_tokenizer(path)
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 15
