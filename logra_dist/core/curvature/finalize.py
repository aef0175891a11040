"""Distributed finalize: each layer's statistics summed onto one rank, decomposed there, and only
the decompositions sent to rank 0 (which writes stats.h5).

Layer i belongs to rank `owner(i) = i mod world`. Its sums are reduced to that rank alone, in
float64 buckets of `comm.REDUCE_BUCKET_BYTES` (peak extra memory: one bucket, not a copy of
every statistic). Then in rounds of `world` layers each rank decomposes its layer of the round on
the compute device and sends the fields to rank 0, in the background during the next round's
eigh (waited for before that round's status: the link and rank 0 are not idle-waited on); a
round ends with one tiny all-reduce of every rank's status, so an error on any rank (a singular
layer, out of memory) is raised on all of them, and no rank waits in a collective longer than
one round (one layer's eigh and one transfer) takes. Rank 0 hands each layer, in layer order, to
the caller's `on_layer` (the Logger's stats.h5 writer thread) as soon as it has it.

Precision: eigh runs in float32 when it is accurate enough and in float64 otherwise. For a layer
with damped condition number kappa = (e_max + lambda) / lambda, the preconditioned product
(F + lambda I)^-1 g from a float32 eigendecomposition differs from float64's by at most
FLOAT32_ERROR_FACTOR x eps_32 x kappa in relative norm (measured <= 1.8 x eps_32 x kappa over
widths 256-2048 and damping 1e-3..1; tests/core/test_finalize.py checks the bound). Float32 is
kept when that bound is <= FLOAT32_MAX_ERROR; a layer beyond it (small damping, very steep
spectrum) is recomputed in float64 and stored so, since float32 would change its scores.
Statistics accumulated in float64 (compute_dtype="float64") are decomposed in float64.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial

import torch

from logra_dist import comm
from logra_dist.core.curvature.base import Curvature, Factors
from logra_dist.core.projection import LayerSpec
from logra_dist.tracking import NULL_TRACKER, NullTracker

FLOAT32_ERROR_FACTOR = 4.0
FLOAT32_MAX_ERROR = 1e-3
_EPS32 = torch.finfo(torch.float32).eps
# Rank 0's receiver of one decomposed layer: `on_layer(spec, get)`, `get()` returning its factors
# (for a layer still in transfer from its owner, once it has arrived: call it from another thread,
# as the Logger's stats.h5 writer does, to overlap the wait with rank 0's next eigh).
LayerSink = Callable[[LayerSpec, Callable[[], dict[str, torch.Tensor]]], None]


def owner(index: int, world: int) -> int:
    """The rank that sums and decomposes layer `index`."""
    return index % world


def float32_error_bound(kappa: float) -> float:
    """Bound on the relative error of (F + lambda I)^-1 g from a float32 eigh (module docstring)."""
    return FLOAT32_ERROR_FACTOR * _EPS32 * kappa


@dataclass
class FinalizeReport:
    """Where `Logger.finalize`'s time went on this rank, part by part (every second of it in
    one part, so that a gap between ranks shows where it is), and which layers needed float64."""

    flush_s: float = 0.0  # the statistics brought up to date (raw: buffered rows, lower tiles)
    drain_s: float = 0.0  # the shard built, the last statistics committed beside it
    digest_s: float = 0.0  # the shard's content digest (reads it back)
    counts_s: float = 0.0  # the counts' all-reduce: waits for the slowest rank's drain
    reduce_s: float = 0.0  # the sums onto their owners
    decompose_s: float = 0.0  # this rank's eighs
    wait_s: float = 0.0  # the per-round status all-reduce: waits for the round's slowest eigh
    transfer_s: float = 0.0  # decompositions to rank 0
    stats_s: float = 0.0  # rank 0: damping, stats.h5 (what the overlap with the eighs left)
    manifest_s: float = 0.0  # rank 0: manifest.json
    alone_s: float = 0.0  # rank 0 alone (comm.rank0_alone): rank 0's barrier, the others' polling
    total_s: float = 0.0
    reduce_calls: int = 0
    float64_layers: list[str] = field(default_factory=list)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """`with report.timed("stats"):` adds the block's wall time to `stats_s`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, f"{part}_s", getattr(self, f"{part}_s") + time.perf_counter() - start)

    def figures(self) -> dict[str, float]:
        parts = ("flush", "drain", "digest", "counts", "reduce", "wait", "transfer", "stats", "manifest", "alone")
        out = {f"time/finalize-{p}": getattr(self, f"{p}_s") for p in parts}
        out["time/finalize-eigh"] = self.decompose_s
        out["time/finalize"] = self.total_s
        out["count/finalize_float64_layers"] = float(len(self.float64_layers))
        return out


