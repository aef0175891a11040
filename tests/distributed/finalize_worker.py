"""One rank of the distributed-finalize test (tests/distributed/test_finalize_dist.py), under torchrun.

Logs the tiny MLP of tests/faults/mlp_worker.py (rank r: samples r, r+world, ...) with raw and
kfac curvature (and ekfac), once with the default bucket and once with buckets of a few floats (tensors
split across buckets, several layers sharing one); then checks the bucketed reduce against one
unbucketed all-reduce and `comm.rank0_alone` against a group timeout shorter than rank 0's work.
Writes <out>/checks-rank<R>.json.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "faults")]

import mlp_worker  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from logra_dist import comm  # noqa: E402
from logra_dist.core.curvature.raw import Raw  # noqa: E402
from logra_dist.engines.launch import destroy_distributed, exit_process, init_distributed  # noqa: E402
from logra_dist.index import stats_writer  # noqa: E402
from logra_dist.logger import Logger  # noqa: E402

GROUP_TIMEOUT_S = 4.0  # the gloo group's own timeout; rank 0's lone work below takes longer


REPORTS: dict[str, dict[str, float]] = {}  # index folder name -> this rank's FinalizeReport figures


def log(out: Path, hessian: str, bucket_bytes: int, n: int, *extra: str) -> None:
    comm.REDUCE_BUCKET_BYTES = bucket_bytes
    args = mlp_worker.parser().parse_args(["--out", str(out), "--hessian", hessian, "--n", str(n), "--k", "3", *extra])
    finalize = Logger.finalize

    def keep_report(logger: Logger):  # the report of this run, kept for the test
        try:
            manifest = finalize(logger)
        except BaseException:
            logger.close()  # its locks released, as the process exit would (a resume follows here)
            raise
        REPORTS[out.name] = logger.finalize_report.figures()
        return manifest

    Logger.finalize = keep_report
    try:
        mlp_worker.run(args)
    finally:
        Logger.finalize = finalize


def failed_log(out: Path, n: int, owner, name: str, replacement) -> str:
    """`owner.name` replaced (on the ranks that pass a replacement) while the job logs and
    finalizes: the error each rank raised and what was left in place (no stats.h5, no manifest)."""
    original = getattr(owner, name)
    if replacement is not None:
        setattr(owner, name, replacement)
    try:
        log(out, "raw", 64 << 20, n)
        error = "none"
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        setattr(owner, name, original)
    comm.barrier()
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(("stats.h5", "manifest")))
    return f"{error} | left: {left}"


def stats_failure(out: Path, n: int) -> str:
    """Rank 0's stats.h5 writer thread hits a full disk at its first layer, while the ranks still
    decompose: every rank raises (the error text returned); nothing is renamed into place. Then
    the same job with --resume finishes the index in `out`."""

    def full(*args):  # the writer thread's dataset write
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    outcome = failed_log(out, n, stats_writer, "write_stats_dataset", full if comm.rank() == 0 else None)
    log(out, "raw", 64 << 20, n, "--resume")
    return outcome


def bucket_check(rank: int) -> dict:
    """Random tensors of odd sizes (103 floats) summed onto rank 1 in buckets of 3, 100 floats and 1 MiB."""
    g = torch.Generator().manual_seed(100 + rank)
    shapes = [(7,), (0,), (5, 3), (1,), (40, 2)]
    out = {}
    for bucket in (24, 800, 1 << 20):
        mine = [torch.randn(s, generator=g, dtype=torch.float32) for s in shapes]
        expected = comm.all_reduce_sum(torch.cat([t.double().reshape(-1) for t in mine]))
        local = torch.cat([t.reshape(-1) for t in mine]).clone()
        calls = comm.reduce_sum_into(mine, dst=1, bucket_bytes=bucket)
        got = torch.cat([t.double().reshape(-1) for t in mine])
        target = expected.float().double() if rank == 1 else local.double()  # float64 sums, stored float32
        out[str(bucket)] = {"calls": calls, "max_error": float((got - target).abs().max())}
    return out


def eigh_failure(out: Path, n: int) -> str:
    """The last layer's eigh fails on its owner (2 ranks: rank 0 in round 2, with rank 1's layer
    of round 1 still in flight to it): every rank raises, nothing is left in place."""
    original = Raw.layer_factors

    def failing(self, spec, *args, **kwargs):
        if spec.name == self.specs[-1].name:
            raise ValueError("eigh failed (test)")
        return original(self, spec, *args, **kwargs)

    return failed_log(out, n, Raw, "layer_factors", failing)


def rank0_alone_check(rank: int, out: Path) -> dict:
    """Rank 0 works alone 1.5x the group timeout; then fails; then a plain barrier (control);
    then its heartbeat stops."""
    status = out / "status"
    if rank == 0:
        status.unlink(missing_ok=True)
    comm.barrier()
    result = {}
    start = time.perf_counter()
    comm.rank0_alone(lambda: time.sleep(1.5 * GROUP_TIMEOUT_S), status, "job-a")
    result["waited_s"] = time.perf_counter() - start

    def fail() -> None:
        raise OSError("disk full (test)")

    try:
        comm.rank0_alone(fail, status, "job-b")
        result["error"] = None
    except Exception as e:  # every rank raises
        result["error"] = f"{type(e).__name__}: {e}"
    comm.barrier()
    try:  # control: the plain barrier the waits replace does time out
        if rank == 0:
            time.sleep(1.5 * GROUP_TIMEOUT_S)
        dist.barrier()
        result["plain_barrier"] = "ok"
    except Exception as e:
        result["plain_barrier"] = f"{type(e).__name__}"
    # last (the group is broken after): rank 0's heartbeat stops, as if it were killed
    comm.RANK0_STALE_S, comm.RANK0_HEARTBEAT_S = 2.0, 1000.0
    try:
        comm.rank0_alone(lambda: time.sleep(2.0), status, "job-c")
        result["stale"] = None
    except Exception as e:
        result["stale"] = f"{type(e).__name__}: {e}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--timeouts", action="store_true", help="also the rank0_alone timeout checks")
    args = ap.parse_args()
    out = Path(args.out)
    info = init_distributed(timeout_s=GROUP_TIMEOUT_S if args.timeouts else None)
    for hessian in ("raw", "kfac"):
        log(out / hessian, hessian, 64 << 20, args.n)
        log(out / f"{hessian}-small-buckets", hessian, 24, args.n)
    log(out / "ekfac", "ekfac", 64 << 20, args.n)
    checks: dict = {"rank": info.rank, "reports": REPORTS}
    checks["stats_failure"] = stats_failure(out / "raw-stats-failed", args.n)
    checks["eigh_failure"] = eigh_failure(out / "raw-eigh-failed", args.n)
    if info.world_size >= 2:
        checks["buckets"] = bucket_check(info.rank)
    if args.timeouts:
        checks["rank0_alone"] = rank0_alone_check(info.rank, out)
    (out / f"checks-rank{info.rank}.json").write_text(json.dumps(checks))
    if not args.timeouts:  # a timed-out gloo group cannot be torn down cleanly
        destroy_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after a gloo group (pytorch#190489: SIGABRT at exit)
