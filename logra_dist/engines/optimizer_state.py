"""Read Adam's second moments (exp_avg_sq) from a user's training checkpoint, per parameter name.

One small reader class per checkpoint kind (a registry, detected from the files):
- `zero3`: a DeepSpeed ZeRO-3 checkpoint folder (or its parent with a `latest` file):
  `zero_pp_rank_*_mp_rank_00_optim_states.pt` hold each rank's flat partitions, the model
  states file the parameter names and shapes (`param_shapes`). The layout is DeepSpeed's own
  (`deepspeed.utils.zero_to_fp32`): every parameter is cut into `world` pieces of ceil(n/world)
  values (the last padded); rank r's flat buffer is its piece of each parameter in
  `param_shapes` order, over all (sub-)groups concatenated.
- `dcp`: a torch.distributed.checkpoint folder (FSDP2's sharded optimizer state dict, saved as
  `get_optimizer_state_dict`'s output under any key): loaded whole without a process group.
- `torch`: a plain torch optimizer state dict file (HF Trainer's `optimizer.pt`, or a folder
  holding one), keyed by parameter index: mapped to names by the model's parameter order, as
  the HF Trainer groups them (decayed parameters first) or plainly; every shape is checked.

Each reader returns {parameter name: SecondMoment(v bias-corrected, as stored, eps)}.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from logra_dist.registry import Registry

READERS: Registry[OptimizerStateReader] = Registry("optimizer state format")


class OptimizerStateError(ValueError):
    """An optimizer checkpoint that cannot give the second moments asked for; names the file."""


@dataclass(frozen=True)
class SecondMoment:
    v: torch.Tensor  # Adam's bias-corrected exp_avg_sq, in the parameter's stored shape
    eps: float


@dataclass(frozen=True)
class ParamInfo:
    """A model parameter as the readers need it: name, full shape, whether it was trained."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    decayed: bool = True  # in the HF Trainer's weight-decay group (its rule: not a bias or norm)


def _corrected(v: torch.Tensor, step: Any, group: dict) -> torch.Tensor:
    """v / (1 - beta2^step), as Adam divides by; uncorrected when the step or betas are unknown."""
    betas = group.get("betas")
    step = float(step) if step is not None else 0.0
    v = v.detach().to(torch.float64)
    if betas is None or step <= 0:
        return v
    return v / (1.0 - float(betas[1]) ** step)


class OptimizerStateReader:
    name: ClassVar[str]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        READERS.register(cls)

    @staticmethod
    def detect(path: Path) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, path: Path, params: list[ParamInfo]) -> dict[str, SecondMoment]:  # pragma: no cover
        raise NotImplementedError


