"""Prompts in, greedy completions out: the queries of `logra-dist score --prompts`.

As in the paper, what gets attributed is a model output: each prompt is completed by the model
itself (greedy, at most `max_new_tokens`), then the completion's loss given the prompt is the
query (prompt tokens carry no loss). The query is built from the generated token ids directly,
not from re-tokenized text, so it is exactly what the model produced.

Generation runs under the same engine as scoring (`Engine.generation()`: ZeRO-3 and FSDP gather
each layer inside its forward). Prompts are strided over ranks and generated in left-padded
batches; with collective forwards every rank runs the same number of `generate` calls (a rank
out of prompts generates from a dummy one) with `synced_gpus`, so no rank leaves a gather
unmatched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from logra_dist import comm
from logra_dist.data import IGNORE, TokenizedSample, check_surrogates, decode_text, pad_token_id
from logra_dist.engines import wrap


@dataclass(frozen=True)
class Prompt:
    id: int
    text: str


@dataclass(frozen=True)
class Completion:
    id: int
    prompt: str
    completion: str
    sample: TokenizedSample  # prompt + completion token ids; labels IGNORE on the prompt


def read_prompts(path: str | Path) -> list[Prompt]:
    """jsonl with {"prompt": ...} (optional integer "id", default: the line's position), or a
    text file with one prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts: list[Prompt] = []
    for line_no, line in enumerate(decode_text(path.read_bytes(), path).splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix in (".jsonl", ".json"):
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e}") from e
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{where}: expected {{"prompt": "..."}}, got {line[:80]!r}')
            check_surrogates(record["prompt"], f"{where}: field 'prompt'")
            pid = record.get("id", len(prompts))
            if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
                raise ValueError(f"{where}: 'id' must be a non-negative integer, got {pid!r}")
            prompts.append(Prompt(pid, record["prompt"]))
        else:
            prompts.append(Prompt(len(prompts), line))
    ids = [p.id for p in prompts]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate prompt ids")
    return prompts


def prompt_ids(tokenizer, text: str, limit: int) -> list[int]:
    """The prompt's tokens as the model sees them before generating (no trailing EOS)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    if not ids:
        raise ValueError(f"prompt {text[:60]!r} has no tokens")
    return ids[-limit:]  # keep the end: it is what the completion continues


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # per-prompt copy of a token list: data prep, not a hot path
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _cut(generated: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    """Generated ids of each row up to and including its first EOS (the rest is padding)."""
    out = []
    for row in generated.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(row)
    return out


def complete(
    model_or_engine: Any,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_length: int = 128,
) -> list[Completion]:
    """Collective under a launcher: this rank's share of the prompts (strided), completed greedily.
    Returns this rank's completions in its share's order."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_length - max_new_tokens < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt before {max_new_tokens} new tokens")
    engine = wrap(model_or_engine)
    pad_id = pad_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    mine = list(prompts[comm.rank() :: comm.world_size()])
    tokens = [prompt_ids(tokenizer, p.text, max_length - max_new_tokens) for p in mine]
    chunks = [list(range(i, min(i + batch_size, len(mine)))) for i in range(0, len(mine), batch_size)]
    steps = engine.lockstep_batches(len(chunks))
    dummy = [tokens[0] if tokens else [pad_id]]
    out: list[Completion] = []
    with torch.no_grad(), engine.generation() as module:
        for step in range(steps):
            chunk = chunks[step] if step < len(chunks) else []
            ids, mask = _left_padded([tokens[i] for i in chunk] or dummy, pad_id)
            generated = module.generate(
                input_ids=ids.to(engine.device),
                attention_mask=mask.to(engine.device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                synced_gpus=engine.synced_generation,
            )
            new = _cut(generated[:, ids.shape[1] :].cpu(), eos_id)
            for i, completion in zip(chunk, new):
                text = tokenizer.decode(completion, skip_special_tokens=True)
                sample = TokenizedSample(mine[i].id, tokens[i] + completion, [IGNORE] * len(tokens[i]) + completion)
                out.append(Completion(mine[i].id, mine[i].text, text, sample))
    return out


def gather_completions(mine: Sequence[Completion]) -> dict[int, dict[str, str]]:
    """Collective: {prompt id: {"prompt", "completion"}} of every rank (for the results listing)."""
    records = {}
    for part in comm.all_gather_objects([(c.id, c.prompt, c.completion) for c in mine]):
        for pid, prompt, completion in part:
            records[pid] = {"prompt": prompt, "completion": completion}
    return records
