"""Activation checkpointing, as training scripts turn it on: each checkpointed layer runs twice per
batch and only one of the calls receives the gradient (reentrant, torch's or DeepSpeed's: the
recompute inside backward; non-reentrant: the first pass). Rows and statistics must be the plain
ones, counted once. Under ZeRO-3 and FSDP2: tests/distributed/test_model_families.py."""

import copy

import h5py
import numpy as np
import pytest
import torch
from reference import (
    enable_checkpointing,
    lm_loss,
    lm_rows_reference,
    padded_lm_batch,
    rows_session,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

import logra_dist as ld

CFG = dict(k_in=3, k_out=2, compute_dtype="float64", storage_dtype="float32", hessian="none")
MODES = ("non-reentrant", "reentrant", "deepspeed")


def _checkpointed(model, mode: str):
    """A copy of `model` checkpointed by torch (reentrant or not) or by DeepSpeed's
    `deepspeed.checkpointing.checkpoint` (reentrant, an autograd.Function: Megatron-DeepSpeed's)."""
    model = enable_checkpointing(copy.deepcopy(model), reentrant=mode != "non-reentrant")
    if mode == "deepspeed":
        import deepspeed

        layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        assert layers
        for m in layers:
            m._gradient_checkpointing_func = deepspeed.checkpointing.checkpoint
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_checkpointed_rows_match_torch_func(model_fn, mode):
    torch.manual_seed(0)
    plain = model_fn().double().eval()
    seqs, input_ids, mask, labels = padded_lm_batch([7, 4, 9])
    model = _checkpointed(plain, mode)
    session = rows_session(model, {**CFG, "exclude": [r"lm_head"] if model_fn is tiny_gpt2 else []})
    with session.capture(torch.arange(3), mask=mask):
        out = session.model(input_ids=input_ids, attention_mask=mask)
        session.backward(lm_loss(out.logits, labels))
    assert model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    torch.testing.assert_close(session.rows, lm_rows_reference(session, plain, seqs), rtol=1e-9, atol=1e-11)


def test_reentrant_checkpoint_without_input_grads_still_recomputes(monkeypatch):
    """transformers before v5 did not make the input embeddings' output require grad, and logging
    freezes the weights: a reentrant checkpoint would then see no input requiring grad and never
    recompute. The capture gives the embeddings' output a gradient itself, while it captures."""
    torch.manual_seed(0)
    plain = tiny_llama().double().eval()
    seqs, input_ids, mask, labels = padded_lm_batch([7, 4, 9])
    model = _checkpointed(plain, "reentrant")
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()  # as older transformers left it
    session = rows_session(model, CFG)
    with session.capture(torch.arange(3), mask=mask):
        session.backward(lm_loss(session.model(input_ids=input_ids, attention_mask=mask).logits, labels))
    torch.testing.assert_close(session.rows, lm_rows_reference(session, plain, seqs), rtol=1e-9, atol=1e-11)
    session.close()
    with torch.no_grad():  # and only while capturing: the model's own forward is left as it was
        assert not model.model.embed_tokens(input_ids).requires_grad


class _FirstBlockCheckpointed(nn.Module):
    """A model whose first block is a reentrant checkpoint fed the raw input (no gradient):
    autograd never recomputes it, so its layer's gradient never arrives."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.last(torch.tanh(checkpoint(self.first, x, use_reentrant=True)))


def _classifier_rows(model, before=None):
    torch.manual_seed(0)
    X, Y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    session = rows_session(model.double(), {**CFG, "hessian": "none"})
    with session.capture(torch.arange(4)):
        if before is not None:
            before(session.model, X)
        session.backward(nn.functional.cross_entropy(session.model(X), Y, reduction="sum"))
    return session.rows


def test_a_checkpoint_cut_from_the_graph_is_refused_not_logged_as_zeros():
    with pytest.raises(RuntimeError, match=r"\['first'\] ran under no_grad.*never recomputed"):
        _classifier_rows(_FirstBlockCheckpointed())


def test_a_forward_under_no_grad_inside_capture_is_refused():
    """Nothing can say whether such a call was meant to count, so it is refused, named."""

    def no_grad_forward(model, X):
        with torch.no_grad():
            model(X)

    plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    assert _classifier_rows(plain).abs().sum() > 0
    with pytest.raises(RuntimeError, match=r"\['0', '2'\] ran under no_grad.*inside capture\(\)"):
        _classifier_rows(plain, before=no_grad_forward)


def _log(model, out, hessian: str):
    config = ld.LoGraConfig(k_in=4, k_out=3, compute_dtype="float64", storage_dtype="float32", hessian=hessian)
    logger = ld.attach(model, config, out)
    for step, lengths in enumerate(([7, 4, 9], [3, 8])):
        torch.manual_seed(step)
        _, input_ids, mask, labels = padded_lm_batch(lengths)
        ids = torch.arange(len(lengths)) + 3 * step
        with logger.capture(ids, mask=mask):
            logger.backward(lm_loss(logger.model(input_ids=input_ids, attention_mask=mask).logits, labels))
    logger.finalize()
    logger.close()


@pytest.mark.parametrize("hessian", ["raw", "kfac"])
def test_checkpointed_logging_writes_the_plain_index(tmp_path, hessian):
    """Through the Logger: shards and statistics (raw Fisher from rows; KFAC from the per-token
    projections the grad hooks also feed) equal those of the same model without checkpointing."""
    torch.manual_seed(0)
    plain = tiny_llama().double().eval()
    _log(plain, tmp_path / "plain", hessian)
    for mode in MODES:
        _log(_checkpointed(plain, mode), tmp_path / mode, hessian)
        with ld.GradientStore(tmp_path / "plain") as a, ld.GradientStore(tmp_path / mode) as b:
            assert np.array_equal(a.ids, b.ids)
            np.testing.assert_allclose(b[:], a[:], rtol=1e-6, atol=1e-9)
        with h5py.File(tmp_path / "plain" / "stats.h5") as a, h5py.File(tmp_path / mode / "stats.h5") as b:
            keys = []
            a.visit(lambda k: keys.append(k) if isinstance(a[k], h5py.Dataset) else None)
            assert keys and sorted(keys) == sorted(k for k in keys if k in b)
            for k in keys:
                np.testing.assert_allclose(b[k][()], a[k][()], rtol=1e-6, atol=1e-9, err_msg=f"{mode} {k}")


def test_checkpoint_for_logging_recomputes_without_dropout(tmp_path):
    """What `log --activation-checkpointing` does to the loaded model: only the decoder layers
    train (Hugging Face checkpoints only there), with their own dropout at 0 (GPT-2's attention
    applies its dropout's p on its own flag, so eval-mode Dropout modules alone would not do), so
    capture accepts it and the rows are the eval-mode model's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from logra_dist.engines.loading import checkpoint_for_logging

    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(cfg).double().eval()  # resid/embd/attn dropout 0.1 by default
    model = copy.deepcopy(plain)
    checkpoint_for_logging(model)
    assert not model.training and all(b.gradient_checkpointing and b.training for b in model.transformer.h)
    assert not any(m.training for b in model.transformer.h for m in b.modules() if m is not b)
    rows, calls = [], []
    _, input_ids, mask, labels = padded_lm_batch([7, 4, 9])
    for m in (plain, model):
        seen = []
        hook = m.transformer.h[0].attn.c_attn.register_forward_hook(lambda *_: seen.append(1))
        session = rows_session(m, {**CFG, "exclude": [r"lm_head"]})
        with session.capture(torch.arange(3), mask=mask):
            session.backward(lm_loss(session.model(input_ids=input_ids, attention_mask=mask).logits, labels))
        session.close()
        hook.remove()
        rows.append(session.rows)
        calls.append(len(seen))
    assert calls == [1, 2]  # the checkpointed layer really ran again in backward
    torch.testing.assert_close(rows[1], rows[0], rtol=1e-9, atol=1e-11)
