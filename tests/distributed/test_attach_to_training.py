"""launch/train_then_log.py: an ordinary DeepSpeed ZeRO-3 training script plus a few LoGra lines.

One `deepspeed --num_gpus 2` launch trains the embedded default for 3 steps, saves the
consolidated weights and logs its 13 training samples (batches of 3: rank 0 has 3 batches,
rank 1 has 2 and runs one shadow batch; a missing shadow batch hangs, and the timeout fails the
test). The index must hold every sample once, with the rows and damping values of a
single-process `logra-dist log` run on the saved weights.
"""

from __future__ import annotations

import difflib
import json
import re
import symtable
from pathlib import Path

import numpy as np
import pytest
import torch
from jobs import REPO, deepspeed_cmd, run_job

from logra_dist import GradientStore

pytestmark = pytest.mark.distributed
N, BATCH, STEPS = 13, 3, 3


def _body(path: Path) -> list[str]:
    """The script's lines after its module docstring."""
    text = path.read_text()
    return text[text.index('"""', 3) + 3 :].splitlines()


def test_logging_script_is_the_training_script_plus_added_lines():
    plain, logging = _body(REPO / "launch" / "train_zero3.py"), _body(REPO / "launch" / "train_then_log.py")
    ops = difflib.SequenceMatcher(a=plain, b=logging, autojunk=False).get_opcodes()
    assert {op for op, *_ in ops} == {"equal", "insert"}, [o for o in ops if o[0] != "equal"]
    added = [line for op, _, _, j1, j2 in ops if op == "insert" for line in logging[j1:j2] if line.strip()]
    assert len(added) <= 22, added  # "a few lines"
    # the snippet in docs/attach-to-training.md is the real thing
    doc = (REPO / "docs" / "attach-to-training.md").read_text()
    snippet = re.search(r"```diff\n(.*?)```", doc, re.S).group(1)
    plus = [line[1:] for line in snippet.splitlines() if line.startswith("+")]
    assert len(plus) >= 15
    for line in plus:
        assert any(line.split("#")[0].rstrip() == a.split("#")[0].rstrip() for a in added), line


@pytest.mark.parametrize("script", ["train_zero3.py", "train_then_log.py"])
def test_deepspeed_is_bound_whichever_device(script):
    """On CUDA the CPU-only branch is skipped: had `deepspeed` been imported only inside it (as
    it once was), main() would fail with UnboundLocalError at init_distributed on every GPU
    machine while CPU runs pass. The name must be the module's, not a local of main()."""
    tree = symtable.symtable((REPO / "launch" / script).read_text(), script, "exec")
    main = next(t for t in tree.get_children() if t.get_name() == "main")
    assert tree.lookup("deepspeed").is_imported()
    assert main.lookup("deepspeed").is_global() and not main.lookup("deepspeed").is_local()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-then-log")
    cmd = deepspeed_cmd(
        REPO / "launch" / "train_then_log.py",
        "--config",
        REPO / "configs" / "zero3.json",
        "--steps",
        STEPS,
        "--max-samples",
        N,
        "--batch-size",
        BATCH,
        "--save",
        out / "trained",
        "--log-out",
        out / "index",
    )
    run_job(cmd, out / "launch.log", timeout_s=240)
    return out


def test_zero3_training_then_logging_equals_one_process_on_the_trained_weights(trained, tmp_path):
    from transformers import LlamaForCausalLM

    from logra_dist.cli.main import main
    from logra_dist.embedded import build_tokenizer, default_model_config

    log = (trained / "launch.log").read_text()
    assert f"step {STEPS}: loss" in log
    manifest = json.loads((trained / "index" / "manifest.json").read_text())
    assert manifest["engine"] == "deepspeed-zero3" and manifest["world_size"] == 2
    assert [s["rows"] for s in manifest["shards"]] == [7, 6]
    with GradientStore(trained / "index") as store:
        assert sorted(store.ids.tolist()) == list(range(N))  # every sample once
        rows = store.rows_for_ids(np.arange(N))

    # the weights did train: the saved checkpoint is not the seeded initialization
    torch.manual_seed(0)
    initial = LlamaForCausalLM(default_model_config(build_tokenizer())).state_dict()
    saved = torch.load(trained / "trained" / "pytorch_model.bin", weights_only=True)
    assert sorted(saved) == sorted(k for k in initial if k in saved) and "lm_head.weight" in saved
    assert all(not torch.equal(saved[k], initial[k]) for k in saved if k.endswith("proj.weight"))

    # reference: one process, the saved weights, the same samples and LoGra config, other batches
    (tmp_path / "logra.json").write_text(json.dumps(manifest["config"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            main(
                [
                    "log",
                    "--model",
                    str(trained / "trained"),
                    "--max-samples",
                    str(N),
                    "--batch-size",
                    "5",
                    "--logra",
                    str(tmp_path / "logra.json"),
                    "--out",
                    str(tmp_path / "ref"),
                    "--no-wandb",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    with GradientStore(tmp_path / "ref") as ref:
        expected = ref.rows_for_ids(np.arange(N))
    scale = np.abs(expected).max()
    assert scale > 0 and np.abs(rows - expected).max() <= 1e-3 * scale, np.abs(rows - expected).max() / scale
    ref_manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert sorted(manifest["lambdas"]) == sorted(ref_manifest["lambdas"])
    np.testing.assert_allclose(
        [manifest["lambdas"][k] for k in ref_manifest["lambdas"]], list(ref_manifest["lambdas"].values()), rtol=1e-5
    )
