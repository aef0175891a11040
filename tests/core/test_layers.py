"""Layer types: the registry agrees with the config's names, nn.Embedding rows equal
P_out G P_in^T of torch.func's per-sample embedding gradients, and engines name layers."""

from types import SimpleNamespace

import pytest
import torch
from reference import lm_loss, mlp, per_sample_weight_grads, projected_reference, tiny_gpt2, tiny_llama
from test_projected_gradients import _Loss, _session
from torch import nn

import logra_dist as ld
from logra_dist import config as config_module
from logra_dist.core.layers import LAYER_TYPES, handler_for


def test_registry_names_equal_the_configs_list():
    assert LAYER_TYPES.names() == list(config_module.LAYER_TYPES)
    assert set(config_module.DEFAULT_LAYER_TYPES) <= set(LAYER_TYPES.names())
    assert ld.LoGraConfig().layer_types == ["linear", "conv1d"]  # today's default: layouts unchanged


def test_handlers_take_widths_from_module_attributes():
    lin, emb = nn.Linear(5, 7), nn.Embedding(11, 4, padding_idx=2)
    assert (handler_for(lin).name, handler_for(lin).d_in, handler_for(lin).d_out) == ("linear", 5, 7)
    assert (handler_for(emb).name, handler_for(emb).d_in, handler_for(emb).d_out) == ("embedding", 11, 4)
    emb.weight = nn.Parameter(torch.empty(0))  # as under ZeRO-3 outside the forward
    assert (handler_for(emb).d_in, handler_for(emb).d_out) == (11, 4)
    assert handler_for(nn.Tanh()) is None


def test_layer_types_config_is_validated_keyed_and_round_trips():
    cfg = ld.LoGraConfig(layer_types=["embedding", "linear"])
    assert ld.LoGraConfig.from_json(cfg.to_json()) == cfg
    assert cfg.row_compatibility_key["layer_types"] == ["embedding", "linear"]
    assert ld.LoGraConfig().row_compatibility_key["layer_types"] == ["conv1d", "linear"]
    assert ld.LoGraConfig(layer_types=["linear", "embedding"]).row_compatibility_key == cfg.row_compatibility_key
    assert ld.LoGraConfig.from_dict({}).layer_types == ["linear", "conv1d"]  # old configs: today's types
    for bad, msg in (
        (["conv2d"], r"layer_types \['conv2d'\] are not among"),
        ([], "non-empty list"),
        ("linear", "non-empty list"),
        (["linear", "linear"], "twice"),
    ):
        with pytest.raises(ld.ConfigError, match=msg):
            ld.LoGraConfig(layer_types=bad)


def test_cli_layer_types_flag_reaches_the_config():
    from logra_dist.cli.jobs import logra_config
    from logra_dist.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(["log", "--layer-types", "linear", "embedding"])
    assert logra_config(args).layer_types == ["linear", "embedding"]
    assert logra_config(parser.parse_args(["log"])).layer_types == ["linear", "conv1d"]
    with pytest.raises(SystemExit):
        parser.parse_args(["log", "--layer-types", "conv2d"])


def test_embedding_is_not_logged_by_default():
    torch.manual_seed(0)
    names = [s.name for s in _session(tiny_llama()).specs]
    with_emb = _session(tiny_llama(), layer_types=["linear", "embedding"]).specs
    assert [s.name for s in with_emb] == ["model.embed_tokens", *names]
    assert (with_emb[0].kind, with_emb[0].d_in, with_emb[0].d_out) == ("embedding", 40, 16)


class EmbedLM(nn.Module):
    """Embedding -> masked causal mean -> head: every token's embedding gradient depends on the
    later tokens' losses, and padded positions contribute nothing."""

    def __init__(self, vocab: int = 11, d: int = 6, padding_idx: int | None = None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.emb(input_ids))
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m[..., None].to(h.dtype)
        c = torch.cumsum(h * m, 1) / torch.cumsum(m, 1).clamp(min=1)
        return SimpleNamespace(logits=self.head(torch.tanh(self.mix(c))))


# Repeated ids within a sample, and (for padding_idx=0) the padding id inside real tokens.
SEQS = [[3, 5, 3, 3, 0, 5, 7], [0, 9, 9, 2], [1, 4, 4, 4, 8, 0, 0, 6, 10]]


def _padded_batch(seqs, pad=0):
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, s in enumerate(seqs):
        n = len(s)
        input_ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(s), 1, torch.tensor(s)
    return input_ids, mask, labels


def _check_rows(model, session, seqs, rtol=1e-10, atol=1e-12):
    """Log one right-padded batch; compare with each sample's gradient computed ALONE."""
    input_ids, mask, labels = _padded_batch(seqs)
    with session.capture(torch.arange(len(seqs)), mask=mask):
        out = session.model(input_ids=input_ids, attention_mask=mask)
        session.backward(lm_loss(out.logits, labels))

    def one(call, p, i):
        s = torch.tensor(seqs[i])[None]
        return lm_loss(call(p, input_ids=s).logits, s)

    grads = per_sample_weight_grads(model, _Loss(len(seqs), one))
    ref = projected_reference(session, model, grads)
    assert session.rows.shape == ref.shape
    torch.testing.assert_close(session.rows, ref, rtol=rtol, atol=atol)
    return grads


