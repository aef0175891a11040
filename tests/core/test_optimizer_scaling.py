"""Optimizer-aware gradients: rows equal P_out (G / sqrt(r c^T / sum r)) P_in^T of torch.func's
per-sample gradients, with the second moments taken from the real optimizer in memory (not from
the reader); the index records the scaling's digest and the Scorer refuses a changed or missing
checkpoint."""

import pytest
import torch
from reference import lm_loss, log_classifier, mlp, per_sample_weight_grads, tiny_gpt2
from test_projected_gradients import _Loss
from torch import nn

import logra_dist as ld
from logra_dist.core.optimizer import factor, rank1_inverse_sqrt
from logra_dist.session import GradientSession

BETA2, EPS = 0.99, 1e-3  # an eps that matters next to these second moments


def _adam_steps(model: nn.Module, loss_fn, path, steps: int = 2) -> dict[str, torch.Tensor]:
    """Take Adam steps, save optimizer.pt as the HF Trainer does (torch state dict); returns each
    parameter's bias-corrected exp_avg_sq by name, read from the optimizer object itself."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, BETA2), eps=EPS)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model).backward()
        opt.step()
    torch.save(opt.state_dict(), path)
    return {n: opt.state[p]["exp_avg_sq"].double() / (1 - BETA2**steps) for n, p in model.named_parameters()}


class _Rows(GradientSession):
    def _on_batch(self, ids, rows):
        self.rows = rows


def _reference(session, grads, moments):
    """sum over layers of P_out (G * S) P_in^T with S the rank-1 inverse sqrt of v (+ eps^2)."""
    parts = []
    for spec in session.specs:
        g, v = grads[f"{spec.name}.weight"].double(), moments[f"{spec.name}.weight"]
        if spec.kind in ("conv1d", "embedding"):  # stored (d_in, d_out)
            g, v = g.transpose(1, 2), v.T
        scaled = g * rank1_inverse_sqrt(v, EPS)
        p_in, p_out = session.projection(spec.name)
        parts.append(torch.einsum("oa,bac,ic->boi", p_out.double(), scaled, p_in.double()).reshape(len(g), -1))
    return torch.cat(parts, dim=1)


def test_factor_is_the_rank1_form_of_the_floored_second_moment():
    v = torch.rand(4, 3, dtype=torch.float64) ** 4
    s = factor(v, EPS)
    w = v + EPS**2
    r, c = w.sum(1), w.sum(0)
    assert torch.allclose(torch.outer(s.row, s.col), 1 / (torch.outer(r, c) / r.sum()).sqrt())
    exact = torch.outer(torch.rand(4, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    assert torch.allclose(rank1_inverse_sqrt(exact, 0.0), exact.rsqrt())  # a rank-1 v is kept exactly


@pytest.mark.parametrize("init", ["random", "identity"])
def test_mlp_rows_equal_scaled_then_projected_gradients(tmp_path, init):
    torch.manual_seed(0)
    model = mlp().double()
    X, Y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ce = lambda m: nn.functional.cross_entropy(m(X), Y, reduction="sum")  # noqa: E731
    moments = _adam_steps(model, ce, tmp_path / "optimizer.pt")
    cfg = ld.LoGraConfig(
        k_in=3,
        k_out=2,
        init=init,
        compute_dtype="float64",
        hessian="none",
        optimizer_state=str(tmp_path / "optimizer.pt"),
    )
    session = _Rows(model, cfg)
    with session.capture(torch.arange(6)):
        session.backward(nn.functional.cross_entropy(session.model(X), Y, reduction="sum"))
    loss = _Loss(
        6, lambda call, p, i: nn.functional.cross_entropy(call(p, X[i : i + 1]), Y[i : i + 1], reduction="sum")
    )
    grads = per_sample_weight_grads(model, loss)
    ref = _reference(session, grads, moments)
    assert torch.allclose(session.rows, ref, rtol=1e-9, atol=1e-12)
    plain = _Rows(model, ld.LoGraConfig(**{**cfg.to_dict(), "optimizer_state": None}))
    with plain.capture(torch.arange(6)):
        plain.backward(nn.functional.cross_entropy(plain.model(X), Y, reduction="sum"))
    assert not torch.allclose(plain.rows, session.rows, rtol=1e-3)  # the scaling does something
    assert session.config.optimizer_state_digest == session.scaling.digest()


def test_gpt2_conv1d_padded_rows_equal_scaled_then_projected_gradients(tmp_path):
    torch.manual_seed(1)
    model = tiny_gpt2().double()
    ids = torch.randint(3, 40, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    lm = lambda m: lm_loss(m(input_ids=ids, attention_mask=mask).logits, labels)  # noqa: E731
    moments = _adam_steps(model, lm, tmp_path / "optimizer.pt")
    cfg = ld.LoGraConfig(
        k_in=3,
        k_out=2,
        compute_dtype="float64",
        hessian="none",
        exclude=["lm_head"],  # tied to wte: torch.func's gradient sums both uses, a row only this one
        optimizer_state=str(tmp_path / "optimizer.pt"),
    )
    session = _Rows(model, cfg)
    with session.capture(torch.arange(3), mask=mask):
        session.backward(lm(session.model))

    def one(call, p, i):
        out = call(p, input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        return lm_loss(out.logits, labels[i : i + 1])

    grads = per_sample_weight_grads(model, _Loss(3, one))
    assert {s.kind for s in session.specs} >= {"conv1d"}
    assert torch.allclose(session.rows, _reference(session, grads, moments), rtol=1e-8, atol=1e-10)


def test_index_records_the_scaling_and_the_scorer_refuses_a_changed_or_missing_checkpoint(tmp_path):
    torch.manual_seed(2)
    model = mlp()
    X, Y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    ce = lambda m: nn.functional.cross_entropy(m(X), Y, reduction="sum")  # noqa: E731
    state = tmp_path / "optimizer.pt"
    _adam_steps(model, ce, state)
    cfg = ld.LoGraConfig(k_in=3, k_out=2, storage_dtype="float32", optimizer_state=str(state))
    manifest = log_classifier(model, X, Y, tmp_path / "index", cfg)
    digest = manifest["config"]["optimizer_state_digest"]
    assert manifest["config"]["optimizer_state"] == str(state) and len(digest) == 24
    assert cfg.optimizer_state_digest is None  # the user's config object is not changed

    scorer = ld.Scorer(model, tmp_path / "index", mode="dot")
    with scorer.capture(torch.arange(2)):
        scorer.backward(nn.functional.cross_entropy(scorer.model(X[:2]), Y[:2], reduction="sum"))
    index_rows = torch.as_tensor(ld.GradientStore(tmp_path / "index")[0:2])
    assert torch.allclose(scorer.queries.local_rows().float(), index_rows, rtol=1e-4, atol=1e-6)
    scorer.close()

    _adam_steps(model, ce, state, steps=3)  # the user trained on: another second moment
    with pytest.raises(ld.ConfigError, match=rf"{state}.*logged with {digest}"):
        ld.Scorer(model, tmp_path / "index")
    state.unlink()
    with pytest.raises(ld.ConfigError, match=rf"logged with optimizer state {state}.*no such file"):
        ld.Scorer(model, tmp_path / "index")


def test_a_checkpoint_of_another_model_is_refused_naming_the_mismatch(tmp_path):
    other = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    torch.save(torch.optim.Adam(other.parameters()).state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer\.pt"):
        _Rows(mlp(), ld.LoGraConfig(k_in=2, k_out=2, optimizer_state=str(tmp_path / "optimizer.pt")))
