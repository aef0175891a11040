"""session.run_batches, the one batch loop: data.Batch and collator dicts alike, the tracker's
counts, and a count that does not match the batches. One process (lock-step is a no-op there;
tests/distributed cover shadow batches)."""

import pytest
import torch
from torch import nn

import logra_dist as ld
from logra_dist.session import run_batches
from logra_dist.tracking import Tracker


def _logger(tmp_path) -> ld.Logger:
    torch.manual_seed(0)
    return ld.attach(nn.Sequential(nn.Linear(4, 3)), ld.LoGraConfig(k_in=2, k_out=2), tmp_path / "idx")


def _dict_batch(n: int) -> dict:
    return {"x": torch.randn(n, 4), "attention_mask": torch.ones(n, 2, dtype=torch.long), "tag": "any"}


def test_dict_batches_with_a_loss_fn(tmp_path):
    logger, tracker = _logger(tmp_path), Tracker("t")
    pairs = [(torch.tensor([0, 1]), _dict_batch(2)), (torch.tensor([2, 3, 4]), _dict_batch(3))]
    tokens = run_batches(logger, iter(pairs), lambda model, b: model(b["x"]).pow(2).sum(), count=2, tracker=tracker)
    assert tokens == 10
    f = tracker.figures()
    assert f["count/batches"] == 2 and f["count/samples"] == 5 and f["count/tokens"] == 10
    assert f["time/forward"] > 0 and f["time/backward"] > 0
    assert logger.finalize()["total_rows"] == 5
    logger.close()


def test_a_count_that_does_not_match_the_batches(tmp_path):
    logger = _logger(tmp_path)
    loss = lambda model, b: model(b["x"]).sum()  # noqa: E731
    with pytest.raises(ValueError, match="count=3 but 1 batches came"):
        run_batches(logger, iter([(torch.tensor([0]), _dict_batch(1))]), loss, count=3)
    with pytest.raises(ValueError, match="count=1 but more batches came"):
        run_batches(logger, iter([(torch.tensor([1]), _dict_batch(1))] * 2), loss, count=1)
    logger.close()
