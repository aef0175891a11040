"""SIGINT and SIGTERM as a clean stop of a logging job.

Both raise `Interrupted` (a KeyboardInterrupt) in the main thread, so every phase unwinds within
seconds and the partial shard stays resumable; SIGTERM's default action would end the process
without unwinding, and launchers and the parent-death signal send SIGTERM. Handlers the
application installed itself are left alone. The writer reads `received()` to stop at once
instead of draining its queue (docs/reliability.md).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received = [0]  # the last signal turned into Interrupted in this process (0: none)


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal; what it committed stays resumable."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def received() -> int:
    """The signal that interrupted this process (0 if none)."""
    return _received[0]


def _handler(signum, frame) -> None:
    _received[0] = signum
    raise Interrupted(signum)


class StopOnSignals:
    """Installs the handler for SIGINT and SIGTERM where they still have their default, from the
    main thread only (Python runs handlers there); `restore()` puts the previous ones back."""

    def __init__(self) -> None:
        self._previous: dict[int, object] = {}

    def install(self) -> StopOnSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        _received[0] = 0  # an earlier interrupt in this process (a notebook) is not this job's
        for sig in SIGNALS:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                self._previous[sig] = current
                signal.signal(sig, _handler)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) is _handler:
                signal.signal(sig, previous)
        self._previous.clear()
