"""Presets: a named recipe plus overrides, recorded in the index (name and resolved fields) and
read back unchanged; unknown names refused listing the known ones; `log --preset` reaches it."""

import pytest
import torch
from reference import mlp
from reliability_helpers import assert_same_index
from torch import nn

import logra_dist as ld
from logra_dist.config import PRESETS
from logra_dist.core.fisher import FisherTargets


def test_presets_resolve_override_and_refuse_unknown_names():
    assert ld.LoGraConfig.from_preset("fast") == ld.LoGraConfig(preset="fast")  # "fast" is the defaults
    acc = ld.LoGraConfig.from_preset("accurate", k_in=4)
    assert (acc.preset, acc.k_in) == ("accurate", 4)
    assert {k: getattr(acc, k) for k in PRESETS["accurate"]} == PRESETS["accurate"]
    assert ld.LoGraConfig.from_preset("accurate", damping=2.0).damping == 2.0  # overrides win
    with pytest.raises(ld.ConfigError, match=r"unknown preset 'best'.*\['fast', 'accurate'\]"):
        ld.LoGraConfig.from_preset("best")
    with pytest.raises(ld.ConfigError, match="preset='best' is not one of"):
        ld.LoGraConfig(preset="best")


def test_accurate_preset_round_trips_through_the_index(tmp_path):
    """On a classifier the preset's model Fisher is the exact expectation over its 3 classes (the
    caller passes the class count to `fisher_targets`), recorded as such; no PCA pass."""
    torch.manual_seed(0)
    model = mlp()
    X, Y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    config = ld.LoGraConfig.from_preset("accurate", k_in=3, k_out=2, storage_dtype="float32")
    logger = ld.attach(model, config, tmp_path)
    assert not logger.needs_pca_pass  # random projections: the statistics pass is the one extra pass
    assert FisherTargets.for_config(config) == FisherTargets("true", 8)  # text: 8 draws per token
    targets = logger.fisher_targets(classes=3)
    assert targets == FisherTargets("exact", 3)
    with pytest.raises(ld.ConfigError, match=r"would make this job's statistics \{'kind': 'true', 'samples': 8\}"):
        logger.fisher_targets()  # the estimator may not change within a job

    for s in range(0, 8, 4):
        ids, xb = torch.arange(s, s + 4), X[s : s + 4]
        with logger.statistics_pass(), logger.capture(targets.expand(ids)):
            logger.backward(targets.loss(logger.model(targets.expand(xb))))
        with logger.capture(ids):
            logger.backward(nn.functional.cross_entropy(logger.model(xb), Y[s : s + 4], reduction="sum"))
    manifest = logger.finalize()
    logger.close()
    assert manifest["config"]["preset"] == "accurate"
    assert manifest["samples_in_statistics"] == 3 * 8  # one weighted copy per class, not the logged rows
    assert manifest["metadata"]["fisher_estimator"] == {"kind": "exact", "classes": 3}
    assert ld.LoGraConfig.from_dict(manifest["config"]) == config
    assert ld.GradientStore(tmp_path).config == config


def test_a_resumed_job_keeps_the_fisher_estimator_of_its_interrupted_attempt(tmp_path):
    """The estimator is committed with the statistics it made: resuming with another class count
    (or none) is refused naming both, before a batch is added; the same one finishes the job,
    equal to an uninterrupted run."""
    torch.manual_seed(0)
    X, Y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    config = ld.LoGraConfig.from_preset("accurate", k_in=3, k_out=2, storage_dtype="float32", flush_rows=4)

    def log(logger, starts):
        targets = logger.fisher_targets(classes=3)
        for s in starts:
            ids, xb = torch.arange(s, s + 4), X[s : s + 4]
            with logger.statistics_pass(), logger.capture(targets.expand(ids)):
                logger.backward(targets.loss(logger.model(targets.expand(xb))))
            with logger.capture(ids):
                logger.backward(nn.functional.cross_entropy(logger.model(xb), Y[s : s + 4], reduction="sum"))

    torch.manual_seed(1)
    model = mlp()
    whole = ld.attach(model, config, tmp_path / "whole")
    log(whole, (0, 4))
    want = whole.finalize()
    whole.close()

    first = ld.attach(model, config, tmp_path / "job", commit_seconds=0)  # commits at every 4 rows
    log(first, (0,))
    first.close()  # interrupted: the partial shard and its statistics stay
    again = ld.attach(model, config, tmp_path / "job", resume=True)
    assert again.done_ids == {0, 1, 2, 3}
    with pytest.raises(ld.ConfigError, match=r"\{'kind': 'true', 'samples': 8\}.*an interrupted attempt's.*'exact'"):
        again.fisher_targets()  # text's sampled draws would join the first attempt's exact statistics
    log(again, (4,))
    got = again.finalize()
    again.close()
    assert got["metadata"]["fisher_estimator"] == {"kind": "exact", "classes": 3}
    assert got["samples_in_statistics"] == want["samples_in_statistics"] == 3 * 8
    assert_same_index(tmp_path / "job", tmp_path / "whole")  # rows, Fisher, counts


