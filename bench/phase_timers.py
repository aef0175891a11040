"""Where a logging step's wall time goes, measured in the timed run itself (figure 5).

One exclusive stack of timers on the main thread: entering a phase pauses the phase it is
nested in, so every microsecond of a step lands in exactly one phase and the phases sum to the
step's wall time. The step function opens `forward`, `backward` and `capture-exit`; DeepSpeed's
ZeRO-3 coordinator (fetch = all-gather launch + wait + unflatten, release = re-partition),
LoGra's hooks and statistics are wrapped (class-level patches made before
`deepspeed.initialize` / `attach`), so what stays in `forward`/`backward` is the model's own
compute (aten ops, autograd, model Python). Cost: two perf_counter calls per wrapped call
(~400 calls per step on the 25M model, well under 1 ms).

A timer that the main thread does not own (gloo's worker threads, the HDF5 writer thread)
never enters the stack: the writer thread's time is read from the logger (overlapped work).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from logra_dist.tracking import NullTracker


class ExclusiveTimers:
    """Exclusive phase times (seconds) and call counts, main thread only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self.mark = 0.0
        self.owner = threading.get_ident()
        self.foreign_calls = 0  # wrapped calls seen on another thread (left untimed)

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.mark
        self.stack.append(name)
        self.calls[name] += 1
        self.mark = now

    def exit(self) -> None:
        now = time.perf_counter()
        self.seconds[self.stack.pop()] += now - self.mark
        self.mark = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if threading.get_ident() != self.owner:
            self.foreign_calls += 1
            yield
            return
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


class TimerTracker(NullTracker):
    """A logra_dist tracker whose phases ("rows", "batch-end", ...) go to the exclusive timers;
    keeps the logger's writer-thread figures (its own time, overlapped with the main thread)."""

    enabled = True

    def __init__(self, timers: ExclusiveTimers):
        self.timers = timers
        self.sources: list[Callable[[], dict[str, float]]] = []

    def phase(self, name: str):  # type: ignore[override]
        return self.timers.phase(name)

    def add_source(self, source: Callable[[], dict[str, float]]) -> None:
        self.sources.append(source)

    def writer_seconds(self) -> float:
        return sum(s().get("time/write", 0.0) for s in self.sources)


def patch_method(cls: type, attr: str, timers: ExclusiveTimers, name: str) -> None:
    setattr(cls, attr, timers.wrap(name, getattr(cls, attr)))


def instrument_logra(timers: ExclusiveTimers) -> None:
    """LoGra's forward hooks (input projection) and gradient hooks (output projection and
    per-sample products) as `logra-hooks`; KFAC/covariance updates as `statistics`."""
    from logra_dist.core.capture import GradientCapture
    from logra_dist.engines.deepspeed import DeepSpeedEngineAdapter

    for maker in ("_make_forward_hook", "_make_grad_hook"):
        original = getattr(GradientCapture, maker)

        def make(self, *args, _original=original, **kwargs):
            return timers.wrap("logra-hooks", _original(self, *args, **kwargs))

        setattr(GradientCapture, maker, make)
    patch_method(GradientCapture, "flush_token_statistics", timers, "statistics")
    patch_method(DeepSpeedEngineAdapter, "_release_leftovers", timers, "zero3-release")


class _TimedWork:
    """A gloo Work handle whose wait() is timed: the main thread blocked on the all-gather."""

    def __init__(self, work: Any, timers: ExclusiveTimers):
        self._work, self._timers = work, timers

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        with self._timers.phase("allgather-wait"):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._work, attr)


def instrument_zero3(timers: ExclusiveTimers) -> None:
    """ZeRO-3 parameter traffic, before deepspeed.initialize: the coordinator's fetch (exclusive
    part: flatten, unflatten, prefetch bookkeeping) and release, the all-gather post and the wait
    on its handle (bytes counted), and the rest of DeepSpeed's module hooks."""
    from deepspeed.runtime.zero import parameter_offload, partition_parameters
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    patch_method(PartitionedParameterCoordinator, "fetch_sub_module", timers, "zero3-fetch")
    patch_method(PartitionedParameterCoordinator, "release_sub_module", timers, "zero3-release")
    for hook in (
        "pre_sub_module_forward_function",
        "post_sub_module_forward_function",
        "pre_sub_module_backward_function",
        "post_sub_module_backward_function",
    ):
        patch_method(parameter_offload.DeepSpeedZeRoOffload, hook, timers, "zero3-hooks")
    original = partition_parameters._dist_allgather_fn

    def allgather(input_tensor, output_tensor, group=None):
        with timers.phase("allgather-post"):
            timers.bytes["allgather"] += output_tensor.numel() * output_tensor.element_size()
            return _TimedWork(original(input_tensor, output_tensor, group=group), timers)

    partition_parameters._dist_allgather_fn = allgather


GATHERS = ("all_gather_into_tensor", "_all_gather_base")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "reduce",
    "broadcast",
    "barrier",
    "all_gather_object",
    "gather_object",
    "broadcast_object_list",
    "all_to_all_single",
    "all_reduce_coalesced",
)


def count_collectives(timers: ExclusiveTimers, counts: dict[str, int], active: Callable[[], bool]) -> None:
    """Count every torch.distributed collective called while `active()`, so that any collective
    besides ZeRO-3's weight all-gathers shows up, and time those others as `other-collectives`
    (the all-gathers are timed by `instrument_zero3`). Call before DeepSpeed initializes: it
    keeps references to some of them."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _name=name, _original=original, **kwargs):
            if not active():
                return _original(*args, **kwargs)
            counts[_name] = counts.get(_name, 0) + 1
            if _name in GATHERS:
                return _original(*args, **kwargs)
            with timers.phase("other-collectives"):
                return _original(*args, **kwargs)

        setattr(dist, name, functools.wraps(original)(counted))
