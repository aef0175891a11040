"""What a long job reports about itself: phase timers, throughput, peak memory, progress, W&B.

Knows nothing of LoGra: callers name their phases ("forward", "write", "gemm", ...) and counters
("samples", "tokens", "bytes_written", ...). The hot path is one `perf_counter()` pair per phase
and batch and a dict update; nothing synchronizes a device unless `sync_cuda` asks for it (on a
GPU, host-side timers otherwise measure kernel launches, not kernels).

Figures (see docs/observability.md): `time/<phase>` cumulative seconds, `time/elapsed`,
`count/<name>`, `rate/samples_per_s`, `rate/tokens_per_s`, `rate/<bytes>_MBps` (bytes over the
time of the phase that moved them), `memory/peak_rss_MiB`, `memory/peak_cuda_MiB` (on GPU).

W&B: ONE run per job, opened by rank 0 only. Per-batch figures in the run are rank 0's (no
collective on the hot path); at `finish()` every rank's figures are gathered to rank 0 (one
`all_gather_object`) and logged as a per-rank table plus min/mean/max summaries, which is what
shows stragglers. One run per rank (W&B "groups") would multiply runs, service processes and
offline folders by the world size for figures that only matter side by side.
Mode: `disabled` with `--no-wandb` or WANDB_MODE=disabled; WANDB_MODE when set; otherwise
`online` when an API key is configured (WANDB_API_KEY or a netrc entry), else `offline`.
"""

from __future__ import annotations

import netrc
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

Figures = dict[str, float]
_TIME, _COUNT = "time/", "count/"
# counters that are byte amounts, and the phase whose time they are divided by for a rate
BYTE_RATES = {"bytes_written": "write", "bytes_read": "read"}


