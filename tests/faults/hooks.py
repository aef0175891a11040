"""Fault injection for the reliability tests, installed by a worker script from LOGRA_DIST_FAULT.

Test-only: the hooks wrap library functions from outside (monkeypatching), so the library's
hot path carries no fault code. Spec: `kind[:count][@rank]`, several joined by commas, e.g.
`kill_after_batches:3@1` (SIGKILL rank 1 right after its 3rd logged batch).

    kill_after_batches:K   SIGKILL after the K-th logged batch (rows may still sit in the queue)
    raise_after_batches:K  raise RuntimeError there instead
    stall_after_batches:K  sleep there for an hour (a live rank that stops participating)
    kill_in_commit:K       SIGKILL inside the K-th commit: data fsynced, record not yet replaced
    kill_in_build          SIGKILL while the final HDF5 shard is being written (before the rename)
    kill_before_manifest   SIGKILL after the shards were renamed, before manifest.json is written
    kill_after_manifest    SIGKILL right after manifest.json is written (per-rank statistics left)
    fsize:BYTES            RLIMIT_FSIZE = BYTES with SIGXFSZ ignored (a full disk, per file)
    fsize_at_stats:BYTES   the same, set just before rank 0 writes stats.h5 (the disk fills then)
"""

from __future__ import annotations

import os
import resource
import signal
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
        _INSTALL[kind](int(arg) if arg else 0)


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

    original = logger.write_stats

    def write_stats(*args, **kwargs):
        _fsize(limit)
        original(*args, **kwargs)

    logger.write_stats = write_stats


_INSTALL = {
    "kill_after_batches": lambda k: _after_batches(k, _die),
    "raise_after_batches": lambda k: _after_batches(k, _raise),
    "stall_after_batches": lambda k: _after_batches(k, lambda: time.sleep(3600)),
    "kill_in_commit": _kill_in_commit,
    "kill_in_build": _kill_in_build,
    "kill_before_manifest": _kill_before_manifest,
    "kill_after_manifest": _kill_after_manifest,
    "fsize": _fsize,
    "fsize_at_stats": _fsize_at_stats,
}
