"""`logra-dist log --fisher true --fisher-samples S` on the embedded LM: the rows keep the data's
labels, the statistics count S drawn copies per sample and differ; --fisher-exact is
refused for a language model with the way out."""

import json

import numpy as np
import pytest
import torch

import logra_dist as ld
from logra_dist.cli.main import main
from logra_dist.core.fisher import FisherTargets
from logra_dist.data import IGNORE
from logra_dist.index.format import read_stats

ARGS = ["--max-samples", "6", "--batch-size", "3", "--k-in", "2", "--k-out", "2", "--storage-dtype", "float32"]
ARGS += ["--include", r"layers\.0\.mlp", "--no-wandb"]


def test_true_fisher_with_samples_per_token(tmp_path):
    runs = {}
    for name, extra in (("emp", []), ("true", ["--fisher", "true", "--fisher-samples", "3"])):
        assert main(["log", "--out", str(tmp_path / name), *ARGS, *extra]) == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        with ld.GradientStore(tmp_path / name) as store:
            runs[name] = (manifest, store[:][np.argsort(store.ids)], read_stats(tmp_path / name / "stats.h5")[1])
    (m_emp, rows_emp, st_emp), (m_true, rows_true, st_true) = runs["emp"], runs["true"]
    assert m_true["config"]["fisher"] == "true" and m_true["config"]["fisher_samples"] == 3
    assert m_emp["samples_in_statistics"] == 6 and m_true["samples_in_statistics"] == 18  # 3 copies per sample
    np.testing.assert_allclose(rows_true, rows_emp, rtol=1e-6, atol=1e-8)  # rows: the data's labels
    for key in st_true:
        if key.endswith("/evals"):
            assert np.abs(st_true[key] - st_emp[key]).max() > 1e-3 * np.abs(st_emp[key]).max()


def test_fisher_exact_is_refused_for_language_models(tmp_path):
    with pytest.raises(ld.ConfigError, match="use --fisher true --fisher-samples S"):
        main(["log", "--out", str(tmp_path / "x"), *ARGS, "--fisher-exact"])
    assert not (tmp_path / "x").exists()


def test_lm_labels_draw_next_tokens_only_where_the_data_predicts():
    targets = FisherTargets("true", 2)
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 3, 4, IGNORE]])
    labels = targets.expand(labels)
    logits = torch.full((4, 4, 7), -30.0)
    logits[:, :, 1] = 30.0  # the model is sure the next token is 1
    drawn = targets.lm_labels(logits, labels, torch.Generator().manual_seed(0))
    want = torch.tensor([[IGNORE, IGNORE, 1, 1], [IGNORE, 1, 1, IGNORE]]).repeat(2, 1)
    assert torch.equal(drawn, want)
    with pytest.raises(ValueError, match="use fisher='true'"):
        FisherTargets("exact", 7).lm_labels(logits, labels)