def _load_zero_optim_states(path: Path) -> dict:
    """A ZeRO optimizer-states file, unpickled with torch's weights-only loader: besides tensors it
    holds only DeepSpeed's stage enum and loss scaler, allowed by name, so a user's checkpoint never
    runs code (no `weights_only=False`). Python pickles the enum member as `getattr(ZeroStageEnum,
    "weights")`; that `getattr` is served by `_enum_member`, which looks up members of the allowed
    enum and nothing else (a real getattr would open every attribute of the allowed classes)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    def _enum_member(cls, name: str):
        if cls is not ZeroStageEnum or name not in ZeroStageEnum.__members__:
            raise OptimizerStateError(f"{path}: refuses to unpickle getattr({cls!r}, {name!r})")
        return ZeroStageEnum[name]

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, (_enum_member, "builtins.getattr")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


class ZeRO3Reader(OptimizerStateReader):
    name = "zero3"

    @staticmethod
    def _folder(path: Path) -> Path:
        if (path / "latest").is_file():
            return path / (path / "latest").read_text().strip()
        return path

    @staticmethod
    def detect(path: Path) -> bool:
        return path.is_dir() and any(ZeRO3Reader._folder(path).glob("zero_pp_rank_*_optim_states.pt"))

    def read(self, path: Path, params: list[ParamInfo]) -> dict[str, SecondMoment]:
        folder = self._folder(path)
        rank_of = lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1))  # noqa: E731
        optim = sorted(folder.glob("zero_pp_rank_*_optim_states.pt"), key=rank_of)
        model = sorted(folder.glob("zero_pp_rank_*_model_states.pt"), key=rank_of)
        if not model:
            raise OptimizerStateError(f"{folder}: optimizer states but no zero_pp_rank_*_model_states.pt")
        shapes = torch.load(model[0], map_location="cpu", weights_only=True).get("param_shapes")
        states = [_load_zero_optim_states(f)["optimizer_state_dict"] for f in optim]
        if int(states[0].get("zero_stage", 0)) != 3 or shapes is None:
            raise OptimizerStateError(f"{optim[0]}: not a ZeRO-3 checkpoint (zero_stage {states[0].get('zero_stage')})")
        world = int(states[0]["partition_count"])
        if world != len(optim):
            raise OptimizerStateError(f"{folder}: partition_count {world} but {len(optim)} *_optim_states.pt files")
        base = [s["optimizer_state_dict"] for s in states]  # the torch optimizer's, one state per flat group
        flats, owner = [], []  # per rank: all flat groups concatenated; per value: its group
        for rank_base in base:
            keys = sorted(rank_base["state"])
            flats.append(torch.cat([rank_base["state"][k]["exp_avg_sq"].reshape(-1) for k in keys]))
        groups = base[0]["param_groups"]
        for k in sorted(base[0]["state"]):
            owner.append((base[0]["state"][k]["exp_avg_sq"].numel(), k))
        bounds = torch.tensor([0] + [n for n, _ in owner]).cumsum(0)
        out, offset = {}, 0
        for name, shape in ((n, s) for group in shapes for n, s in group.items()):
            numel = int(torch.Size(shape).numel())
            part = -(-numel // world)
            pieces = torch.cat([flat[offset : offset + part] for flat in flats])[:numel]
            g = int(torch.searchsorted(bounds, torch.tensor(offset), right=True)) - 1
            key = owner[g][1]
            group = next(gr for gr in groups if key in gr["params"])
            step = base[0]["state"][key].get("step")
            out[name] = SecondMoment(_corrected(pieces.reshape(shape), step, group), float(group.get("eps", 1e-8)))
            offset += part
        if offset != flats[0].numel():
            raise OptimizerStateError(
                f"{folder}: param_shapes cover {offset} values of each rank's partition but it holds "
                f"{flats[0].numel()}: the model states do not belong to these optimizer states"
            )
        return out


class DCPReader(OptimizerStateReader):
    name = "dcp"

    @staticmethod
    def detect(path: Path) -> bool:
        return path.is_dir() and (path / ".metadata").is_file()

    def read(self, path: Path, params: list[ParamInfo]) -> dict[str, SecondMoment]:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore", UserWarning)
            loaded = _load_state_dict_from_keys(checkpoint_id=str(path))
        found = _find_optimizer_dicts(loaded)
        if not found:
            raise OptimizerStateError(f"{path}: no optimizer state dict (state + param_groups) in this checkpoint")
        out = {}
        for sd in found:
            for group in sd["param_groups"]:
                for name in group["params"]:
                    state = sd["state"].get(name, {})
                    if "exp_avg_sq" in state:
                        v = state["exp_avg_sq"]
                        v = v.full_tensor() if hasattr(v, "full_tensor") else v
                        v = _corrected(v, state.get("step"), group)
                        out[str(name)] = SecondMoment(v, float(group.get("eps", 1e-8)))
        return out


def _find_optimizer_dicts(tree: Any) -> list[dict]:
    if isinstance(tree, dict):
        if isinstance(tree.get("state"), dict) and isinstance(tree.get("param_groups"), list):
            return [tree]
        return [d for v in tree.values() for d in _find_optimizer_dicts(v)]
    return []


class TorchReader(OptimizerStateReader):
    name = "torch"

    @staticmethod
    def _file(path: Path) -> Path:
        return path / "optimizer.pt" if path.is_dir() else path

    @staticmethod
    def detect(path: Path) -> bool:
        return TorchReader._file(path).is_file()

    def read(self, path: Path, params: list[ParamInfo]) -> dict[str, SecondMoment]:
        file = self._file(path)
        sd = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise OptimizerStateError(f"{file}: not a torch optimizer state dict (no 'state'/'param_groups')")
        sizes = [len(g["params"]) for g in sd["param_groups"]]
        problems = []
        for order_name, names in _candidate_orders(params, sizes):
            if names is None:
                continue
            shape_of = {p.name: p.shape for p in params}
            index_to_name = dict(zip((i for g in sd["param_groups"] for i in g["params"]), names))
            bad = [
                (i, index_to_name[i], tuple(s["exp_avg_sq"].shape), shape_of[index_to_name[i]])
                for i, s in sd["state"].items()
                if "exp_avg_sq" in s and tuple(s["exp_avg_sq"].shape) != shape_of[index_to_name[i]]
            ]
            if bad:
                i, n, got, want = bad[0]
                problems.append(f"{order_name}: index {i} has shape {got} but {n!r} is {want}")
                continue
            group_of = {i: g for g in sd["param_groups"] for i in g["params"]}
            return {
                index_to_name[i]: SecondMoment(
                    _corrected(s["exp_avg_sq"], s.get("step"), group_of[i]), float(group_of[i].get("eps", 1e-8))
                )
                for i, s in sd["state"].items()
                if "exp_avg_sq" in s
            }
        raise OptimizerStateError(
            f"{file}: its {sum(sizes)} parameters in groups of {sizes} do not match this model's trainable "
            f"parameters in any known order ({'; '.join(problems) or 'counts differ'}); "
            "was it saved for another model?"
        )


def _candidate_orders(params: list[ParamInfo], sizes: list[int]):
    """Parameter names in the order the optimizer indexed them: the HF Trainer's groups (decayed,
    then not decayed, by its own rule: `ParamInfo.decayed`), then plain model order; None where
    the counts differ."""
    trainable = [p for p in params if p.trainable]
    decayed = [p.name for p in trainable if p.decayed]
    rest = [p.name for p in trainable if not p.decayed]
    hf_sizes = [len(decayed), len(rest)]
    yield "HF Trainer order", decayed + rest if sizes in (hf_sizes, [s for s in hf_sizes if s]) else None
    yield "model order", [p.name for p in trainable] if sum(sizes) == len(trainable) else None


def read_second_moments(path: str | Path, params: list[ParamInfo]) -> tuple[str, dict[str, SecondMoment]]:
    """(reader name, second moments by parameter name) of the checkpoint at `path`."""
    path = Path(path)
    if not path.exists():
        raise OptimizerStateError(f"optimizer state {path}: no such file or folder")
    for name in READERS.names():
        reader = READERS.get(name)
        if reader.detect(path):
            try:
                return name, reader().read(path, params)
            except (KeyError, RuntimeError, OSError) as e:
                raise OptimizerStateError(f"optimizer state {path} ({name}): unreadable ({e!r})") from e
    raise OptimizerStateError(
        f"optimizer state {path}: not a DeepSpeed ZeRO-3 checkpoint folder, a torch.distributed.checkpoint "
        "folder (.metadata) or a torch optimizer state dict (optimizer.pt)"
    )


def _canonical(engine, raw: str) -> str:
    module, _, leaf = raw.rpartition(".")
    return f"{engine.canonical_name(module)}.{leaf}" if module else leaf


def tied_names(engine) -> dict[str, str]:
    """{alias: name} for parameters reached under two names (tied embeddings: GPT-2's lm_head.weight
    is transformer.wte.weight): the optimizer keeps one state, under the first name."""
    first: dict[int, str] = {}
    aliases = {}
    for raw, p in engine.root.named_parameters(remove_duplicate=False):
        name = _canonical(engine, raw)
        if id(p) in first and first[id(p)] != name:
            aliases[name] = first[id(p)]
        first.setdefault(id(p), name)
    return aliases


def model_params(engine) -> list[ParamInfo]:
    """The engine's parameters as the readers see them: canonical names, full shapes (ZeRO-3's
    `ds_shape`, FSDP2's DTensor shape), trainable or not (read before the weights are frozen)."""
    try:
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, engine.root))  # does not use `self`
    except ImportError:
        decay = None
    out = []
    for raw, p in engine.root.named_parameters():
        name = _canonical(engine, raw)
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        decayed = raw in decay if decay is not None else p.dim() > 1
        out.append(ParamInfo(name, tuple(int(s) for s in shape), bool(p.requires_grad), decayed))
    return out