def peak_memory() -> Figures:
    """Peak resident memory of this process (and peak CUDA allocation when a GPU is in use)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"memory/peak_rss_MiB": rss / (1 << 20) if sys.platform == "darwin" else rss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/peak_cuda_MiB"] = torch.cuda.max_memory_allocated() / (1 << 20)
    return out


class _Phase:
    """Context manager adding the wall time of its block to one phase."""

    __slots__ = ("name", "start", "tracker")

    def __init__(self, tracker: Tracker, name: str):
        self.tracker, self.name, self.start = tracker, name, 0.0

    def __enter__(self) -> _Phase:
        if self.tracker.sync_cuda:
            self.tracker._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tracker.sync_cuda:
            self.tracker._sync()
        self.tracker.add_time(self.name, time.perf_counter() - self.start)


class _NoPhase:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_PHASE = _NoPhase()


class NullTracker:
    """The default everywhere: records nothing, costs one attribute lookup per call."""

    def phase(self, name: str) -> _NoPhase:
        return _NO_PHASE

    def add_time(self, name: str, seconds: float) -> None:
        pass

    def count(self, **amounts: float) -> None:
        pass

    def add_source(self, source: Callable[[], Figures]) -> None:
        pass

    def step(self, samples: int = 0, tokens: int = 0, **counts: float) -> None:
        pass

    def figures(self) -> Figures:
        return {}

    def finish(self, summary: dict[str, Any] | None = None) -> list[Figures]:
        return []


NULL_TRACKER = NullTracker()


class Tracker(NullTracker):
    """Timers, counters, progress and (on rank 0) a W&B run for one job.

    log_every: batches between W&B history rows (and plain progress lines, at most one per
    `progress_interval_s`). total: expected samples on this rank, for the progress bar.
    """

    def __init__(
        self,
        name: str = "job",
        *,
        total: int | None = None,
        log_every: int = 10,
        wandb_run: WandbRun | None = None,
        rank: int | None = None,
        progress: bool = True,
        progress_interval_s: float = 30.0,
        sync_cuda: bool = False,
        stream: TextIO | None = None,
    ):
        self.name, self.total, self.log_every = name, total, max(1, int(log_every))
        self.rank = _dist_rank() if rank is None else rank
        self.world = _dist_world()
        self.wandb = wandb_run if (wandb_run is not None and self.rank == 0) else None
        self.sync_cuda = sync_cuda
        self.times: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.batches = 0
        self._sources: list[Callable[[], Figures]] = []
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._progress = (
            _Progress(name, total, progress_interval_s, stream, self.world) if (progress and self.rank == 0) else None
        )

    # -- recording (cheap; add_time/count are thread safe: writer and reader threads use them) --
    def phase(self, name: str) -> _Phase:
        """`with tracker.phase("forward"): ...` adds the block's wall time to that phase."""
        return _Phase(self, name)

    def add_time(self, name: str, seconds: float) -> None:
        with self._lock:
            self.times[name] = self.times.get(name, 0.0) + seconds

    def count(self, **amounts: float) -> None:
        with self._lock:
            for key, value in amounts.items():
                self.counts[key] = self.counts.get(key, 0.0) + value

    def add_source(self, source: Callable[[], Figures]) -> None:
        """A callable returning figures owned elsewhere (e.g. a writer thread's totals), read at
        every snapshot: `time/<phase>` keys add to phases, `count/<name>` keys to counters."""
        self._sources.append(source)

    def step(self, samples: int = 0, tokens: int = 0, **counts: float) -> None:
        """One batch done: count it, move the progress bar, log to W&B every `log_every` batches."""
        self.batches += 1
        self.count(samples=samples, tokens=tokens, **counts)
        if self._progress is not None:
            self._progress.update(samples, self)
        if self.wandb is not None and self.batches % self.log_every == 0:
            self.wandb.log(self.figures(), step=self.batches)

    # -- reading ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def figures(self) -> Figures:
        """This rank's figures now (flat, W&B-ready)."""
        with self._lock:
            times, counts = dict(self.times), dict(self.counts)
        for source in self._sources:
            for key, value in source().items():
                if key.startswith(_TIME):
                    times[key[len(_TIME) :]] = times.get(key[len(_TIME) :], 0.0) + float(value)
                elif key.startswith(_COUNT):
                    counts[key[len(_COUNT) :]] = counts.get(key[len(_COUNT) :], 0.0) + float(value)
        elapsed = self.elapsed()
        out: Figures = {"time/elapsed": elapsed, "count/batches": float(self.batches)}
        out.update({_TIME + k: v for k, v in sorted(times.items())})
        out.update({_COUNT + k: v for k, v in sorted(counts.items())})
        for key in ("samples", "tokens"):
            if key in counts:
                out[f"rate/{key}_per_s"] = counts[key] / max(elapsed, 1e-9)
        for key, phase in BYTE_RATES.items():
            if counts.get(key) and times.get(phase):
                out[f"rate/{key}_MBps"] = counts[key] / times[phase] / 1e6
        out.update(peak_memory())
        return out

    def finish(
        self, summary: dict[str, Any] | None = None, metrics_dir: str | os.PathLike | None = None
    ) -> list[Figures]:
        """Collective when a process group exists (every rank calls it): gathers every rank's
        figures (the one gather of the job); rank 0 prints the job's summary (`job_metrics`),
        writes it to `metrics_dir/metrics.json` when given, logs the figures to W&B (summary +
        per-rank table) and closes the run. Returns the per-rank figures (index = rank) on every rank."""
        mine = self.figures()
        per_rank = _all_gather(mine)
        if self._progress is not None:  # its last line with the gathered (exact) sample count
            self._progress.close(self, int(sum(f.get("count/samples", 0.0) for f in per_rank)))
        if self.rank == 0 and (self._progress is not None or metrics_dir is not None):
            metrics = job_metrics(self.name, per_rank, summary or {})
            if self._progress is not None:
                print(render_metrics(metrics), file=self._progress.stream, flush=True)
            if metrics_dir is not None:
                write_metrics(metrics_dir, metrics)
        if self.wandb is not None:
            self.wandb.log(mine, step=max(self.batches, 1))
            self.wandb.summarize(mine, per_rank, summary or {})
            self.wandb.finish()
            self.wandb = None
        return per_rank

    def _sync(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


class _Progress:
    """A tqdm bar when stderr is a terminal, else a plain line at most every `interval_s`."""

    def __init__(self, name: str, total: int | None, interval_s: float, stream: TextIO | None, world: int = 1):
        self.name, self.total, self.interval_s, self.world = name, total, interval_s, max(1, world)
        self.stream = stream or sys.stderr
        self.done, self._last = 0, time.perf_counter()
        self.bar = None
        if stream is None and sys.stderr.isatty():
            from tqdm.auto import tqdm

            all_ranks = None if total is None else total * self.world
            self.bar = tqdm(total=all_ranks, desc=f"logra-dist {name}", unit="sample", dynamic_ncols=True)

    def update(self, samples: int, tracker: Tracker) -> None:
        self.done += samples
        if self.bar is not None:
            self.bar.update(samples * self.world)
            return
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._last = now
            self._line(tracker)

    def _line(self, tracker: Tracker, exact: int | None = None) -> None:
        """All ranks' samples, estimated from rank 0's share x world (strided shares differ by at
        most one sample a rank; no collective on the hot path): marked '~' on more than one rank.
        exact: the gathered count of all ranks (the last line), shown as is."""
        elapsed = max(tracker.elapsed(), 1e-9)
        w, approx = self.world, "~" if self.world > 1 else ""
        done, total = self.done * w, (self.total or 0) * w
        if exact is not None:
            done, approx = exact, ""
            total = exact if self.total and self.done >= self.total else total
        rate = done / elapsed
        of = f"/{approx}{total} ({100 * self.done / max(self.total, 1):.0f}%)" if self.total else ""
        eta = f", eta {(self.total - self.done) / (self.done / elapsed):.0f}s" if self.total and self.done else ""
        tokens = tracker.counts.get("tokens", 0.0) / elapsed * w
        ranks = f" on {w} ranks" if w > 1 else ""
        print(
            f"[logra-dist {self.name}] {approx}{done}{of} samples{ranks}, {approx}{rate:.1f} samples/s, "
            f"{'~' if w > 1 else ''}{tokens:.0f} tokens/s{eta}",
            file=self.stream,
            flush=True,
        )

    def close(self, tracker: Tracker, exact: int | None = None) -> None:
        if self.bar is not None:
            if exact is not None:
                self.bar.n = exact
                self.bar.refresh()
            self.bar.close()
        else:
            self._line(tracker, exact)


# -- the job's summary: console and metrics.json --------------------------------------------------
METRICS_FILE = "metrics.json"
METRICS_VERSION = 1


def job_metrics(job: str, per_rank: list[Figures], extra: dict[str, Any]) -> dict[str, Any]:
    """The end-of-job figures of all ranks (docs/observability.md lists the fields). Phases are
    every `time/<phase>` any rank recorded (finalize, gemm, ... whatever the callers named), as
    mean and max seconds over ranks and the mean's share of the job's wall time."""
    wall = max(f.get("time/elapsed", 0.0) for f in per_rank) or 1e-9
    total = {k: sum(f.get(f"count/{k}", 0.0) for f in per_rank) for k in ("samples", "tokens", "batches")}
    phases = {}
    for key in sorted({k for f in per_rank for k in f if k.startswith(_TIME) and k != "time/elapsed"}):
        values = [f.get(key, 0.0) for f in per_rank]
        mean = sum(values) / len(values)
        phases[key[len(_TIME) :]] = {"mean_s": mean, "max_s": max(values), "share": mean / wall}
    ranks = [
        {
            "rank": r,
            "samples": int(f.get("count/samples", 0)),
            "tokens": int(f.get("count/tokens", 0)),
            "elapsed_s": f.get("time/elapsed", 0.0),
            **{k.split("/", 1)[1]: v for k, v in f.items() if k.startswith("memory/")},
        }
        for r, f in enumerate(per_rank)
    ]
    return {
        "metrics_version": METRICS_VERSION,
        "job": job,
        "world_size": len(per_rank),
        "wall_s": wall,
        "samples": int(total["samples"]),
        "tokens": int(total["tokens"]),
        "batches": int(total["batches"]),
        "samples_per_s": total["samples"] / wall,
        "tokens_per_s": total["tokens"] / wall,
        "peak_rss_MiB_max": max(r.get("peak_rss_MiB", 0.0) for r in ranks),
        "phases": phases,
        "ranks": ranks,
        "summary": {k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool))},
        "per_rank": per_rank,
    }


