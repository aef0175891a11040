"""Layers that run on tokens flattened to (B*T, d), as MoE blocks do (Qwen2-MoE's shared expert,
its d_out=1 shared_expert_gate, routers): their rows are exact per-sample gradients (torch.func),
padding included; a layer that sees a subset of the tokens (a routed expert built from nn.Linear)
is refused by name with the `exclude` fix, never attributed to the wrong samples."""

import pytest
import torch
from reference import (
    PerSampleLoss,
    lm_loss,
    lm_rows_reference,
    padded_lm_batch,
    per_sample_weight_grads,
    projected_reference,
    rows_session,
)
from torch import nn

CFG = dict(k_in=3, k_out=2, compute_dtype="float64", storage_dtype="float32", hessian="none")


_Loss = PerSampleLoss


def _session(model, **over):
    return rows_session(model, {**CFG, **over})


def tiny_qwen2_moe(vocab: int = 40):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
        experts_implementation="eager",  # float64 for torch.func: grouped_mm takes float32/16 only
    )
    return Qwen2MoeForCausalLM(cfg)


class RoutedMLP(nn.Module):
    """An MoE block as older Mixtral/OLMoE code wrote it: a router (nn.Linear on all B*T flattened
    tokens) and top-1 routed experts, each an nn.Linear called on the subset of tokens routed to it."""

    def __init__(self, d: int = 6, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(experts))

    def forward(self, h):
        flat = h.reshape(-1, h.shape[-1])
        weight, choice = torch.softmax(self.router(flat), -1).max(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(1)
            out = out.index_add(0, rows, expert(flat[rows]) * weight[rows, None])
        return out.reshape(h.shape)


class RoutedNet(nn.Module):
    def __init__(self, d: int = 6, classes: int = 3):
        super().__init__()
        self.inp, self.moe, self.out = nn.Linear(5, d), RoutedMLP(d), nn.Linear(d, classes)

    def forward(self, x):  # x (B, T, 5) -> (B, classes), the loss summed over tokens
        return self.out(torch.tanh(self.moe(torch.tanh(self.inp(x))))).sum(1)


def test_qwen2_moe_shared_expert_rows_match_torch_func_on_apadded_lm_batch():
    """Each sample of a right-padded batch equals its gradient computed ALONE (torch.func), for
    every Linear of the model: attention, the shared expert (flattened tokens), its d_out=1 gate
    (k_out 1 by the per-layer width rule) and the head. Routed experts are fused 3-D parameters."""
    torch.manual_seed(0)
    model = tiny_qwen2_moe().double().eval()
    seqs, input_ids, mask, labels = padded_lm_batch([7, 4, 9])
    session = _session(model)
    names = {s.name: s for s in session.specs}
    flat = [n for n in names if ".mlp.shared_expert" in n]
    assert len(flat) == 2 * 4  # gate/up/down_proj and shared_expert_gate, per decoder layer
    gate = names["model.layers.0.mlp.shared_expert_gate"]
    assert (gate.d_out, gate.k_out, gate.k_in) == (1, 1, 3)
    with session.capture(torch.arange(3), mask=mask):
        out = session.model(input_ids=input_ids, attention_mask=mask)
        session.backward(lm_loss(out.logits, labels))

    ref = lm_rows_reference(session, model, seqs)
    torch.testing.assert_close(session.rows, ref, rtol=1e-9, atol=1e-11)
    offset = 0
    for spec in session.specs:  # the shared expert's rows are really there (not all zero)
        if spec.name in flat:
            assert session.rows[:, offset : offset + spec.width].abs().max() > 1e-8, spec.name
        offset += spec.width


def test_flat_layers_without_a_mask_take_the_token_shape_from_the_batch():
    """No mask: (B, T) comes from the first token-shaped input (q_proj's); rows are still exact."""
    torch.manual_seed(1)
    model = tiny_qwen2_moe().double().eval()
    input_ids = torch.randint(1, 40, (2, 5))
    session = _session(model, include=[r"shared_expert", r"q_proj"])
    with session.capture(torch.arange(2)):
        session.backward(lm_loss(session.model(input_ids=input_ids).logits, input_ids))

    def one(call, p, i):
        return lm_loss(call(p, input_ids=input_ids[i : i + 1]).logits, input_ids[i : i + 1])

    ref = projected_reference(session, model, per_sample_weight_grads(model, _Loss(2, one)))
    torch.testing.assert_close(session.rows, ref, rtol=1e-9, atol=1e-11)


def _routed_loss(call, p, X, Y, i):
    return nn.functional.cross_entropy(call(p, X[i : i + 1]), Y[i : i + 1], reduction="sum")


def test_router_on_flattened_tokens_is_exact_and_routed_experts_are_refused_by_name():
    torch.manual_seed(0)
    model = RoutedNet().double()
    X, Y = torch.randn(3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError) as err:
        session = _session(model)
        with session.capture(torch.arange(3)):
            session.backward(nn.functional.cross_entropy(session.model(X), Y, reduction="sum"))
    message = str(err.value)
    assert "layer 'moe.experts." in message and "3 samples x 5 tokens = 15" in message
    assert "exclude" in message and "routed MoE expert" in message

    session = _session(model, exclude=[r"moe\.experts\."])
    assert [s.name for s in session.specs] == ["inp", "moe.router", "out"]
    with session.capture(torch.arange(3)):
        session.backward(nn.functional.cross_entropy(session.model(X), Y, reduction="sum"))
    ref = projected_reference(
        session, model, per_sample_weight_grads(model, _Loss(3, lambda c, p, i: _routed_loss(c, p, X, Y, i)))
    )
    torch.testing.assert_close(session.rows, ref, rtol=1e-10, atol=1e-12)


def test_a_layer_that_switches_between_samples_and_tokens_is_refused():
    """An expert that got exactly B*T tokens in one batch and another count later is routed: the
    first batch's rows cannot be trusted, so the job stops there, naming the layer."""
    from logra_dist.core.capture import GradientCapture

    cap = GradientCapture([], {}, {}, torch.float64)
    cap._tokens = (2, 3)
    assert cap._flat_tokens("e", 6) == (2, 3)
    assert cap._flat_tokens("e", 6) == (2, 3)
    with pytest.raises(ValueError, match=r"'e' saw 2 flattened rows .*it saw tokens before"):
        cap._flat_tokens("e", 2)
    assert cap._flat_tokens("head", 2) is None  # per-sample rows (a pooled head) stay samples
    with pytest.raises(ValueError, match=r"'x' saw 4 flattened rows but the batch has 2 samples x 3 tokens"):
        cap._flat_tokens("x", 4)