@pytest.mark.parametrize("padding_idx", [None, 0], ids=["no-padding-idx", "padding-idx"])
@pytest.mark.parametrize("init", ["random", "identity"])
def test_embedding_rows_match_torch_func(padding_idx, init):
    torch.manual_seed(0)
    model = EmbedLM(padding_idx=padding_idx).double()
    session = _session(model, init=init, layer_types=["embedding", "linear"])
    assert [(s.name, s.kind) for s in session.specs] == [("emb", "embedding"), ("mix", "linear"), ("head", "linear")]
    emb = session.specs[0]
    assert (emb.d_in, emb.d_out) == (11, 6) and (emb.k_in, emb.k_out) == ((11, 6) if init == "identity" else (3, 2))
    grads = _check_rows(model, session, SEQS)
    g = grads["emb.weight"]
    if padding_idx is not None:  # the reference itself follows torch: no gradient to the padding row
        assert torch.all(g[:, padding_idx] == 0) and g[:, 3].abs().sum() > 0
    else:
        assert g[:, 0].abs().sum() > 0
    width = emb.width
    assert session.rows[:, :width].abs().sum() > 0


def test_embedding_pca_counts_only_real_non_padding_tokens(tmp_path):
    """PCA on one-hot inputs: A = diag(token counts), so P_in's rows are the most frequent ids,
    counted over attended tokens that are not padding_idx (2 here; the batch pads with 10)."""
    torch.manual_seed(0)
    model = EmbedLM(padding_idx=2).double()
    seqs = [[3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 7], [7, 7, 2, 2, 2, 2, 2, 2, 2], [5, 1, 4]]  # 3:6 5:5 7:3, 2:7
    input_ids, mask, labels = _padded_batch(seqs, pad=10)  # 10 unmasked would count 10 times
    cfg = ld.LoGraConfig(
        k_in=3, k_out=2, init="pca", hessian="kfac", layer_types=["embedding"], compute_dtype="float64"
    )
    logger = ld.attach(model, cfg, tmp_path)
    for phase in (logger.pca_pass(), torch.enable_grad()):
        with phase, logger.capture(torch.arange(3), mask=mask):
            logger.backward(lm_loss(logger.model(input_ids=input_ids, attention_mask=mask).logits, labels))
    p_in, _ = logger.projection("emb")
    torch.testing.assert_close(p_in, torch.eye(11, dtype=p_in.dtype)[[3, 5, 7]])
    logger.finalize()
    logger.close()
    assert ld.GradientStore(tmp_path)[:].shape == (3, 6)


def test_llama_embedding_with_padding_idx_matches_torch_func():
    """embed_tokens (padding_idx = pad_token_id = 0, frozen: its output needs the capture anchor)
    logged together with every Linear, on a padded batch with the pad id inside a sample."""
    torch.manual_seed(0)
    model = tiny_llama().double().eval()
    assert model.model.embed_tokens.padding_idx == 0
    session = _session(model, layer_types=["linear", "embedding"])
    assert session.specs[0].name == "model.embed_tokens"
    seqs = [[5, 0, 7, 5, 5, 12, 3], [9, 9, 1, 0], [30, 2, 2, 8, 39, 17, 17, 4, 0]]
    _check_rows(model, session, seqs, rtol=1e-9, atol=1e-11)


def test_position_embedding_shared_by_the_batch_is_a_clear_error():
    """GPT-2's wpe is fed (1, T) position ids: its output gradient is summed over the batch."""
    torch.manual_seed(0)
    session = _session(tiny_gpt2(), layer_types=["embedding"])
    assert [s.name for s in session.specs] == ["transformer.wte", "transformer.wpe"]
    ids = torch.randint(1, 40, (3, 5))
    for mask in (None, torch.ones(3, 5, dtype=torch.long)):
        shared = r"'transformer.wpe'.*shared by the whole batch.*exclude it"
        with pytest.raises(ValueError, match=shared), session.capture(torch.arange(3), mask=mask):
            session.backward(lm_loss(session.model(input_ids=ids, attention_mask=mask).logits, ids))


def test_engine_names_drop_wrapper_segments():
    from logra_dist.engines import wrap
    from logra_dist.engines.fsdp import FSDP1Engine

    outer = nn.Module()
    outer._orig_mod = nn.Module()  # torch.compile's segment
    outer._orig_mod._checkpoint_wrapped_module = mlp()  # activation checkpointing's
    engine = wrap(outer)
    assert engine.canonical_name("_orig_mod._checkpoint_wrapped_module.2") == "2"
    assert engine.canonical_name("a._fsdp_wrapped_module.b") == "a._fsdp_wrapped_module.b"  # no FSDP1 here
    assert "_fsdp_wrapped_module" in FSDP1Engine.wrapper_segments
    session = _session(outer)
    assert [s.name for s in session.specs] == ["0", "2", "4"]
