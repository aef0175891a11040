"""Fault injection for the reliability tests, installed by a worker script from LOGRA_DIST_FAULT.

Test-only: the hooks wrap library functions from outside (monkeypatching), so the library's
hot path carries no fault code. Spec: `kind[:count][@rank]`, several joined by commas, e.g.
`kill_after_batches:3@1` (SIGKILL rank 1 right after its 3rd logged batch).

    kill_after_batches:K   SIGKILL after the K-th logged batch (rows may still sit in the queue)
    raise_after_batches:K  raise RuntimeError there instead
    stall_after_batches:K  sleep there for an hour (a live rank that stops participating)
    slow_batches:MS        sleep MS milliseconds after every logged batch (a job that runs a while)
    kill_in_commit:K       SIGKILL inside the K-th commit: data fsynced, record not yet replaced
    kill_in_build          SIGKILL while the final HDF5 shard is being written (before the rename)
    kill_before_manifest   SIGKILL after the shards were renamed, before manifest.json is written
    kill_after_manifest    SIGKILL right after manifest.json is written (per-rank statistics left)
    fsize:BYTES            RLIMIT_FSIZE = BYTES with SIGXFSZ ignored (a full disk, per file)
    signal_in:PHASE:SIG[:group]
                           send SIG (INT or TERM) to this process (group: its process group) in
                           PHASE, then keep the phase busy for a minute (a long phase): batch (after
                           the 5th batch, rows queued), commit (inside the 2nd commit, writer
                           thread), build (building the HDF5 shard, holding h5py's lock), stats
                           (writing stats.h5), manifest
    fsize_at_stats:BYTES   the same, set just before rank 0 writes stats.h5 (the disk fills then)
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str | None = None) -> None:
    spec = os.environ.get("LOGRA_DIST_FAULT", "") if spec is None else spec
    rank = int(os.environ.get("RANK", "0"))
    for item in filter(None, (s.strip() for s in spec.split(","))):
        item, _, on_rank = item.partition("@")
        if on_rank and int(on_rank) != rank:
            continue
        kind, _, arg = item.partition(":")
        if kind == "signal_in":
            _signal_in(*arg.split(":"))
            continue
        _INSTALL[kind](int(arg) if arg else 0)


def _busy_after(sig: str, hold_h5_lock: bool = False, group: bool = False) -> None:
    """Send the signal to this process (group: to its process group, as Ctrl-C in a terminal
    signals a launcher and all its ranks), then stay in the phase for up to a minute (as a long
    shard build or stats write would); with hold_h5_lock, inside h5py's global lock, as a thread
    writing HDF5 holds it."""
    import h5py

    print(f"SIGNAL_SENT {time.time():.3f}", file=sys.stderr, flush=True)  # the test times the exit from here
    if group:
        os.killpg(os.getpgid(0), getattr(signal, f"SIG{sig}"))
    else:
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
    deadline = time.monotonic() + 60
    if hold_h5_lock:
        with h5py._objects.phil:
            while time.monotonic() < deadline:
                time.sleep(0.05)
    else:
        while time.monotonic() < deadline:
            time.sleep(0.05)


def _signal_in(phase: str, sig: str, target: str = "self") -> None:
    from logra_dist import logger
    from logra_dist.index import partial, writer

    if phase == "batch":
        _after_batches(5, lambda: _busy_after(sig, group=target == "group"))
    elif phase == "commit":
        original_record, seen = partial.write_record, [0]

        def write_record(path, record):
            if record.rows > 0:
                seen[0] += 1
                if seen[0] == 2:
                    _busy_after(sig, group=target == "group")
            original_record(path, record)

        partial.write_record = write_record
    elif phase == "build":
        original_checksums = writer.block_checksums

        def block_checksums(rows, block_rows):  # the .h5.partial is open, half made
            _busy_after(sig, hold_h5_lock=True, group=target == "group")
            return original_checksums(rows, block_rows)

        writer.block_checksums = block_checksums
    elif phase in ("stats", "manifest"):
        original_json, original_stats = logger.write_json_atomic, logger.StatsWriter

        class StatsWriter(original_stats):
            def add(self, state):  # the first layer queued: its writer thread is writing stats.h5
                super().add(state)
                if phase == "stats":
                    _busy_after(sig, group=target == "group")

        def write_json_atomic(path, data):
            if phase == "manifest" and path.name == "manifest.json":
                _busy_after(sig, group=target == "group")
            original_json(path, data)

        logger.StatsWriter, logger.write_json_atomic = StatsWriter, write_json_atomic
    else:
        raise ValueError(f"signal_in: unknown phase {phase!r}")


def _after_batches(k: int, action) -> None:
    from logra_dist.logger import Logger, Phase

    original, seen = Logger._on_batch, [0]

    def on_batch(self, ids, rows):
        original(self, ids, rows)
        if self.phase in (Phase.LOGGING, Phase.STATISTICS):  # batches after the projections (not a PCA pass)
            seen[0] += 1
            if seen[0] == k:
                action()

    Logger._on_batch = on_batch


def _slow_batches(ms: int) -> None:
    from logra_dist.logger import Logger

    original = Logger._on_batch

    def on_batch(self, ids, rows):
        original(self, ids, rows)
        time.sleep(ms / 1000)

    Logger._on_batch = on_batch


def _raise() -> None:
    raise RuntimeError("injected failure (LOGRA_DIST_FAULT)")


def _kill_in_commit(k: int) -> None:
    from logra_dist.index import partial

    original, seen = partial.write_record, [0]

    def write_record(path, record):
        if record.rows > 0:
            seen[0] += 1
            if seen[0] == k:
                _die()
        original(path, record)

    partial.write_record = write_record


def _kill_in_build(_: int) -> None:
    from logra_dist.index.partial import PartialShard

    def read_rows(self, start, stop):  # the HDF5 file exists under its temporary name, half made
        _die()

    PartialShard.read_rows = read_rows


def _kill_before_manifest(_: int) -> None:
    from logra_dist import logger

    original = logger.write_json_atomic

    def write_json_atomic(path, data):
        if path.name == "manifest.json":
            _die()
        original(path, data)

    logger.write_json_atomic = write_json_atomic


def _kill_after_manifest(_: int) -> None:
    from logra_dist import logger

    original = logger.write_json_atomic

    def write_json_atomic(path, data):
        original(path, data)
        if path.name == "manifest.json":
            _die()

    logger.write_json_atomic = write_json_atomic


def _fsize(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _fsize_at_stats(limit: int) -> None:
    from logra_dist import logger

    original = logger.StatsWriter

    class StatsWriter(original):  # opened once the shards are complete, before the eighs
        def __init__(self, *args, **kwargs):
            _fsize(limit)
            super().__init__(*args, **kwargs)

    logger.StatsWriter = StatsWriter


_INSTALL = {
    "kill_after_batches": lambda k: _after_batches(k, _die),
    "raise_after_batches": lambda k: _after_batches(k, _raise),
    "stall_after_batches": lambda k: _after_batches(k, lambda: time.sleep(3600)),
    "slow_batches": _slow_batches,
    "kill_in_commit": _kill_in_commit,
    "kill_in_build": _kill_in_build,
    "kill_before_manifest": _kill_before_manifest,
    "kill_after_manifest": _kill_after_manifest,
    "fsize": _fsize,
    "fsize_at_stats": _fsize_at_stats,
}
