"""One rank of the sharded query check (launched by test_cli_zero3.py: `deepspeed --num_gpus 2`
for ZeRO-3, `torchrun --nproc_per_node 2` for FSDP2 and FSDP1, several configs in one job).

With the embedded default model loaded sharded per config (`engines.loading.build`, as the CLI
does), against an index given on the command line:
1. greedy completions of PROMPTS (`completion.complete`; EOS set to the letter "e", so completions
   stop at different lengths on different ranks: generation must stay in lockstep);
2. query gradients of QUERY_FILE captured by the Scorer (queries strided over ranks, batches of 2:
   rank 0 runs one batch more than rank 1, which runs a shadow batch), the Scorer's gathered rows
   (preconditioned, per-layer self-influence) and its top-k.
Each rank writes OUT/<config>/rank<r>.npz; the test recomputes all of it on one process with the
same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from logra_dist import Scorer, comm
from logra_dist.data import IGNORE, rank_samples, read_documents, tokenize
from logra_dist.embedded import ensure_default_model, load_tokenizer
from logra_dist.engines import launch, wrap
from logra_dist.engines.loading import build
from logra_dist.scoring.completion import Prompt, complete, gather_completions
from logra_dist.session import run_samples

REPO = Path(__file__).resolve().parents[2]
QUERY_FILE = REPO / "launch" / "example_queries.jsonl"
EXTRA_QUERY = {"id": 9, "prompt": "Return the number of ", "completion": "items in a container."}
PROMPTS = [
    Prompt(3, "Return a new "),
    Prompt(5, "Open the file and "),
    Prompt(6, "Decode the object as JSON and "),
    Prompt(8, "Create a new thread "),
    Prompt(11, "Set the input delimiter. "),
]
BATCH, MAX_NEW, K, MAX_LENGTH = 2, 10, 3, 128


def query_documents(folder: Path):
    """The example queries plus one: 5 queries, so ranks hold 3 and 2."""
    path = folder / "queries.jsonl"
    path.write_text(QUERY_FILE.read_text().rstrip("\n") + "\n" + json.dumps(EXTRA_QUERY) + "\n")
    return read_documents(path)


def generation_tokenizer(model_path: Path):
    tokenizer = load_tokenizer(model_path)
    tokenizer.eos_token = "e"  # stop early, at different lengths: this model rarely emits </s>
    return tokenizer


def run(model_or_engine, model_path: Path, index: Path, folder: Path, batch: int) -> dict[str, np.ndarray]:
    """Everything the check compares, for this rank (also the single-process reference)."""
    completions = complete(
        model_or_engine,
        generation_tokenizer(model_path),
        PROMPTS,
        max_new_tokens=MAX_NEW,
        batch_size=batch,
        max_length=MAX_LENGTH,
    )
    records = gather_completions(completions)
    root = getattr(model_or_engine, "module", model_or_engine)
    left_gathered = sum(p.numel() for p in root.parameters() if hasattr(p, "ds_tensor"))
    tokenizer = load_tokenizer(model_path)
    scorer = Scorer(model_or_engine, index, mode="relatif")
    mine = rank_samples(tokenize(query_documents(folder), tokenizer, MAX_LENGTH), comm.rank(), comm.world_size())
    run_samples(scorer, mine, batch, tokenizer.pad_token_id)
    local_ids, local_rows = scorer.queries.local_ids, scorer.queries.local_rows()
    gathered = scorer.queries.gather(scorer.preconditioner, scorer.store.layout, torch.float64)
    top = scorer.topk(K)
    scorer.close()
    return {
        "local_ids": local_ids,
        "local_rows": local_rows.numpy(),
        "ids": gathered.ids,
        "pre": gathered.pre.numpy(),
        "self_layers": gathered.self_layers.numpy(),
        "top_ids": top.train_ids,
        "top_scores": top.scores,
        "top_query_ids": top.query_ids,
        "left_gathered": np.array(left_gathered),
        "completion_ids": np.array([c.id for c in completions]),
        "completion_tokens": np.array(json.dumps({c.id: c.sample.input_ids for c in completions})),
        "completion_lengths": np.array(
            json.dumps({c.id: sum(t != IGNORE for t in c.sample.labels) for c in completions})
        ),
        "completions": np.array(json.dumps(records)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--index", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="zero3", help="comma-separated names of configs/<name>.json")
    ap.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = launch.init_distributed(require_group=True, timeout_s=120)
    model_path = ensure_default_model()
    for name in args.configs.split(","):
        out = Path(args.out) / name
        folder = out / f"rank{info.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        engine, _ = build(None, model_path, REPO / "configs" / f"{name}.json")
        result = run(engine, model_path, Path(args.index), folder, BATCH)
        result["engine"] = np.array(wrap(engine).kind)
        np.savez(out / f"rank{info.rank}.npz", **result)
        del engine
        comm.barrier()
    launch.destroy_distributed()
    launch.exit_process(0)


if __name__ == "__main__":
    main()
