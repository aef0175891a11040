"""The model's mode during capture, where a plausible wrong index could come from: dropout left
on (a model still in train mode after training) makes every row a random draw of dropout masks,
refused and named for nn.Dropout modules and Hugging Face attentions' functional
`attention_dropout`; a torch.autocast other than the model's dtype would make gradients in one
precision recorded as another, refused; a batch-mean loss (a Hugging Face `outputs.loss`) would
divide each batch's rows by its own count, refused; so is a loss that depends on padded tokens."""

import numpy as np
import pytest
import torch
from reference import lm_loss, padded_lm_batch, tiny_llama

import logra_dist as ld

CFG = ld.LoGraConfig(k_in=3, k_out=2, storage_dtype="float32", hessian="raw")


def _gpt2(pdrop: float):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = pdrop
    return GPT2LMHeadModel(cfg)


def _llama(attention_dropout: float):
    model = tiny_llama()
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = attention_dropout
    return model


def _log_batch(logger, lengths=(5, 3), start=0):
    torch.manual_seed(start)
    _, input_ids, mask, labels = padded_lm_batch(list(lengths))
    with logger.capture(torch.arange(start, start + len(lengths)), mask=mask):
        logger.backward(lm_loss(logger.model(input_ids=input_ids, attention_mask=mask).logits, labels))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _gpt2(0.1), r"'transformer\.drop' \(Dropout\) acts in train mode: dropout p=0\.1 \(and \d+ more\)"),
        (
            lambda: _llama(0.1),
            r"'model\.layers\.0\.self_attn' \(LlamaAttention\) acts in train mode: attention_dropout=0\.1",
        ),
    ],
    ids=["gpt2-nn-dropout", "llama-attention-dropout"],
)
def test_dropout_in_train_mode_is_refused_and_eval_mode_logs(tmp_path, make, match):
    torch.manual_seed(0)
    model = make().train()
    logger = ld.attach(model, CFG, tmp_path / "index")
    with pytest.raises(ValueError, match=match + r".*model\.eval\(\)"):
        _log_batch(logger)
    model.eval()  # the fix the message names; nothing was written by the refused batch
    _log_batch(logger, start=0)
    _log_batch(logger, start=2)
    logger.finalize()
    logger.close()
    with ld.GradientStore(tmp_path / "index") as store:
        assert sorted(store.ids.tolist()) == [0, 1, 2, 3] and np.isfinite(store[:]).all()


def test_dropout_modules_in_eval_under_a_training_parent_are_still_refused(tmp_path):
    """GPT-2's attention hands its dropout's p to the attention kernel on its OWN training flag, so
    putting only the nn.Dropout modules in eval mode still drops attention weights."""
    torch.manual_seed(0)
    model = _gpt2(0.1).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    logger = ld.attach(model, CFG, tmp_path / "index")
    with pytest.raises(
        ValueError,
        match=r"'transformer\.drop' \(Dropout\) acts in train mode: "
        r"dropout p=0\.1, its parent trains and may apply that p itself",
    ):
        _log_batch(logger)
    logger.close()


