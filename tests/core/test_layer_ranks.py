"""Per-layer ranks: capped at a narrow layer's width, overridden by regex (first match wins),
recorded in the layout and the config, exact against torch.func."""

import json

import pytest
import torch
from reference import log_classifier, mlp, per_sample_weight_grads, projected_reference
from torch import nn

import logra_dist as ld
from logra_dist.cli.parser import build_parser
from logra_dist.core.curvature import KFAC
from logra_dist.core.projection import LayerSpec
from logra_dist.index.inspect import inspect_index, render
from logra_dist.session import GradientSession


class _Keep(GradientSession):
    def _on_batch(self, ids, rows):
        self.rows = rows


class _Loss:
    def __init__(self, X, Y):
        self.X, self.Y, self.n = X, Y, len(X)

    def __call__(self, call, p, i):
        return nn.functional.cross_entropy(call(p, self.X[i : i + 1]), self.Y[i : i + 1], reduction="sum")


def _cfg(**over):
    return ld.LoGraConfig(**{"compute_dtype": "float64", "storage_dtype": "float32", "hessian": "none", **over})


@pytest.mark.parametrize("init", ["random", "pca"])
def test_capped_and_overridden_ranks_give_exact_projected_gradients(init):
    """mlp is 5 -> 7 -> 6 -> 3: at k=16 every side is capped; layer "2" is overridden to 4 x 3."""
    torch.manual_seed(0)
    model = mlp().double()
    X, Y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    session = _Keep(model, _cfg(init=init, ranks={r"^2$": [4, 3], r"\d": [1, 1]}))  # "2" matches both: first wins
    assert [(s.name, s.k_in, s.k_out) for s in session.specs] == [("0", 1, 1), ("2", 4, 3), ("4", 1, 1)]
    session = _Keep(model, _cfg(init=init, ranks={r"^2$": [4, 3]}))
    assert [(s.name, s.k_in, s.k_out) for s in session.specs] == [("0", 5, 7), ("2", 4, 3), ("4", 6, 3)]
    if init == "pca":
        with pytest.raises(RuntimeError, match="pca_pass"):
            session.projection("0")
        full = KFAC([LayerSpec(s.name, s.kind, s.d_in, s.d_out, s.d_in, s.d_out) for s in session.specs])
        full.sums = {k: torch.eye(v.shape[0], dtype=torch.float64) + 0.1 for k, v in full.sums.items()}
        session._install(session._build_projections(full.covariances()))
    for spec in session.specs:
        p_in, p_out = session.projection(spec.name)
        assert p_in.shape == (spec.k_in, spec.d_in) and p_out.shape == (spec.k_out, spec.d_out)
    with session.capture(torch.arange(6)):
        session.backward(nn.functional.cross_entropy(session.model(X), Y, reduction="sum"))
    ref = projected_reference(session, model, per_sample_weight_grads(model, _Loss(X, Y)))
    assert session.rows.shape == (6, 5 * 7 + 4 * 3 + 6 * 3)
    torch.testing.assert_close(session.rows, ref, rtol=1e-10, atol=1e-12)
    session.close()


def test_ten_class_head_logs_at_default_ranks_and_overrides_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    X, Y = torch.randn(12, 20), torch.randint(0, 10, (12,))
    cfg = ld.LoGraConfig(ranks={r"^0$": [8, 4]})  # defaults otherwise: k = 16, raw Fisher, float16
    manifest = log_classifier(model, X, Y, tmp_path, cfg)
    with ld.GradientStore(tmp_path) as store:
        assert [(s.name, s.k_in, s.k_out) for s in store.layout] == [("0", 8, 4), ("2", 16, 10)]
        assert store.width == 8 * 4 + 16 * 10 and len(store) == 12
    again = ld.LoGraConfig.from_dict(json.loads((tmp_path / "manifest.json").read_text())["config"])
    assert again == cfg and again.ranks == [["^0$", 8, 4]]
    assert again.row_compatibility_key["ranks"] == [["^0$", 8, 4]]
    assert ld.LoGraConfig().row_compatibility_key != cfg.row_compatibility_key  # ranks change rows
    assert manifest["config"]["ranks"] == [["^0$", 8, 4]]
    page = render(inspect_index(tmp_path))
    assert "ranks overrides (first match wins): [['^0$', 8, 4]]" in page
    assert "2 layer(s) with their own ranks" in page and "16 x 10" not in page  # k_out x k_in
    assert "10 x 16    of 10 x 32" in page and "4 x 8     of 32 x 20" in page
    scorer = ld.Scorer(model, tmp_path, mode="dot")  # the query side rebuilds the same layout
    with scorer.capture(torch.arange(2)):
        scorer.backward(nn.functional.cross_entropy(scorer.model(X[:2]), Y[:2], reduction="sum"))
    assert scorer.scores().shape == (2, 12)
    scorer.close()


