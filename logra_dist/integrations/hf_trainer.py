"""Log one pass over a Hugging Face `Trainer`'s training set with LoGra.

    trainer = Trainer(model, TrainingArguments(..., deepspeed="configs/zero3.json"), train_dataset=ds,
                      data_collator=collator)
    trainer.train()                                   # optional: logging also works before training
    log_trainer_dataset(trainer, LoGraConfig(k_in=16, k_out=16), "index/")  # on every rank

Why a function and not a `TrainerCallback`: callbacks see neither the DeepSpeed engine nor the
collator, and a logging pass is a separate pass over the data (frozen weights, per-sample
gradients), not something that belongs inside optimizer steps.

What it takes from the Trainer: the engine it prepared (`trainer.deepspeed` / `model_wrapped`;
if the Trainer has not prepared one yet it does so as `Trainer.evaluate()` would: ZeRO inference
engine), its `train_dataset` and `data_collator`. What it does not take: the Trainer's train
dataloader, because its sampler shuffles and (under accelerate's `even_batches`) repeats samples
to even out ranks, which would log some samples twice. Instead sample i of the dataset gets id i,
rank r takes samples r, r + world, ... in order, and every rank runs the SAME number of batches
(ZeRO-3 gathers weights collectively inside every forward and backward, so a rank that stopped
early would hang the others): each rank's share is split into ceil(max share / batch size) batches.
The pass runs in eval mode, as `Trainer.evaluate()` does (after `trainer.train()` the model is
left in train mode, where dropout would make every row a random draw); each module's mode is
restored afterwards.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra_dist import comm
from logra_dist.config import LoGraConfig
from logra_dist.data import IGNORE, DataIdentity, digest_from_words, digest_words, sample_digest, summed_lm_loss
from logra_dist.engines import wrap
from logra_dist.logger import attach
from logra_dist.session import run_batches
from logra_dist.tracking import NULL_TRACKER, NullTracker

LossFn = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]


def prepared_model(trainer: Any) -> Any:
    """The engine or wrapped model the Trainer trains (or would evaluate) with."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        if getattr(trainer, "deepspeed", None) is None:  # not trained in this process: as evaluate() does
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(trainer, num_training_steps=0, inference=True)
            engine = trainer.accelerator.prepare(trainer.model)
            trainer.model_wrapped = trainer.deepspeed = engine
        return trainer.deepspeed
    if getattr(trainer, "is_fsdp_enabled", False) and trainer.model_wrapped is trainer.model:
        trainer.model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)
    return trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model


def rank_batches(n: int, rank: int, world_size: int, batch_size: int) -> list[np.ndarray]:
    """Dataset positions of this rank's batches: samples rank, rank + world, ...; the same number
    of batches on every rank (at most batch_size + 1 samples each), none empty."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < world_size:
        raise ValueError(
            f"the dataset has {n} samples, fewer than the {world_size} ranks: every rank "
            "needs at least one (sharded engines run forward passes collectively)"
        )
    mine = np.arange(rank, n, world_size)
    most, fewest = math.ceil(n / world_size), n // world_size
    count = min(math.ceil(most / batch_size), fewest)
    return [b for b in np.array_split(mine, count)]


def causal_lm_loss(outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch of each sample's summed next-token loss; labels from the batch
    (-100 = ignored), else the input ids with padding ignored."""
    labels = batch.get("labels")
    if labels is None:
        labels = (
            batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
            if "attention_mask" in batch
            else batch["input_ids"]
        )
    return summed_lm_loss(outputs.logits, labels)


def dataset_identity(
    dataset: Any, collate: Callable, plan: list[np.ndarray], paths: Sequence[str] | None = None
) -> DataIdentity:
    """Collective. What the index records of a Trainer's dataset: its length and the digest of
    every sample's collated input ids and labels (padding cut by the attention mask), keyed by
    dataset position; each rank digests its own batches (one extra collation pass) and one small
    all-reduce of exact 16-bit words sums them, so every rank records the same identity."""
    total = 0
    for positions in plan:
        batch = collate([dataset[int(i)] for i in positions])
        input_ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch.get("attention_mask", torch.ones_like(input_ids))).bool()
        labels = torch.as_tensor(batch.get("labels", torch.full_like(input_ids, IGNORE)))
        for row, position in enumerate(positions.tolist()):
            keep = mask[row]
            total += sample_digest(position, position, input_ids[row][keep].tolist(), labels[row][keep].tolist())
    digest = digest_from_words(comm.all_reduce_sum(digest_words(total & ((1 << 64) - 1))))
    return DataIdentity.summed(len(dataset), digest, paths)


def _forward_keys(module: torch.nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def log_trainer_dataset(
    trainer: Any,
    config: LoGraConfig,
    out_dir: str | Path,
    *,
    dataset: Any = None,
    batch_size: int | None = None,
    loss_fn: LossFn = causal_lm_loss,
    tracker: NullTracker | None = None,
    metadata: dict[str, Any] | None = None,
    data: Sequence[str] | None = None,
    model_path: str | Path | None = None,
) -> dict[str, Any]:
    """Collective (every rank calls it): log `dataset` (default: `trainer.train_dataset`) with
    ids = dataset positions; returns the index manifest. loss_fn(outputs, batch) must return
    the SUM over the batch of per-sample summed losses. data: the files the dataset was made
    from, model_path: the checkpoint the index is for (what `score` loads): both recorded, so
    the index says what it was made from (the per-sample digests are always recorded)."""
    dataset = trainer.train_dataset if dataset is None else dataset
    if dataset is None:
        raise ValueError("log_trainer_dataset: the Trainer has no train_dataset; pass dataset=")
    tracker = tracker or NULL_TRACKER
    engine = prepared_model(trainer)
    batch_size = batch_size or trainer.args.per_device_train_batch_size
    plan = rank_batches(len(dataset), comm.rank(), comm.world_size(), batch_size)
    info = {"source": "transformers.Trainer", "samples": len(dataset), "batch_size": batch_size}
    if data is not None:
        info["data"] = [str(p) for p in data]
    if model_path is not None:
        info["model_path"] = str(model_path)
    dtype = str(wrap(engine).compute_dtype).removeprefix("torch.")  # the engine's bf16/fp16, as it runs
    identity = dataclasses.replace(dataset_identity(dataset, trainer.data_collator, plan, data), model_dtype=dtype)
    info["dtype"] = dtype
    logger = attach(engine, config, out_dir, tracker=tracker, metadata={**info, **(metadata or {})}, data=identity)
    keys = _forward_keys(logger.engine.root)

    def forward_loss(model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels" and (keys is None or k in keys)}
        return loss_fn(model(**inputs), batch)

    pairs = (
        (torch.as_tensor(positions, dtype=torch.int64), trainer.data_collator([dataset[int(i)] for i in positions]))
        for positions in plan
    )
    modes = [(m, m.training) for m in logger.engine.root.modules()]
    logger.engine.root.eval()
    try:
        run_batches(logger, pairs, forward_loss, count=len(plan), tracker=tracker)
        with tracker.phase("finalize"):
            manifest = logger.finalize()
    finally:
        logger.close()
        for module, training in modes:
            module.training = training
    return manifest