def test_batch_norm_in_train_mode_is_refused(tmp_path):
    """Batch statistics make each sample's output, so its gradient, depend on its batch mates."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).train()
    logger = ld.attach(model, CFG, tmp_path / "index")
    X, Y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    refused = r"'1' \(BatchNorm1d\) acts in train mode: batch statistics"
    with pytest.raises(ValueError, match=refused), logger.capture(torch.arange(4)):
        logger.backward(torch.nn.functional.cross_entropy(logger.model(X), Y, reduction="sum"))
    logger.close()


def test_train_mode_without_dropout_is_accepted(tmp_path):
    """What activation checkpointing needs (train mode): fine once the dropout is 0."""
    torch.manual_seed(0)
    logger = ld.attach(_gpt2(0.0).train(), CFG, tmp_path / "index")
    _log_batch(logger)
    logger.finalize()
    logger.close()


def test_autocast_other_than_the_models_dtype_is_refused(tmp_path):
    """Under torch.autocast the layers compute in its dtype whatever the weights': an fp32 model's
    rows would be bf16 gradients recorded as fp32, past the scorer's precision check."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    logger = ld.attach(model, CFG, tmp_path / "fp32")
    refused = r"torch\.autocast\(torch\.bfloat16\) but the model computes in torch\.float32"
    with pytest.raises(RuntimeError, match=refused), torch.autocast("cpu", dtype=torch.bfloat16):
        _log_batch(logger)
    _log_batch(logger)  # outside autocast: logged, and the refused batch left nothing behind
    logger.finalize()
    logger.close()
    with ld.GradientStore(tmp_path / "fp32") as store:
        assert sorted(store.ids.tolist()) == [0, 1]
    logger = ld.attach(model.to(torch.bfloat16), CFG, tmp_path / "bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the model's own dtype: nothing differs
        _log_batch(logger)
    logger.finalize()
    logger.close()


def _backward_with(logger, loss_of):
    torch.manual_seed(0)
    _, input_ids, mask, labels = padded_lm_batch([5, 3])
    with logger.capture(torch.arange(2), mask=mask):
        logger.backward(loss_of(logger.model, input_ids, mask, labels))


@pytest.mark.parametrize(
    "loss_of",
    [
        lambda m, x, mask, y: m(input_ids=x, attention_mask=mask, labels=y).loss,  # HF: mean over tokens
        lambda m, x, mask, y: torch.nn.functional.cross_entropy(
            m(input_ids=x, attention_mask=mask).logits[:, :-1].transpose(1, 2), y[:, 1:], ignore_index=-100
        ),
        lambda m, x, mask, y: (
            torch.nn.functional.cross_entropy(  # per-sample summed, then averaged
                m(input_ids=x, attention_mask=mask).logits[:, :-1].transpose(1, 2), y[:, 1:], reduction="none"
            )
            .sum(1)
            .mean()
        ),
    ],
    ids=["hf-outputs-loss", "cross-entropy-mean", "mean-over-samples"],
)
def test_a_batch_mean_loss_is_refused(tmp_path, loss_of):
    """Each batch's rows would be divided by its own token or sample count: skewed across batches."""
    logger = ld.attach(tiny_llama().eval(), CFG, tmp_path / "index")
    with pytest.raises(ValueError, match=r"the loss is a mean.*SUM over the batch of per-sample summed losses"):
        _backward_with(logger, loss_of)
    _backward_with(logger, lambda m, x, mask, y: lm_loss(m(input_ids=x, attention_mask=mask).logits, y))  # summed
    logger.finalize()
    logger.close()
    with ld.GradientStore(tmp_path / "index") as store:
        assert sorted(store.ids.tolist()) == [0, 1]


def test_a_mean_over_one_value_is_a_sum(tmp_path):
    logger = ld.attach(tiny_llama().eval(), CFG, tmp_path / "index")
    _backward_with(logger, lambda m, x, mask, y: lm_loss(m(input_ids=x, attention_mask=mask).logits, y)[None].mean())
    logger.close()


def _left_padded(lengths, vocab: int = 40):
    seqs = [torch.randint(1, vocab, (n,)) for n in lengths]
    t = max(lengths)
    input_ids, mask = torch.zeros(len(seqs), t, dtype=torch.long), torch.zeros(len(seqs), t, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    for i, q in enumerate(seqs):
        input_ids[i, t - len(q) :], mask[i, t - len(q) :], labels[i, t - len(q) :] = q, 1, q
    return input_ids, mask, labels


@pytest.mark.parametrize("padding", ["right", "left"])
def test_labels_left_on_padding_are_refused(tmp_path, padding):
    """Nothing attends to a padded token, so a gradient there can only come from its own loss:
    padding labelled as a target. Correctly labelled batches (-100 on padding) pass either side."""
    torch.manual_seed(0)
    if padding == "right":
        _, input_ids, mask, labels = padded_lm_batch([7, 4, 9])
    else:
        input_ids, mask, labels = _left_padded([7, 4, 9])
    logger = ld.attach(tiny_llama().eval(), CFG, tmp_path / "index")
    careless = torch.where(mask.bool(), labels, input_ids)  # labels = input_ids, pads included
    refused = r"the loss depends on padded tokens: layer '.*' has an output gradient"
    with pytest.raises(ValueError, match=refused), logger.capture(torch.arange(3), mask=mask):
        logger.backward(lm_loss(logger.model(input_ids=input_ids, attention_mask=mask).logits, careless))
    with logger.capture(torch.arange(3), mask=mask):  # -100 on padding: accepted, nothing left of the first
        logger.backward(lm_loss(logger.model(input_ids=input_ids, attention_mask=mask).logits, labels))
    logger.finalize()
    logger.close()


def test_a_loss_mask_given_as_the_mask_is_refused(tmp_path):
    """Prompt tokens carry no loss but their activations reach it: masking them out of the rows
    (a loss mask passed as `mask`) would drop part of every gradient."""
    torch.manual_seed(0)
    _, input_ids, mask, labels = padded_lm_batch([7, 6])
    completion = mask.clone()
    completion[:, :3] = 0  # the first 3 tokens are the prompt
    labels = labels.masked_fill(completion == 0, -100)
    logger = ld.attach(tiny_llama().eval(), CFG, tmp_path / "index")
    with (
        pytest.raises(ValueError, match=r"padded tokens.*not a loss mask"),
        logger.capture(torch.arange(2), mask=completion),
    ):
        logger.backward(lm_loss(logger.model(input_ids=input_ids, attention_mask=mask).logits, labels))
    logger.close()
