"""Write real optimizer checkpoints for tests/engines/test_optimizer_state.py, with references.

    torchrun --nproc_per_node 2 tests/workers/optim_states.py zero3 OUT
    torchrun --nproc_per_node 2 tests/workers/optim_states.py fsdp2 OUT

Two Adam(W) steps on a tiny model (odd widths, so ZeRO-3 pads its partitions; two parameter
groups, so there are two flat groups), then the engine's own checkpoint save. Rank 0 also writes
`reference.pt`: every parameter's full exp_avg_sq as the engine itself gathers it
(DeepSpeed's `safe_get_full_optimizer_state`, FSDP2's full optimizer state dict), keyed by name.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from logra_dist.engines.launch import destroy_distributed, exit_process


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 4, bias=False))


def batches(rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training
    return [torch.randn(6, 5, generator=gen) for _ in range(2)]


def groups(model: nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]


def zero3(out: str) -> None:
    import deepspeed

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # skip the 45 s CPU shm op compile
    from deepspeed.utils import safe_get_full_optimizer_state

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = tiny_model()
    optimizer = torch.optim.AdamW(groups(model), lr=1e-2, eps=1e-7)
    config = {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for x in batches(rank):
        loss = engine(x).pow(2).sum()
        engine.backward(loss)
        engine.step()
    reference = {n: safe_get_full_optimizer_state(p, "exp_avg_sq").clone() for n, p in engine.module.named_parameters()}
    engine.save_checkpoint(out, tag="step2")
    if rank == 0:
        torch.save(reference, f"{out}/reference.pt")
    destroy_distributed()


def fsdp2(out: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = tiny_model()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(groups(model), lr=1e-2, eps=1e-7)
    for x in batches(rank):
        model(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=f"{out}/dcp")
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({n: s["exp_avg_sq"].clone() for n, s in full["state"].items()}, f"{out}/reference.pt")
    destroy_distributed()


if __name__ == "__main__":
    {"zero3": zero3, "fsdp2": fsdp2}[sys.argv[1]](sys.argv[2])
    exit_process(0)  # no interpreter teardown after a gloo group (pytorch#190489: SIGABRT at exit)
