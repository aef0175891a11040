"""Prompts for `score --prompts`: reading, batched greedy completion, the query built from it."""

import json

import pytest
import torch

from logra_dist.cli.parser import build_parser
from logra_dist.data import IGNORE
from logra_dist.scoring.completion import Prompt, _cut, complete, read_prompts


def test_read_prompts_jsonl_and_text_lines(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a b"}) + "\n\n" + json.dumps({"prompt": "c", "id": 7}) + "\n")
    assert read_prompts(jsonl) == [Prompt(0, "a b"), Prompt(7, "c")]
    text = tmp_path / "p.txt"
    text.write_text("first prompt \n\nsecond\n")
    assert read_prompts(text) == [Prompt(0, "first prompt "), Prompt(1, "second")]
    for body, message in [
        ('{"text": "x"}\n', r"p\.jsonl:1: expected \{\"prompt\""),
        ("nope\n", "not valid JSON"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n', "duplicate prompt ids"),
        ('{"prompt": "a", "id": -1}\n', "'id' must be a non-negative integer"),
        ("\n", "no prompts"),
    ]:
        jsonl.write_text(body)
        with pytest.raises(ValueError, match=message):
            read_prompts(jsonl)
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        read_prompts(tmp_path / "missing.txt")


def test_completion_cut_after_first_eos():
    generated = torch.tensor([[5, 9, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert _cut(generated, eos_id=2) == [[5, 9, 2], [5, 5, 5, 5, 5], [2]]
    assert _cut(generated[:1], eos_id=None) == [[5, 9, 2, 0, 0]]


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaForCausalLM

    from logra_dist.embedded import build_tokenizer, default_model_config

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    return LlamaForCausalLM(default_model_config(tokenizer)).eval(), tokenizer


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [Prompt(4, "Return a new "), Prompt(2, "x"), Prompt(9, "Decode the object as JSON and return")]
    batched = complete(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = complete(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert [c.sample for c in batched] == [c.sample for c in single]
    for c, p in zip(batched, prompts):
        prompt_tokens = tokenizer(p.text)["input_ids"]
        s = c.sample
        assert c.id == s.id == p.id and c.prompt == p.text
        assert s.input_ids[: len(prompt_tokens)] == prompt_tokens  # the prompt, then what the model said
        assert s.labels == [IGNORE] * len(prompt_tokens) + s.input_ids[len(prompt_tokens) :]
        assert 1 <= len(s.input_ids) - len(prompt_tokens) <= 6
        assert c.completion == tokenizer.decode(s.input_ids[len(prompt_tokens) :], skip_special_tokens=True)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        complete(model, tokenizer, prompts, max_new_tokens=0)
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        complete(model, tokenizer, prompts, max_new_tokens=8, max_length=8)


def test_score_takes_exactly_one_query_source(capsys):
    parser = build_parser()
    for extra in ([], ["--queries", "q.jsonl", "--prompts", "p.txt"], ["--query-index", "qi", "--queries", "q"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["score", "--index", "idx", *extra])
    args = parser.parse_args(["score", "--index", "idx", "--prompts", "p.txt", "--max-new-tokens", "5"])
    assert (args.prompts, args.queries, args.query_index, args.max_new_tokens) == ("p.txt", None, None, 5)
