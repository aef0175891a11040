"""Model fingerprint: a digest of the architecture config and of the logged layers' weights that is
the same for any world size and engine, computed without gathering a weight anywhere.

A layer's weight digest is a SUM over its elements of a position-aware 64-bit hash of (global
flat index, value bits in the storage dtype), mod 2^64. Addition commutes, so each rank hashes
only its own slice (ZeRO-3 flat partition, FSDP2 `Shard(0)` rows) at its global offsets and the
partial sums add up in one small all-reduce, sent as 22-bit words (float64 is exact below 2^53).
A replicated weight (plain module, DDP, ZeRO-0..2) is hashed by rank 0 alone. FSDP1's
FlatParameter hides where a layer's elements lie, so under FSDP1 each unit that holds logged
layers is gathered on its own (`summon_full_params(unit, recurse=False)`: one unit at a time,
as its forward does, never the whole model) and rank 0 hashes those layers' full weights.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

from logra_dist import comm

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 20  # elements hashed at a time (bounds the temporaries)
_WORD = 22  # bits per word in the all-reduce: 3 words hold 64 bits, sums of 2^31 ranks stay exact
_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_DROP = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_internal")


def element_hash_sum(values: torch.Tensor, offset: int) -> int:
    """Sum mod 2^64 of splitmix64(global index * golden ^ value bits) over a flat tensor whose
    first element has global flat index `offset`."""
    flat = values.detach().reshape(-1).contiguous()
    bits = flat.view(_INT_OF[flat.element_size()]).cpu().numpy()
    unsigned = bits.view(f"u{bits.itemsize}") if bits.itemsize > 1 else bits
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for lo in range(0, len(unsigned), _CHUNK):
            v = unsigned[lo : lo + _CHUNK].astype(np.uint64)
            x = (np.arange(offset + lo, offset + lo + len(v), dtype=np.uint64) * _GOLD) ^ v
            x ^= x >> np.uint64(30)
            x *= _M1
            x ^= x >> np.uint64(27)
            x *= _M2
            x ^= x >> np.uint64(31)
            total = total + x.sum(dtype=np.uint64)
    return int(total)


def _local_slice(weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(this rank's elements of `weight`, global flat index of the first), or None when another
    rank hashes them (replicated weights: rank 0 only)."""
    if hasattr(weight, "ds_tensor"):  # ZeRO-3: a padded flat partition of ds_numel elements
        import torch.distributed as dist

        part = weight.ds_tensor.detach().reshape(-1)
        group = getattr(weight, "ds_process_group", None)
        rank = dist.get_rank(group=group) if dist.is_initialized() else 0
        offset = part.numel() * rank
        valid = max(0, min(part.numel(), int(weight.ds_numel) - offset))
        return part[:valid], offset
    if hasattr(weight, "device_mesh") and hasattr(weight, "to_local"):  # FSDP2 DTensor
        mesh, placements = weight.device_mesh, weight.placements
        local = weight.to_local().detach()
        if all(p.is_replicate() for p in placements):
            return (local, 0) if comm.rank() == 0 else None
        if mesh.ndim != 1 or not placements[0].is_shard(0):
            raise NotImplementedError(f"model fingerprint: weight placement {placements} is not Shard(0) on a 1-D mesh")
        rows, per_row = weight.shape[0], max(1, weight.numel() // max(1, weight.shape[0]))
        chunk = -(-rows // mesh.size())
        start = min(mesh.get_local_rank() * chunk, rows)
        return local, start * per_row
    return (weight, 0) if comm.rank() == 0 else None


def _config_digest(root: nn.Module) -> str:
    cfg = getattr(root, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        described = {k: v for k, v in cfg.to_dict().items() if k not in _DROP}
    else:
        described = {"class": f"{type(root).__module__}.{type(root).__qualname__}"}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _fsdp1_sums(root: nn.Module, modules: dict[str, nn.Module], names: list[str]) -> tuple[list[int], list[str]]:
    """(hash sums, dtypes) of the logged layers' weights under FSDP1: collective, every rank
    gathers the same units in the same order; rank 0 hashes, the others contribute 0."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    owner: dict[int, nn.Module] = {}  # id(module) -> the FSDP unit whose FlatParameter holds it

    def walk(module: nn.Module, unit: nn.Module | None) -> None:
        unit = module if isinstance(module, FSDP) else unit
        owner[id(module)] = unit
        for child in module.children():
            walk(child, unit)

    walk(root, None)
    sums, dtypes = dict.fromkeys(names, 0), dict.fromkeys(names, "None")
    for unit in FSDP.fsdp_modules(root):  # module order: the same on every rank
        mine = [n for n in names if owner.get(id(modules[n])) is unit]
        if not mine:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for n in mine:
                weight = getattr(modules[n], "weight", None)
                if weight is not None:
                    dtypes[n] = str(weight.dtype)
                    if comm.rank() == 0:
                        sums[n] = element_hash_sum(weight.detach().clone(), 0)  # numpy must not pin its storage
    return [sums[n] for n in names], [dtypes[n] for n in names]


def model_fingerprint(root: nn.Module, modules: dict[str, nn.Module], config_root: nn.Module | None = None) -> dict:
    """{"config": digest, "weights": digest}: collective (one all-reduce; under FSDP1 also one
    gather per unit holding logged layers) when distributed, so every rank must call it.
    `modules`: the logged layers by canonical name."""
    fsdp1 = any(type(m).__name__ == "FullyShardedDataParallel" for m in root.modules())
    names = sorted(modules)
    if fsdp1:
        sums, dtypes = _fsdp1_sums(root, modules, names)
    else:
        sums = []
        for name in names:
            weight = getattr(modules[name], "weight", None)
            piece = None if weight is None else _local_slice(weight)
            sums.append(element_hash_sum(piece[0], piece[1]) if piece is not None else 0)
        dtypes = [str(getattr(getattr(modules[n], "weight", None), "dtype", None)) for n in names]
    mask = (1 << _WORD) - 1
    words = torch.tensor([(s >> (_WORD * j)) & mask for s in sums for j in range(3)], dtype=torch.float64)
    if comm.is_distributed():
        words = comm.all_reduce_sum(words)
    w = [int(x) for x in words.tolist()]
    totals = [sum(w[3 * i + j] << (_WORD * j) for j in range(3)) % (1 << 64) for i in range(len(names))]
    described = json.dumps([[n, d, f"{t:016x}"] for n, d, t in zip(names, dtypes, totals)])
    weights = hashlib.sha256(described.encode()).hexdigest()[:24]
    return {"config": _config_digest(config_root if config_root is not None else root), "weights": weights}