def render_metrics(m: dict[str, Any]) -> str:
    """A few console lines: totals, each rank's peak memory, and the phases' shares of wall time."""
    memory = ", ".join(
        f"r{r['rank']} {r.get('peak_rss_MiB', 0):.0f}"
        + (f"/{r['peak_cuda_MiB']:.0f} cuda" if "peak_cuda_MiB" in r else "")
        for r in m["ranks"]
    )
    top = sorted(m["phases"].items(), key=lambda kv: -kv[1]["share"])[:8]
    shares = ", ".join(f"{name} {p['share']:.0%}" for name, p in top)
    return (
        f"[logra-dist {m['job']}] done: {m['samples']} samples, {m['tokens']} tokens on {m['world_size']} rank(s) "
        f"in {m['wall_s']:.1f}s = {m['tokens_per_s']:.0f} tokens/s, {m['samples_per_s']:.1f} samples/s\n"
        f"[logra-dist {m['job']}] peak memory (MiB): {memory}\n"
        f"[logra-dist {m['job']}] phases (share of wall time, mean over ranks): {shares or 'none timed'}"
    )


def write_metrics(directory: str | os.PathLike, metrics: dict[str, Any]) -> str:
    """`directory/metrics.json`, atomically (temporary name, then rename)."""
    import json

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, METRICS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


