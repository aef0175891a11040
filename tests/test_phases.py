"""The Logger's phases: every call out of order raises, naming the phase and what to do instead;
the Scorer without a model refuses to capture. One process, a tiny nn.Linear."""

import pytest
import torch
from torch import nn

import logra_dist as ld
from logra_dist.logger import Phase


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


def _capture(session, ids) -> None:
    x = torch.randn(len(ids), 4)
    with session.capture(torch.as_tensor(ids)):
        session.backward(session.model(x).pow(2).sum())


def _logger(tmp_path, **cfg) -> ld.Logger:
    return ld.attach(_model(), ld.LoGraConfig(k_in=2, k_out=2, storage_dtype="float32", **cfg), tmp_path / "idx")


def test_phases_in_order(tmp_path):
    logger = _logger(tmp_path, init="pca")
    assert logger.phase is Phase.PCA_PENDING and logger.needs_pca_pass
    with logger.pca_pass():
        assert logger.phase is Phase.PCA
        _capture(logger, [0, 1, 2])
    assert logger.phase is Phase.LOGGING and not logger.needs_pca_pass
    _capture(logger, [0, 1, 2])
    logger.finalize()
    assert logger.phase is Phase.FINALIZED
    logger.close()
    assert logger.phase is Phase.CLOSED
    logger.close()  # closing twice is harmless
    assert logger.phase is Phase.CLOSED


def test_capture_before_the_pca_pass(tmp_path):
    logger = _logger(tmp_path, init="pca")
    with pytest.raises(RuntimeError, match=r"capture\(\) in phase 'pca-pending': .*pca_pass"):
        _capture(logger, [0])
    with pytest.raises(RuntimeError, match=r"finalize\(\) in phase 'pca-pending': .*pca_pass"):
        logger.finalize()
    logger.close()


def test_capture_after_finalize(tmp_path):
    logger = _logger(tmp_path)
    _capture(logger, [0, 1])
    logger.finalize()
    with pytest.raises(RuntimeError, match=r"capture\(\) in phase 'finalized': .*attach a new Logger"):
        _capture(logger, [2])
    logger.close()


def test_finalize_twice(tmp_path):
    logger = _logger(tmp_path)
    _capture(logger, [0, 1])
    manifest = logger.finalize()
    assert manifest["total_rows"] == 2
    with pytest.raises(RuntimeError, match=r"finalize\(\) in phase 'finalized': the index is finalized"):
        logger.finalize()
    logger.close()


def test_capture_and_finalize_after_close(tmp_path):
    logger = _logger(tmp_path)
    _capture(logger, [0, 1])
    logger.close()
    with pytest.raises(RuntimeError, match=r"capture\(\) in phase 'closed': the Logger is closed"):
        _capture(logger, [2])
    with pytest.raises(RuntimeError, match=r"finalize\(\) in phase 'closed': the Logger is closed"):
        logger.finalize()
    assert all(p.requires_grad for p in logger.engine.root.parameters())  # close() restored the weights


def test_pca_pass_when_not_needed(tmp_path):
    logger = _logger(tmp_path)  # init="random": projections exist from the start
    assert logger.phase is Phase.LOGGING
    with (
        pytest.raises(RuntimeError, match=r"pca_pass\(\) in phase 'logging': it is only for config.init='pca'"),
        logger.pca_pass(),
    ):
        pass
    logger.close()
    pca = _logger(tmp_path / "pca", init="pca")
    with pca.pca_pass():
        _capture(pca, [0, 1])
    with pytest.raises(RuntimeError, match=r"pca_pass\(\) in phase 'logging'"), pca.pca_pass():  # only once
        pass
    pca.close()


def test_statistics_pass_before_projections(tmp_path):
    logger = _logger(tmp_path, init="pca", hessian="raw", fisher="true")
    with (
        pytest.raises(RuntimeError, match=r"statistics_pass\(\) in phase 'pca-pending': .*pca_pass"),
        logger.statistics_pass(),
    ):
        pass
    with logger.pca_pass():
        _capture(logger, [0, 1])
    with logger.statistics_pass():
        assert logger.phase is Phase.STATISTICS
        _capture(logger, [0, 1])
        with pytest.raises(RuntimeError, match=r"finalize\(\) in phase 'statistics': leave the"):
            logger.finalize()
    assert logger.phase is Phase.LOGGING
    _capture(logger, [0, 1])
    assert logger.finalize()["total_rows"] == 2
    logger.close()


def test_failed_block_returns_to_the_phase_before(tmp_path):
    logger = _logger(tmp_path, init="pca")
    with pytest.raises(ValueError, match="boom"), logger.pca_pass():
        raise ValueError("boom")
    assert logger.phase is Phase.PCA_PENDING  # the pass can be run again
    with logger.pca_pass():
        _capture(logger, [0, 1])
    assert logger.phase is Phase.LOGGING
    logger.close()


def test_scorer_without_a_model_refuses_to_capture(tmp_path):
    logger = _logger(tmp_path)
    _capture(logger, [0, 1, 2])
    logger.finalize()
    logger.close()
    scorer = ld.Scorer(None, tmp_path / "idx", mode="dot")
    assert scorer.session is None and [s.name for s in scorer.specs] == ["0"]
    with (
        pytest.raises(RuntimeError, match=r"Scorer.capture\(\): this Scorer was made without a model"),
        scorer.capture(torch.arange(2)),
    ):
        pass
    with pytest.raises(RuntimeError, match="without a model"):
        _ = scorer.model
    scorer.close()

    model = _model()
    scorer = ld.Scorer(model, tmp_path / "idx", mode="dot")
    assert scorer.session is not None and scorer.engine.root is model and scorer.device.type == "cpu"
    _capture(scorer, [7])
    assert scorer.query_ids.tolist() == [7]
    assert scorer.projection("0")[0].shape == (2, 4)  # (k_in, d_in)
    assert scorer.topk(2).train_ids.shape == (1, 2)
    scorer.close()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match=r"capture\(\) after close\(\)"):
        _capture(scorer, [8])
