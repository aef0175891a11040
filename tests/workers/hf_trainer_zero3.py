"""Worker for tests/integrations/test_hf_trainer.py, started by torchrun with 2 ranks (gloo, CPU).

A transformers.Trainer with a DeepSpeed ZeRO-3 config trains a tiny Llama (built from a config)
for two steps, then `log_trainer_dataset` logs one pass over its training set with a Tracker
whose W&B run is offline. Rank 0 saves the trained weights (gathered from the ZeRO-3
partitions) for the test's single-process reference. The texts and collator live in
hf_texts.py, shared with the test. argv: OUT_DIR N_SAMPLES
"""

import json
import os
import sys

import deepspeed.comm.torch
import torch

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the 45 s CPU shm op compile

from hf_texts import Texts  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from logra_dist import LoGraConfig  # noqa: E402
from logra_dist.engines.launch import destroy_distributed, exit_process  # noqa: E402
from logra_dist.integrations.hf_trainer import log_trainer_dataset  # noqa: E402
from logra_dist.tracking import Tracker, start_wandb  # noqa: E402

out, n_samples = sys.argv[1], int(sys.argv[2])
data = Texts(n_samples)
# the shipped config, unchanged: the same file `logra-dist log --config configs/zero3.json` uses
ds_config = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "zero3.json")
args = TrainingArguments(
    output_dir=os.path.join(out, "trainer"),
    per_device_train_batch_size=3,
    max_steps=2,
    learning_rate=1e-2,
    optim="adamw_torch",
    deepspeed=ds_config,
    report_to="none",
    save_strategy="no",
    logging_strategy="no",
    max_grad_norm=0.0,
    use_cpu=True,
    ddp_backend="gloo",
    disable_tqdm=True,
    seed=0,
)
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=len(data.tok),
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    pad_token_id=data.tok.pad_token_id,
)
model = LlamaForCausalLM(config)
trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=data.collate)
trainer.train()
rank = torch.distributed.get_rank()

logra = LoGraConfig(k_in=4, k_out=4, storage_dtype="float32", seed=3)
tracker = Tracker(
    "hf-trainer-log",
    total=None,
    log_every=1,
    wandb_run=start_wandb("log", {"logra": logra.to_dict(), "test": "hf_trainer_zero3"}),
)
manifest = log_trainer_dataset(trainer, logra, os.path.join(out, "index"), batch_size=2, tracker=tracker)
per_rank = tracker.finish({"index/total_rows": manifest["total_rows"]})

# the trained weights, gathered from the ZeRO-3 partitions (collective): the test logs the same
# samples with them in a plain single-process model, as the reference
import deepspeed  # noqa: E402

engine = trainer.deepspeed
with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
if rank == 0:
    torch.save({"state": state, "config": config.to_dict()}, os.path.join(out, "trained.pt"))
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(
            {
                "per_rank": per_rank,
                "engine": type(engine).__name__,
                "adapter": manifest["engine"],
                "stage": engine.zero_optimization_stage(),
                "global_step": trainer.state.global_step,
            },
            f,
        )
torch.distributed.barrier()
destroy_distributed()
exit_process(0)  # no interpreter teardown after a gloo group (pytorch#190489: SIGABRT at exit)
