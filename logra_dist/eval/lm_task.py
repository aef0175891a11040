"""The embedded tiny Llama (15 Linear layers) on the embedded stdlib-docstring corpus.

Same model config, tokenizer and corpus as the package's default model; a shorter recipe
(fewer documents, shorter sequences) so that the dozens of retrainings a counterfactual
evaluation needs fit on two CPU cores. Queries are held-out documents.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F
from transformers import LlamaForCausalLM

from logra_dist.data import Document, collate, tokenize
from logra_dist.embedded import build_tokenizer, corpus_sha256, default_model_config, load_corpus
from logra_dist.eval.tasks import Batch, Task, TaskSpec


class LMTask(Task):
    defaults: ClassVar[dict[str, Any]] = {
        "n_train": 800,
        "n_query_pool": 40,
        "max_length": 64,
        "steps": 300,
        "batch_size": 16,
        "lr": 3e-3,
        "warmup": 20,
        "split_seed": 0,
    }

    def __init__(self, spec: TaskSpec):
        unknown = set(spec.params) - set(self.defaults)
        if unknown:
            raise ValueError(f"task lm: unknown parameter(s) {sorted(unknown)}")
        self.p = {**self.defaults, **spec.params}
        self.name = spec.name
        docs = load_corpus()
        self.tokenizer = build_tokenizer()
        perm = np.random.default_rng(self.p["split_seed"]).permutation(len(docs))
        n_tr, n_q = self.p["n_train"], self.p["n_query_pool"]
        if n_tr + n_q > len(docs):
            raise ValueError(f"lm: corpus has {len(docs)} documents, asked for {n_tr} + {n_q}")
        self.doc_ids = {"train": perm[:n_tr], "query": perm[n_tr : n_tr + n_q]}
        samples = tokenize([Document(int(d["id"]), d["text"]) for d in docs], self.tokenizer, self.p["max_length"])
        self.samples = {split: [samples[int(i)] for i in ids] for split, ids in self.doc_ids.items()}
        self.texts = {split: [docs[int(i)]["text"] for i in ids] for split, ids in self.doc_ids.items()}
        self.n_train, self.n_query_pool = n_tr, n_q
        self._corpus = corpus_sha256(docs)

    def recipe(self) -> dict[str, Any]:
        return {**self.p, "corpus_sha256": self._corpus, "model": "embedded default_model_config"}

    def _lr(self, step: int) -> float:
        warm, steps = self.p["warmup"], self.p["steps"]
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    def train(self, train_ids: np.ndarray, seed: int, optimizer_path: str | None = None) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(default_model_config(self.tokenizer))
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.p["lr"], betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr)
        gen = torch.Generator().manual_seed(seed)
        pool = np.asarray(train_ids, dtype=np.int64)
        order: list[int] = []
        bs = self.p["batch_size"]
        for _ in range(self.p["steps"]):
            if len(order) < bs:  # epochs of the subset in a seeded random order
                order += pool[torch.randperm(len(pool), generator=gen).numpy()].tolist()
            batch, order = order[:bs], order[bs:]
            b = self._collate("train", batch)
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        if optimizer_path is not None:
            torch.save(opt.state_dict(), optimizer_path)
        return model.eval()

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, np.ndarray]:
        losses = []
        for _, batch in self.batches("query", np.arange(self.n_query_pool), 64):
            logits = self.forward(model, batch)
            tok = self._token_losses(logits, batch["labels"])
            losses.append(tok.sum(1) / (batch["labels"][:, 1:] != -100).sum(1))
        return {"loss": torch.cat(losses).numpy()}

    def batches(self, split: str, ids: np.ndarray, batch_size: int) -> Iterator[tuple[torch.Tensor, Batch]]:
        ids = np.asarray(ids, dtype=np.int64)
        for s in range(0, len(ids), batch_size):
            b = ids[s : s + batch_size]
            yield torch.as_tensor(b), self._collate(split, b)

    def _collate(self, split: str, ids) -> Batch:
        b = collate([self.samples[split][int(i)] for i in ids], self.tokenizer.pad_token_id)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "labels": b.labels}

    def forward(self, model, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @staticmethod
    def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, T-1) next-token losses, 0 where the label is ignored."""
        lg, lb = logits[:, :-1].float(), labels[:, 1:]
        return F.cross_entropy(
            lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), reduction="none", ignore_index=-100
        ).reshape(lb.shape)

    def summed_loss(self, logits, batch, labels=None):
        return self._token_losses(logits, batch["labels"] if labels is None else labels).sum()

    def sample_labels(self, logits, batch, gen):
        probs = F.softmax(logits[:, :-1].detach().double(), -1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:2])
        labels = batch["labels"].clone()
        labels[:, 1:] = torch.where(batch["labels"][:, 1:] == -100, labels[:, 1:], drawn)
        return labels

    def mask(self, batch: Batch) -> torch.Tensor:
        return batch["attention_mask"]

    def text(self, split: str, i: int) -> str:
        return self.texts[split][int(i)]


__all__ = ["LMTask"]
