"""Batches for the model Fisher: the statistics of fisher="true" and fisher="exact".

fisher="model" is whichever of the two the output allows: "exact" for a classifier (the caller
knows its class count), "true" with fisher_samples draws otherwise (a vocabulary-wide sum per
token is too large). On a classifier the sampled estimate is much noisier: one prediction per
sample, where a sequence's gradient already sums a draw per token (docs/evaluation.md).

Both are one `statistics_pass()` capture of the batch repeated R times (copy-major), each copy
with its own labels and a per-copy loss weight w, so that each copy's row is w g and the
statistics (sums of outer products of rows, and of per-token output gradients for KFAC) divided
by the R B samples they count are the wanted expectation:

- "true", R = fisher_samples: labels drawn from the model, w = 1; the mean over copies of
  g g^T is the Monte Carlo true Fisher with S samples per token.
- "exact", R = C classes: copy c has label c and w = sqrt(C p_c) (p detached), so the
  statistics are (1 / B) sum_n sum_c p_c g_c g_c^T = E_n[J^T (diag p - p p^T) J], the
  Gauss-Newton matrix of the cross-entropy, exactly (no sampling noise).
  KFAC's activation covariance is unchanged by the expansion (copies of the same inputs, counted
  R times), and its gradient covariance gets the same expectation.

Everything is batched over copies and samples; no Python loop over either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from logra_dist.config import ConfigError, LoGraConfig
from logra_dist.data import IGNORE, Batch


@dataclass(frozen=True)
class FisherTargets:
    """How to capture one statistics batch: `expand` the inputs and ids, forward, then
    `loss(logits)` is the weighted summed loss to pass to `backward`."""

    kind: str  # "true" or "exact"
    copies: int

    def describe(self) -> dict:
        """What the statistics pass ran, as recorded in the index (manifest "fisher_estimator")."""
        if self.kind == "exact":
            return {"kind": "exact", "classes": self.copies}
        return {"kind": "true", "samples": self.copies}

    @classmethod
    def for_config(cls, config: LoGraConfig, classes: int | None = None) -> FisherTargets:
        """classes: the output width (needed for "exact": one copy per class; for "model" it
        selects "exact", and without it "model" draws fisher_samples labels)."""
        kind = config.fisher
        if kind == "model":
            kind = "true" if classes is None else "exact"
        if kind == "true":
            return cls("true", config.fisher_samples)
        if kind == "exact":
            if not classes or classes < 1:
                raise ConfigError(
                    f"fisher={config.fisher!r} with classes={classes!r}: the exact expectation needs the number "
                    "of classes, at least 1 (FisherTargets.for_config(cfg, classes))"
                )
            return cls("exact", int(classes))
        raise ConfigError(f"fisher={config.fisher!r}: the logged rows feed the statistics; no statistics batch")

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (R B, ...), copy-major: copy r of sample n is row r B + n (ids too)."""
        return t.repeat(self.copies, *([1] * (t.dim() - 1)))

    def expand_batch(self, batch: Batch) -> Batch:
        """A padded LM batch repeated `copies` times (ids too: the statistics pass logs nothing)."""
        return Batch(*(self.expand(t) for t in (batch.ids, batch.input_ids, batch.attention_mask, batch.labels)))

    def lm_labels(self, logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        """Data labels (N, T) with every predicted token (not IGNORE) replaced by one drawn from the
        model's next-token distribution at the previous position (logits (N, T, V))."""
        if self.kind != "true":
            raise ValueError("fisher='exact' over a vocabulary is not supported for sequences: use fisher='true'")
        drawn, _ = self.targets(logits[:, :-1], generator)
        out = labels.clone()
        out[:, 1:] = torch.where(labels[:, 1:] == IGNORE, labels[:, 1:], drawn.to(labels.dtype))
        return out

    def targets(self, logits: torch.Tensor, generator: torch.Generator | None = None):
        """(labels, weights) for expanded logits: (R B, C) for a classifier, or (R B, T, V) for a
        sequence ("true" only), labels of the same leading shape, weights (R B) or (R B, T)."""
        rows = logits.shape[0]
        if rows % self.copies:
            raise ValueError(f"{rows} logits rows are not {self.copies} copies of a batch: expand() the inputs")
        probs = F.softmax(logits.detach().double(), dim=-1)
        if self.kind == "true":
            flat = probs.reshape(-1, probs.shape[-1])
            labels = torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
            return labels, torch.ones(labels.shape, dtype=logits.dtype, device=logits.device)
        if logits.dim() != 2 or logits.shape[1] != self.copies:
            raise ValueError(
                f"fisher='exact' sums over the classes of one prediction per sample: logits must be "
                f"(copies x batch, {self.copies}), got {tuple(logits.shape)}; for sequences use fisher='true' "
                "with fisher_samples"
            )
        labels = torch.arange(self.copies, device=logits.device).repeat_interleave(rows // self.copies)
        p = probs.gather(1, labels[:, None])[:, 0]
        return labels, (self.copies * p).sqrt().to(logits.dtype)

    def loss(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Summed weighted cross-entropy of a classifier's expanded logits (R B, C)."""
        labels, weights = self.targets(logits, generator)
        return (weights * F.cross_entropy(logits, labels, reduction="none")).sum()
