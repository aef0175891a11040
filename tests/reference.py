"""Independent references for the tests: tiny models, torch.func per-sample gradients, and
logging helpers. Nothing here uses logra_dist's hooks."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad

import logra_dist as ld


class ReusingMLP(nn.Module):
    """Uses `shared` twice in one forward: its per-sample gradient is the sum over both calls."""

    def __init__(self, d: int = 6, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def tiny_llama(vocab: int = 40):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(vocab: int = 40):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg)


def enable_checkpointing(model: nn.Module, reentrant: bool) -> nn.Module:
    """Hugging Face activation checkpointing as a training script turns it on, in train mode (it
    runs only there; the tiny configs here have no dropout, so train mode changes nothing else)."""
    from logra_dist.engines.loading import enable_checkpointing as enable

    enable(model, reentrant)
    return model.train()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def per_sample_weight_grads(model: nn.Module, loss_of_one) -> dict[str, torch.Tensor]:
    """{param name: (B, *weight.shape)} via torch.func.grad, one sample at a time (the reference
    must not share any code path with the batched hooks)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def call(p, *args, **kwargs):
        return functional_call(model, (p, buffers), args, kwargs)

    grads = []
    for i in range(loss_of_one.n):
        grads.append(grad(lambda p: loss_of_one(call, p, i))(params))
    return {k: torch.stack([g[k] for g in grads]) for k in params}


def projected_reference(session, model: nn.Module, weight_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rows P_out G P_in^T from full per-sample weight gradients, in the session's layout."""
    modules = dict(model.named_modules())
    parts = []
    for spec in session.specs:
        g = weight_grads[f"{spec.name}.weight"]
        if spec.kind in ("conv1d", "embedding"):  # both store the weight as (d_in, d_out)
            g = g.transpose(1, 2)
        assert g.shape[1:] == (spec.d_out, spec.d_in), (spec, g.shape, type(modules[spec.name]))
        p_in, p_out = session.projection(spec.name)
        parts.append(torch.einsum("oa,bac,ic->boi", p_out.double(), g.double(), p_in.double()).reshape(g.shape[0], -1))
    return torch.cat(parts, dim=1)


def log_classifier(model, X, Y, out_dir, config: ld.LoGraConfig, batch_size: int = 4, ids=None):
    """Log a classification data set with the public API; returns the finalized manifest."""
    ids = torch.arange(len(X)) if ids is None else ids
    logger = ld.attach(model, config, out_dir)
    for s in range(0, len(X), batch_size):
        sl = slice(s, s + batch_size)
        with logger.capture(ids[sl]):
            loss = nn.functional.cross_entropy(logger.model(X[sl]), Y[sl], reduction="sum")
            logger.backward(loss)
    manifest = logger.finalize()
    logger.close()
    return manifest


class PerSampleLoss:
    """A per-sample loss `fn(call, params, i)` over `n` samples, for `per_sample_weight_grads`."""

    def __init__(self, n, fn):
        self.n, self.fn = n, fn

    def __call__(self, call, params, i):
        return self.fn(call, params, i)


def rows_session(model, config: dict):
    """A GradientSession that keeps its last batch's rows (`.rows`) instead of writing them."""
    from logra_dist.session import GradientSession

    class Keep(GradientSession):
        def _on_batch(self, ids, rows):
            self.rows = rows

    return Keep(model, ld.LoGraConfig(**config))


def padded_lm_batch(lengths, vocab: int = 40):
    """(seqs, input_ids, mask, labels): random token sequences of `lengths`, right-padded."""
    seqs = [torch.randint(1, vocab, (n,)) for n in lengths]
    input_ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)], mask[i, : len(s)], labels[i, : len(s)] = s, 1, s
    return seqs, input_ids, mask, labels


def lm_rows_reference(session, model: nn.Module, seqs) -> torch.Tensor:
    """Each sequence's projected gradient computed ALONE on its unpadded tokens (torch.func)."""

    def one(call, p, i):
        s = seqs[i][None]
        return lm_loss(call(p, input_ids=s).logits, s)

    return projected_reference(session, model, per_sample_weight_grads(model, PerSampleLoss(len(seqs), one)))


def linear_covariances(model: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """{Linear name: (A, S)}: sample covariances of its inputs and output gradients under the summed
    cross-entropy of (X, Y), by plain autograd hooks (no logra_dist code)."""
    acts, outs = {}, {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def keep(name):
        def hook(module, inputs, output):
            acts[name] = inputs[0].detach()
            output.retain_grad()
            outs[name] = output

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    model.zero_grad()
    nn.functional.cross_entropy(model(X), Y, reduction="sum").backward()
    for h in hooks:
        h.remove()
    n = len(X)
    return {name: (acts[name].T @ acts[name] / n, outs[name].grad.T @ outs[name].grad / n) for name in layers}
