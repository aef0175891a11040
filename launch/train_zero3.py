"""Train the embedded default (tiny Llama, stdlib-docstring corpus) with plain DeepSpeed ZeRO-3.

    deepspeed --num_gpus 2 launch/train_zero3.py --config configs/zero3.json --steps 50 --save runs/trained

An ordinary DeepSpeed training script: nothing of LoGra in it. launch/train_then_log.py is this
same script plus the few lines that log every training sample at the end of training
(docs/attach-to-training.md shows the difference).
"""

import argparse
import os
import sys

import deepspeed.comm.torch  # binds deepspeed; on CPU its shm op builder is replaced in main()
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from logra_dist.data import Document, collate, read_documents, tokenize
from logra_dist.embedded import build_tokenizer, default_model_config, load_corpus
from logra_dist.engines.loading import training_ds_config


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/zero3.json", help="DeepSpeed config")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", nargs="+", default=None, help="jsonl/text/parquet files (default: the bundled corpus)")
    p.add_argument("--max-samples", type=int, default=None, help="train on the first N documents")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="save a Hugging Face checkpoint here at the end")
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    return p.parse_args()


def main():
    args = parse_args()
    if not torch.cuda.is_available():  # CPU (gloo): skip DeepSpeed's 45 s JIT build of a CPU-inference op
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    # the shipped configs hold the HF Trainer's "auto" values: fill them as the Trainer would
    ds_config = training_ds_config(args.config, micro_batch_size=args.batch_size)
    ds_config.pop("train_batch_size", None)
    ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # for --save

    tokenizer = build_tokenizer()
    if args.data:  # your own data: any kind `logra-dist log --data` reads
        docs = read_documents(args.data)[: args.max_samples]
    else:
        docs = [Document(int(d["id"]), d["text"]) for d in load_corpus()][: args.max_samples]
    samples = tokenize(docs, tokenizer, args.max_length)
    pad = tokenizer.pad_token_id
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(samples, batch_size=args.batch_size, sampler=sampler, collate_fn=lambda s: collate(s, pad))

    torch.manual_seed(args.seed)  # the same initial weights on every rank (for big models: deepspeed.zero.Init)
    model = LlamaForCausalLM(default_model_config(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    engine.train()
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(engine.device)
            loss = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            engine.backward(loss)
            engine.step()
            step += 1
            if rank == 0 and (step % 10 == 0 or step == args.steps):
                print(f"step {step}: loss {loss.item():.4f}", flush=True)
            if step == args.steps:
                break
        epoch += 1

    if args.save:  # collective: every rank takes part in gathering the ZeRO-3 partitions
        engine.save_16bit_model(args.save, "pytorch_model.bin")
        if rank == 0:
            engine.module.config.save_pretrained(args.save)
            tokenizer.save_pretrained(args.save)
    torch.distributed.destroy_process_group()  # a live gloo group at exit can abort the process


if __name__ == "__main__":
    main()
