"""Each optimizer-state reader round-trips a real checkpoint written by the real engine: ZeRO-3 on
2 ranks (partitioned, padded, two flat groups), FSDP2's DCP save, the HF Trainer's optimizer.pt.
The references are each engine's own full view of exp_avg_sq (DeepSpeed's
safe_get_full_optimizer_state, FSDP2's full optimizer state dict, the Trainer's optimizer object),
never the files. One launch per engine."""

import sys
from pathlib import Path

import pytest
import torch
from distributed.jobs import free_port, run_job

from logra_dist.engines import wrap
from logra_dist.engines.optimizer_state import (
    READERS,
    OptimizerStateError,
    ParamInfo,
    model_params,
    read_second_moments,
)

WORKER = Path(__file__).resolve().parents[1] / "workers" / "optim_states.py"
sys.path.insert(0, str(WORKER.parent))
from optim_states import tiny_model  # noqa: E402

BIAS = 1 - 0.999**2  # AdamW's default beta2, two steps: the readers return v / (1 - beta2^step)


def _launch(kind: str, out: Path) -> None:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), kind, str(out)]
    run_job(cmd, out.parent / f"{kind}.log", timeout_s=240)


def _params() -> list[ParamInfo]:
    return [ParamInfo(n, tuple(p.shape), True, n.endswith("weight")) for n, p in tiny_model().named_parameters()]


@pytest.mark.parametrize("kind,reader,sub", [("zero3", "zero3", ""), ("fsdp2", "dcp", "dcp")])
def test_sharded_checkpoint_reader_equals_the_engines_full_state(tmp_path, kind, reader, sub):
    out = tmp_path / kind
    _launch(kind, out)
    name, moments = read_second_moments(out / sub if sub else out, _params())
    reference = torch.load(out / "reference.pt")
    assert name == reader and set(moments) == set(reference)
    for param, ref in reference.items():
        assert moments[param].v.shape == ref.shape, param
        assert torch.allclose(moments[param].v * BIAS, ref.double(), rtol=1e-6, atol=0), param
        assert moments[param].eps == 1e-7
    if kind == "zero3":  # the same files without their model states are refused, named
        for f in (out / "step2").glob("*model_states.pt"):
            f.unlink()
        with pytest.raises(OptimizerStateError, match="model_states"):
            read_second_moments(out, _params())


def test_hf_trainer_optimizer_pt_maps_indices_to_names_in_the_trainers_groups(tmp_path):
    from reference import tiny_gpt2
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(3, 40, (4, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=2,
        weight_decay=0.01,  # two parameter groups: indices are not the model's order
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    beta2 = opt.param_groups[0]["betas"][1]
    name, moments = read_second_moments(tmp_path / "checkpoint-1", model_params(wrap(model)))
    assert name == "torch"
    for param_name, p in model.named_parameters():
        ref = opt.state[p]["exp_avg_sq"].double() / (1 - beta2)
        assert torch.allclose(moments[param_name].v, ref, rtol=1e-6), param_name
    assert "transformer.h.0.ln_1.bias" in moments  # not decayed: group 2, found by the Trainer's rule


def test_unknown_files_are_refused_listing_the_known_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OptimizerStateError, match=r"ZeRO-3.*torch\.distributed\.checkpoint.*optimizer\.pt"):
        read_second_moments(tmp_path, _params())
    with pytest.raises(OptimizerStateError, match="no such file"):
        read_second_moments(tmp_path / "gone", _params())
    assert READERS.names() == ["zero3", "dcp", "torch"]


def test_zero_states_unpickle_only_the_stage_enum_through_getattr(tmp_path):
    """The weights-only loader's `getattr` serves members of DeepSpeed's stage enum and nothing
    else: a file reaching for another attribute is refused, never evaluated."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from logra_dist.engines.optimizer_state import OptimizerStateError, _load_zero_optim_states

    class Member:  # pickles as getattr(ZeroStageEnum, name), as Python pickles an enum member
        def __init__(self, name):
            self.name = name

        def __reduce__(self):
            return getattr, (ZeroStageEnum, self.name)

    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": Member("weights")}}, good)
    assert _load_zero_optim_states(good)["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.weights
    torch.save({"optimizer_state_dict": {"zero_stage": Member("__init__")}}, bad)
    with pytest.raises(OptimizerStateError, match="refuses to unpickle getattr"):
        _load_zero_optim_states(bad)