def reduce_to_owners(curvature: Curvature, report: FinalizeReport | None = None) -> None:
    """Collective: sum every layer's sums over ranks onto its owner, in place (bucketed).
    Afterwards a rank's sums are complete only for the layers it owns."""
    report = report or FinalizeReport()
    start, world = time.perf_counter(), comm.world_size()
    curvature.flush()
    for r in range(world):
        tensors = [t for i, s in enumerate(curvature.specs) if owner(i, world) == r for t in curvature.layer_sums(s)]
        report.reduce_calls += comm.reduce_sum_into(tensors, r)
    report.reduce_s += time.perf_counter() - start


def decompose_layer(
    curvature: Curvature, spec: LayerSpec, damping: float, device="cpu"
) -> tuple[dict[str, torch.Tensor], torch.dtype]:
    """One layer's factors (on the CPU) in float32 if its error bound allows, else float64.
    Statistics kept in float64 (compute_dtype="float64", a deliberate choice) stay float64."""
    if curvature.dtype == torch.float64:
        factors = curvature.layer_factors(spec, torch.float64, device)
        _check_lambda(spec, damping * curvature.mean_eigenvalue(factors), damping)
        return {k: v.cpu() for k, v in factors.items()}, torch.float64
    factors = curvature.layer_factors(spec, torch.float32, device)
    lam = damping * curvature.mean_eigenvalue(factors)
    _check_lambda(spec, lam, damping)
    if float32_error_bound((curvature.max_eigenvalue(factors) + lam) / lam) > FLOAT32_MAX_ERROR:
        factors = curvature.layer_factors(spec, torch.float64, device)
        return {k: v.cpu() for k, v in factors.items()}, torch.float64
    return {k: v.cpu() for k, v in factors.items()}, torch.float32


def _check_lambda(spec: LayerSpec, lam: float, damping: float) -> None:
    if lam <= 0:
        raise ValueError(
            f"layer {spec.name!r}: damping {damping} x mean eigenvalue gives lambda={lam}; the matrix "
            "is singular without damping (no samples, or all gradients zero)"
        )


def decompose_to_rank0(
    curvature: Curvature,
    damping: float,
    device="cpu",
    report: FinalizeReport | None = None,
    on_layer: LayerSink | None = None,
) -> Factors:
    """Collective, after `reduce_to_owners`: every layer decomposed by its owner; rank 0 returns
    all layers' factors, the other ranks an empty dict. With `on_layer`, rank 0 hands each layer
    to it instead (`LayerSink`), in layer order, as soon as it has it or its transfer is posted
    (its own before the round's status is known: the caller discards them if finalize fails),
    and returns {}."""
    report = report or FinalizeReport()
    layers: Factors = {}
    in_flight: list[tuple[LayerSpec | None, comm.Transfer]] = []  # last round's, done during this eigh
    posted: list[comm.Transfer] = []  # rank 0's handed to on_layer: all complete before this returns
    try:
        _rounds(curvature, damping, device, report, on_layer, layers, in_flight, posted)
    except BaseException:
        for transfer in posted:  # matched sends (their round's status was good): the buffers stay alive
            with suppress(Exception):
                transfer.wait()
        raise
    for transfer in posted:
        transfer.wait()
    return layers


