"""The model-family matrix (issue 12, section 3): every causal-LM family transformers names or
ties differently (families.py) loads sharded under ZeRO-3 (`zero.Init`) and FSDP2 (meta device,
each rank reading only its rows) and logs, on 2 ranks, the rows one process logs with the whole
model, row for row.

Two launches in all: one `deepspeed --num_gpus 2` and one `torchrun` job, each looping over
every family in one process group (family_worker.py); the references run in this process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import family_worker  # noqa: E402
from families import FAMILIES, save_all  # noqa: E402
from jobs import REPO, deepspeed_cmd, free_port, run_job  # noqa: E402

from logra_dist import GradientStore  # noqa: E402

pytestmark = pytest.mark.distributed
ENGINES = {"zero3": "zero3.json", "fsdp2": "fsdp2.json"}
BF16 = "llama@bfloat16"  # FSDP2 honoring --dtype bfloat16 (ZeRO-3 bf16: test_cli_precision.py)
CHECKPOINTED = ("llama@ckpt", "llama@ckpt-reentrant")  # activation checkpointing, as training scripts run it


def _launch(engine: str, models: Path, out: Path) -> list[str]:
    worker = HERE / "family_worker.py"
    args = ["--models", models, "--out", out, "--config", REPO / "configs" / ENGINES[engine]]
    extra = [BF16, *CHECKPOINTED] if engine == "fsdp2" else list(CHECKPOINTED)
    args += ["--families", ",".join([*FAMILIES, *extra])]
    if engine.startswith("zero"):
        return deepspeed_cmd(worker, *args)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*torchrun, "--master_port", str(free_port()), str(worker), *map(str, args)]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from logra_dist.engines.loading import load_causal_lm

    root = tmp_path_factory.mktemp("families")
    models = save_all(root / "models")
    for engine in ENGINES:
        run_job(_launch(engine, root / "models", root / engine), root / f"{engine}.txt", timeout_s=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for family, path in models.items():
            loaded = load_causal_lm(path, engine="none")
            family_worker.log_family(loaded.wrapped, loaded.device, root / "none" / family / "index")
        loaded = load_causal_lm(models["llama"], engine="none", dtype="bfloat16")
        family_worker.log_family(loaded.wrapped, loaded.device, root / "none" / BF16 / "index")
    finally:
        torch.set_num_threads(threads)
    return root


def _rows(index: Path) -> tuple[np.ndarray, list[str]]:
    with GradientStore(index) as store:
        assert sorted(store.ids.tolist()) == list(range(family_worker.N_SAMPLES))
        return store.rows_for_ids(np.arange(family_worker.N_SAMPLES)), [s.name for s in store.layout]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_family_rows_under_sharded_engine_equal_one_process(matrix, engine, family):
    errors = sorted((matrix / engine / family).glob("error-rank*.txt"))
    assert not errors, f"{engine} {family}:\n{errors[0].read_text()[-3000:]}"
    rows, layers = _rows(matrix / engine / family / "index")
    expected, ref_layers = _rows(matrix / "none" / family / "index")
    assert layers == ref_layers and len(layers) >= 4  # the same layers under their unwrapped names
    if family == "qwen2_moe":  # the shared expert (flattened tokens) and its d_out=1 gate are logged
        assert {"model.layers.0.mlp.shared_expert.down_proj", "model.layers.0.mlp.shared_expert_gate"} <= set(layers)
    scale = np.abs(expected).max()
    assert scale > 0
    assert np.abs(rows - expected).max() <= 1e-4 * scale, (engine, family, np.abs(rows - expected).max() / scale)


@pytest.mark.parametrize("variant", CHECKPOINTED)
@pytest.mark.parametrize("engine", list(ENGINES))
def test_activation_checkpointing_under_sharded_engine_logs_the_same_rows(matrix, engine, variant):
    """Each checkpointed layer runs twice per batch (reentrant: a no_grad pass, then the recompute
    that gets the gradient; non-reentrant: the graph pass, then a recompute that gets none), with
    its weights gathered again for the recompute: the rows are still the plain ones, counted once."""
    errors = sorted((matrix / engine / variant).glob("error-rank*.txt"))
    assert not errors, f"{engine} {variant}:\n{errors[0].read_text()[-3000:]}"
    rows, layers = _rows(matrix / engine / variant / "index")
    expected, ref_layers = _rows(matrix / "none" / "llama" / "index")
    assert layers == ref_layers
    scale = np.abs(expected).max()
    assert np.abs(rows - expected).max() <= 1e-4 * scale, (engine, variant, np.abs(rows - expected).max() / scale)


def test_fsdp2_logs_in_the_asked_bf16_and_records_it(matrix):
    errors = sorted((matrix / "fsdp2" / BF16).glob("error-rank*.txt"))
    assert not errors, errors[0].read_text()[-3000:]
    manifest = json.loads((matrix / "fsdp2" / BF16 / "index" / "manifest.json").read_text())
    assert manifest["engine"] == "fsdp2"
    assert manifest["metadata"]["precision"] == {"model": "bfloat16", "storage": "float32"}
    rows, _ = _rows(matrix / "fsdp2" / BF16 / "index")
    bf16, _ = _rows(matrix / "none" / BF16 / "index")
    fp32, _ = _rows(matrix / "none" / "llama" / "index")
    scale = np.abs(fp32).max()
    bf16_gap, fp32_gap = np.abs(rows - bf16).max() / scale, np.abs(rows - fp32).max() / scale
    assert bf16_gap <= 3e-2 and fp32_gap > 2 * bf16_gap, (bf16_gap, fp32_gap)  # really computed in bf16
