"""The command line honors the engine's precision (issue 12, section 2), end to end.

One 2-rank launch: `deepspeed launch/log.py --config <a Trainer-style bf16 ZeRO-3 config full of
HF "auto" values>` (before: DeepSpeed crashed on "auto", and the CLI's default --dtype float32
silently turned the config's bf16 off). Its rows must equal a one-process `--dtype bfloat16` run
within bf16 tolerance, differ from a float32 run by more than that, and the index must record
bf16 as the model's dtype. A --dtype the config contradicts is refused before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jobs import REPO, deepspeed_cmd, run_job

from logra_dist import GradientStore
from logra_dist.cli.main import main
from logra_dist.engines.spec import EngineConfigError

pytestmark = pytest.mark.distributed
N = 8
TRAINER_BF16 = {  # what a user's HF Trainer run with --bf16 uses
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    },
}


def _log_args(out: Path, *extra: str) -> list[str]:
    common = ["--max-samples", str(N), "--batch-size", "4", "--storage-dtype", "float32", "--k-in", "4"]
    return [*common, "--k-out", "4", "--out", str(out), "--no-wandb", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from logra_dist.embedded import ensure_default_model

    ensure_default_model()  # trained once per machine, here rather than by the ranks
    root = tmp_path_factory.mktemp("cli-precision")
    config = root / "trainer_bf16.json"
    config.write_text(json.dumps(TRAINER_BF16))
    run_job(deepspeed_cmd(REPO / "launch" / "log.py", "--config", config, *_log_args(root / "zero3")), root / "log.txt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["log", *_log_args(root / "bf16", "--dtype", "bfloat16")]) == 0
        assert main(["log", *_log_args(root / "fp32")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, config


def _rows(index: Path) -> np.ndarray:
    with GradientStore(index) as store:
        assert sorted(store.ids.tolist()) == list(range(N))
        return store.rows_for_ids(np.arange(N))


def test_zero3_bf16_config_logs_in_bf16_and_records_it(runs):
    root, _ = runs
    manifest = json.loads((root / "zero3" / "manifest.json").read_text())
    assert manifest["engine"] == "deepspeed-zero3" and manifest["world_size"] == 2
    assert manifest["data"]["model_dtype"] == manifest["metadata"]["dtype"] == "bfloat16"
    assert manifest["metadata"]["precision"] == {"model": "bfloat16", "storage": "float32"}
    assert json.loads((root / "fp32" / "manifest.json").read_text())["data"]["model_dtype"] == "float32"
    rows, bf16, fp32 = _rows(root / "zero3"), _rows(root / "bf16"), _rows(root / "fp32")
    scale = np.abs(fp32).max()
    bf16_gap = np.abs(rows - bf16).max() / scale  # 2 ranks vs one process, both bf16
    fp32_gap = np.abs(rows - fp32).max() / scale  # bf16 vs float32
    assert bf16_gap <= 3e-2, bf16_gap
    assert fp32_gap > 2 * bf16_gap and fp32_gap > 1e-3, (bf16_gap, fp32_gap)  # really computed in bf16


@pytest.mark.parametrize("asked", ["float32", "float16"])
def test_dtype_the_config_contradicts_is_refused(runs, asked, tmp_path):
    _, config = runs
    with pytest.raises(EngineConfigError) as err:
        main(["log", "--config", str(config), *_log_args(tmp_path / "refused", "--dtype", asked)])
    message = str(err.value)
    assert f"dtype {asked} was asked for" in message and "enables bfloat16" in message and "drop --dtype" in message
    assert not (tmp_path / "refused" / "manifest.json").exists()