def test_a_finalize_killed_before_its_manifest_resumes_with_the_same_estimator(tmp_path, monkeypatch):
    """The other resume path: the shard is complete and its statistics lie beside it
    (`rank-*.stats.npz`); the estimator they were made with comes back from there."""
    from logra_dist import logger as logger_module

    torch.manual_seed(0)
    X, Y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    config = ld.LoGraConfig.from_preset("accurate", k_in=3, k_out=2, storage_dtype="float32")
    model, ids = mlp(), torch.arange(4)
    first = ld.attach(model, config, tmp_path)
    targets = first.fisher_targets(classes=3)
    with first.statistics_pass(), first.capture(targets.expand(ids)):
        first.backward(targets.loss(first.model(targets.expand(X))))
    with first.capture(ids):
        first.backward(nn.functional.cross_entropy(first.model(X), Y, reduction="sum"))
    write = logger_module.write_json_atomic

    def killed(path, data):
        if path.name == "manifest.json":
            raise KeyboardInterrupt("killed before the manifest")
        write(path, data)

    monkeypatch.setattr(logger_module, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        first.finalize()
    first.close()
    monkeypatch.setattr(logger_module, "write_json_atomic", write)
    again = ld.attach(model, config, tmp_path, resume=True)
    assert (tmp_path / "shards" / "rank-00000.h5").exists() and again.done_ids == {0, 1, 2, 3}
    with pytest.raises(ld.ConfigError, match=r"an interrupted attempt's too\) used \{'kind': 'exact', 'classes': 3\}"):
        again.fisher_targets(classes=4)
    assert again.fisher_targets(classes=3) == targets
    manifest = again.finalize()
    again.close()
    assert manifest["metadata"]["fisher_estimator"] == {"kind": "exact", "classes": 3}
    assert manifest["samples_in_statistics"] == 3 * 4


def test_cli_preset_flag_and_overrides_reach_the_config():
    from logra_dist.cli.jobs import logra_config
    from logra_dist.cli.parser import build_parser

    parser = build_parser()
    cfg = logra_config(parser.parse_args(["log", "--preset", "accurate", "--damping", "0.5"]))
    assert (cfg.preset, cfg.init, cfg.hessian, cfg.damping) == ("accurate", "random", "raw", 0.5)
    assert (cfg.fisher, cfg.fisher_samples) == ("model", 8)
    cfg = logra_config(parser.parse_args(["log", "--preset", "accurate", "--fisher-samples", "2"]))
    assert (cfg.fisher, cfg.fisher_samples) == ("model", 2)
    assert logra_config(parser.parse_args(["log"])).preset is None
    cfg = logra_config(parser.parse_args(["log", "--optimizer-state", "ckpt/optimizer.pt"]))
    assert cfg.optimizer_state == "ckpt/optimizer.pt"
    with pytest.raises(SystemExit):
        parser.parse_args(["log", "--preset", "best"])


def test_log_preset_accurate_runs_its_extra_passes_inside_the_job(tmp_path, capsys):
    """`log --preset accurate` on the embedded model: the model Fisher's statistics pass (on text:
    8 sampled copies per sample, recorded) runs in the same job; rows keep the data's labels."""
    import json

    from logra_dist.cli.main import main

    args = ["--max-samples", "6", "--batch-size", "3", "--k-in", "2", "--k-out", "2", "--storage-dtype", "float32"]
    args += ["--include", r"layers\.0\.mlp", "--no-wandb"]
    assert main(["log", "--out", str(tmp_path / "acc"), "--preset", "accurate", *args]) == 0
    phases = next(line for line in capsys.readouterr().err.splitlines() if "phases (share of wall time" in line)
    assert "statistics " in phases  # the statistics pass is timed as its own phase
    manifest = json.loads((tmp_path / "acc" / "manifest.json").read_text())
    cfg = manifest["config"]
    assert (cfg["preset"], cfg["init"], cfg["fisher"], cfg["fisher_samples"]) == ("accurate", "random", "model", 8)
    assert manifest["metadata"]["fisher_estimator"] == {"kind": "true", "samples": 8}
    from logra_dist.index.inspect import inspect_index, render

    assert "(model Fisher: 8 labels drawn per token)" in render(inspect_index(tmp_path / "acc"))
    assert manifest["total_rows"] == 6 and manifest["samples_in_statistics"] == 8 * 6