# -- W&B ----------------------------------------------------------------------------------------
def wandb_mode(no_wandb: bool = False, env: dict[str, str] | None = None) -> str:
    """ "disabled" | "offline" | "online" (rules in the module docstring)."""
    env = os.environ if env is None else env
    if no_wandb:
        return "disabled"
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode in ("disabled", "offline", "online"):
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if _has_api_key(env) else "offline"


def _has_api_key(env: dict[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    host = env.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(env.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbRun:
    """The job's W&B run (rank 0 only). Reuses a run the user already opened (e.g. the Hugging
    Face Trainer's) instead of starting a second one, and then leaves it open."""

    def __init__(
        self,
        job_type: str,
        config: dict[str, Any],
        *,
        mode: str,
        project: str | None = None,
        name: str | None = None,
        directory: str | None = None,
    ):
        import wandb

        self._wandb = wandb
        self.prefix = ""
        if wandb.run is not None:  # someone else's run: log under a prefix, never finish it
            self.run, self.owned, self.prefix = wandb.run, False, "logra/"
            self.run.config.update({"logra": config}, allow_val_change=True)
        else:
            self.run = wandb.init(
                project=project or os.environ.get("WANDB_PROJECT") or "logra-dist",
                job_type=job_type,
                name=name,
                config=config,
                mode=mode,
                dir=directory,
                settings=wandb.Settings(console="off", silent=True),
            )
            self.owned = True
        self.mode = mode
        self.dir = getattr(self.run, "dir", None)

    def log(self, figures: Figures, step: int | None = None) -> None:
        data = {self.prefix + k: v for k, v in figures.items()}
        if self.owned:
            self.run.log(data, step=step)
        else:  # the owner controls the step counter
            self.run.log(data)

    def summarize(self, mine: Figures, per_rank: list[Figures], extra: dict[str, Any]) -> None:
        summary: dict[str, Any] = {self.prefix + k: v for k, v in mine.items()}
        summary[self.prefix + "world_size"] = len(per_rank)
        for key in sorted(set().union(*per_rank)):
            values = [f[key] for f in per_rank if key in f]
            summary[f"{self.prefix}ranks/{key}/min"] = min(values)
            summary[f"{self.prefix}ranks/{key}/mean"] = sum(values) / len(values)
            summary[f"{self.prefix}ranks/{key}/max"] = max(values)
        summary.update({self.prefix + k: v for k, v in extra.items()})
        self.run.summary.update(summary)
        columns = ["rank"] + sorted(set().union(*per_rank))
        rows = [[r] + [f.get(c) for c in columns[1:]] for r, f in enumerate(per_rank)]
        self.run.log({self.prefix + "per_rank": self._wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        if self.owned:
            where = self.dir
            self.run.finish()
            if self.mode == "offline" and where:
                print(
                    f"[logra-dist] W&B offline run in {os.path.dirname(where)}; upload it with "
                    f"`wandb sync {os.path.dirname(where)}`",
                    file=sys.stderr,
                    flush=True,
                )


def start_wandb(
    job_type: str,
    config: dict[str, Any],
    *,
    no_wandb: bool = False,
    project: str | None = None,
    name: str | None = None,
    rank: int | None = None,
) -> WandbRun | None:
    """Open the job's W&B run on rank 0 (None on other ranks and when disabled)."""
    mode = wandb_mode(no_wandb)
    if mode == "disabled" or (_dist_rank() if rank is None else rank) != 0:
        return None
    return WandbRun(job_type, config, mode=mode, project=project, name=name)


# -- process group (optional) -------------------------------------------------------------------
def _dist():
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _dist_rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", 0))


def _dist_world() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", 1))


def _all_gather(figures: Figures) -> list[Figures]:
    if _dist() is None:  # no process group (or torch never imported): nothing to gather
        return [figures]
    from logra_dist.comm import all_gather_objects

    return all_gather_objects(figures)
