"""stats.h5 written while finalize still decomposes later layers.

Rank 0 hands each layer's fields over as soon as it has them (`add`); a background thread
checksums them and writes them to `stats.h5.tmp` while the main thread runs the next eigh (torch's
eigh and gloo's receive release the GIL). `close` writes what is left, the digest, fsyncs and
renames the file into place; so the work rank 0 does alone after the last round is the last
layers' write, not every layer's (at k=64: 64 MB per layer, ~0.3 s each here). The file holds
what `format.write_stats` writes from the same fields (tests/index/test_stats_writer.py).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from logra_dist.index.format import check_stats_attrs, stats_digest, stats_write_error, write_stats_dataset
from logra_dist.index.h5io import h5_writing


class StatsWriter:
    """`add(state)` any number of times, then `close()` (raises the writer's error, if any) or
    `abort()` (on an error elsewhere: nothing renamed into place, never raises)."""

    def __init__(self, path: Path, kind: str, damping: float, attrs: dict[str, Any]):
        check_stats_attrs(f"StatsWriter({path})", attrs)
        self.path, self.tmp = Path(path), Path(path).with_name(Path(path).name + ".tmp")
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._abandon = False
        self._thread = threading.Thread(
            target=self._run, args=(kind, damping, attrs), name="logra-stats-writer", daemon=True
        )
        self._thread.start()

    def add(self, state: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]]) -> None:
        """Queue datasets (name -> array; the arrays unchanged until written), or a callable the
        writer thread calls for them (a layer still in transfer to this rank)."""
        if self._thread.is_alive():
            self._queue.put(state)

    def close(self) -> None:
        """Write what is queued, the digest; fsync, rename into place."""
        self._stop()
        if self._error is not None:
            self.tmp.unlink(missing_ok=True)  # never renamed into place; the shards and side files stay
            error = stats_write_error(self.path, self._error) if isinstance(self._error, OSError) else self._error
            if error is self._error:
                raise error
            raise error from self._error
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Stop after the dataset being written, drop the rest and the temporary file."""
        self._abandon = True
        self._stop()
        self.tmp.unlink(missing_ok=True)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self, kind: str, damping: float, attrs: dict[str, Any]) -> None:
        try:
            with h5_writing(self.tmp) as f:
                f.attrs.update({"hessian": kind, "damping": damping, **attrs})
                sums: dict[str, str] = {}
                while (state := self._queue.get()) is not None:
                    if callable(state):  # even when abandoned: a transfer is waited for, not dropped
                        state = state()
                    for key, arr in state.items() if isinstance(state, dict) else ():
                        if self._abandon:
                            break
                        write_stats_dataset(f, key, arr, sums)
                if not self._abandon:
                    f.attrs["digest"] = stats_digest(sums, attrs)
        except BaseException as e:  # raised by close() in the calling thread
            self._error = e