def test_rank_order_survives_sorted_json_and_bad_overrides_are_refused(tmp_path):
    cfg = ld.LoGraConfig(ranks={"z_last": [2, 2], "a_first": [3, 3]})
    text = json.dumps(cfg.to_dict(), sort_keys=True)  # how manifest.json is written
    assert ld.LoGraConfig.from_json(text).ranks == [["z_last", 2, 2], ["a_first", 3, 3]]
    assert cfg.layer_ranks("a_first z_last") == (2, 2)
    for bad, msg in (
        ({"x": [0, 2]}, r"ranks\['x'\] must be two positive integers"),
        ({"x": [2]}, "two positive integers"),
        ({"x": [2, 2.5]}, "two positive integers"),
        ({"(": [2, 2]}, "not a valid regex"),
        ("lm_head", "ranks must map layer regexes"),
    ):
        with pytest.raises(ld.ConfigError, match=msg):
            ld.LoGraConfig(ranks=bad)
    with pytest.raises(ld.ConfigError, match="init='identity'"):
        ld.LoGraConfig(init="identity", ranks={"x": [2, 2]})
    with pytest.raises(ld.ConfigError, match=r"ranks pattern\(s\) \['\^4\$', 'head'\] match no logged layer"):
        ranks = {"^4$": [1, 1], "^0$": [2, 2], "head": [1, 1]}  # "^4$" is excluded: it matches no LOGGED layer
        ld.attach(mlp(), ld.LoGraConfig(exclude=["^4$"], ranks=ranks), tmp_path)


def test_cli_ranks_flag_parses_into_the_config():
    from logra_dist.cli.jobs import logra_config

    args = build_parser().parse_args(["log", "--ranks", r"mlp\.down_proj=32,16", "lm_head=8,8", "--k-in", "4"])
    cfg = logra_config(args)
    assert cfg.ranks == [[r"mlp\.down_proj", 32, 16], ["lm_head", 8, 8]] and cfg.k_in == 4
    for bad in ("lm_head", "lm_head=8", "=8,8", "lm_head=8,0", "lm_head=a,b"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["log", "--ranks", bad])


def test_resume_with_other_ranks_is_refused_naming_them(tmp_path):
    torch.manual_seed(0)
    model, X, Y = mlp(), torch.randn(8, 5), torch.randint(0, 3, (8,))
    cfg = dict(k_in=2, k_out=2, flush_rows=2, storage_dtype="float32")
    logger = ld.attach(model, ld.LoGraConfig(**cfg), tmp_path, commit_seconds=0)
    for s in (0, 4):
        with logger.capture(torch.arange(s, s + 4)):
            logger.backward(nn.functional.cross_entropy(logger.model(X[s : s + 4]), Y[s : s + 4], reduction="sum"))
    logger.close()  # not finalized: a partial shard to resume
    refused = r"layout\[2\]\.k_in is 2 in the interrupted job, 1 now.*config\.ranks"
    with pytest.raises(ld.IndexFormatError, match=refused):
        ld.attach(model, ld.LoGraConfig(**cfg, ranks={"^4$": [1, 1]}), tmp_path, resume=True)