def _rounds(
    curvature: Curvature,
    damping: float,
    device,
    report: FinalizeReport,
    on_layer: LayerSink | None,
    layers: Factors,
    in_flight: list[tuple[LayerSpec | None, comm.Transfer]],
    posted: list[comm.Transfer],
) -> None:
    """`decompose_to_rank0`'s rounds: fills `layers` (rank 0, without on_layer) and `posted`."""
    me, world, specs = comm.rank(), comm.world_size(), curvature.specs

    def settle() -> None:
        with report.timed("transfer"):
            for spec, transfer in in_flight:
                got = transfer.wait()
                if spec is not None:  # rank 0: a layer received
                    layers[spec.name] = _unpack(curvature, spec, got)
            in_flight.clear()

    for first in range(0, len(specs), world):
        mine = first + me
        failed, wide = torch.zeros(world, dtype=torch.float64), torch.zeros(world, dtype=torch.float64)
        error: BaseException | None = None
        if mine < len(specs):
            start = time.perf_counter()
            try:
                factors, dtype = decompose_layer(curvature, specs[mine], damping, device)
                wide[me] = float(dtype == torch.float64)
            except Exception as e:  # raised on every rank below, this one's own error here
                error, failed[me] = e, 1.0
            report.decompose_s += time.perf_counter() - start
        try:
            settle()  # the last round's layers first: rank 0 delivers in layer order
        except Exception as e:
            error, failed[me] = error or e, 1.0
        if me == 0 and error is None and mine < len(specs):
            try:  # written (on_layer) while the others finish their eigh
                _deliver(layers, on_layer, specs[mine], partial(_given, factors))
            except Exception as e:
                error, failed[me] = e, 1.0
        with report.timed("wait"):
            status = comm.all_reduce_sum(torch.cat([failed, wide]))
        if status[:world].any():
            if error is not None:
                raise error
            bad = [r for r in range(world) if status[r]]
            raise RuntimeError(f"finalize failed on rank(s) {bad} (layers {[specs[first + r].name for r in bad]})")
        with report.timed("transfer"):  # posted now, waited for after the next round's eigh
            for r in range(world):
                i = first + r
                if i >= len(specs):
                    break
                dtype = torch.float64 if status[world + r] else torch.float32
                if dtype == torch.float64 and me == 0:
                    report.float64_layers.append(specs[i].name)
                if r == me and me != 0:
                    flat = torch.cat([factors[k].reshape(-1) for k in curvature.factor_shapes(specs[i])])
                    in_flight.append((None, comm.isend_tensor(flat, 0)))
                elif r != me and me == 0:
                    transfer = comm.irecv_tensor(_numel(curvature, specs[i]), dtype, r)
                    if on_layer is None:
                        in_flight.append((specs[i], transfer))
                    else:  # its receiver waits for it, in layer order
                        posted.append(transfer)
                        on_layer(specs[i], partial(_received, curvature, specs[i], transfer))
    settle()


def _deliver(layers: Factors, on_layer: LayerSink | None, spec: LayerSpec, get: Callable[[], dict]) -> None:
    if on_layer is None:
        layers[spec.name] = get()
    else:
        on_layer(spec, get)


def _given(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return factors


def _received(curvature: Curvature, spec: LayerSpec, transfer: comm.Transfer) -> dict[str, torch.Tensor]:
    return _unpack(curvature, spec, transfer.wait())


def finalize_statistics(
    curvature: Curvature,
    damping: float,
    device="cpu",
    tracker: NullTracker = NULL_TRACKER,
    report: FinalizeReport | None = None,
    on_layer: LayerSink | None = None,
) -> tuple[Factors, FinalizeReport]:
    """Collective: `reduce_to_owners` then `decompose_to_rank0`, timed as the tracker's
    "all-reduce" and "eigh" phases. Rank 0 gets every layer's factors (or hands them to
    `on_layer`), the others {}."""
    report = report or FinalizeReport()
    with tracker.phase("all-reduce"):
        reduce_to_owners(curvature, report)
    with tracker.phase("eigh"):
        layers = decompose_to_rank0(curvature, damping, device, report, on_layer)
    tracker.count(finalize_float64_layers=len(report.float64_layers))
    return layers, report


def _numel(curvature: Curvature, spec: LayerSpec) -> tuple[int]:
    return (sum(math.prod(shape) for shape in curvature.factor_shapes(spec).values()),)


def _unpack(curvature: Curvature, spec: LayerSpec, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for key, shape in curvature.factor_shapes(spec).items():
        n = math.prod(shape)
        out[key] = flat[at : at + n].reshape(shape)
        at += n
    return out
