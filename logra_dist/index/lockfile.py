"""One exclusive lock file: `fcntl.flock` on a file held open for the life of a job, with its
holder (host, pid, process start, command) written inside.

The kernel (or the file server) releases a flock when the holder dies, however it dies, so a
leftover file of a killed job is simply taken over: the file records who held it, the flock
says whether anyone still does. A live holder refuses a second one at once, named. Two things
flock cannot tell: whether a holder on another host is still alive (its pid means nothing
here), and whether the file system shares locks across hosts at all (NFS, Lustre: see
docs/reliability.md "One writer per index"). This module knows no index; `lock.py` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HELD: list[int] = []  # fds of the locks this process holds: closed in forked children


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) shares the parent's open file: close it, so the lock
    goes with the parent's death, not with the child's."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockHeld(Exception):
    """The lock is held by another job; the message describes the holder."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), which
    tells a live holder from a later process that reuses its pid; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _started_at(ticks: int | None) -> float:
    """Wall-clock time of a start given in ticks since boot (the lock time if unknown)."""
    try:
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if "btime" in line)
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, TypeError, ValueError):
        return time.time()


def me(what: str) -> dict[str, Any]:
    ticks = _start_ticks(os.getpid())
    return {
        "what": what,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start_ticks": ticks,
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(_started_at(ticks))),
        "locked_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv)[:300],
    }


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder recorded in the lock file (None: no file, or nothing readable yet)."""
    for _ in range(5):  # a holder writes its record right after taking the lock
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(0.02)
    return None


def alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the recorded holder is a live process: True/False on its own host, None on
    another host (cannot be judged from here)."""
    if holder.get("host") != socket.gethostname():
        return None
    ticks = _start_ticks(int(holder.get("pid", -1)))
    return ticks is not None and ticks == holder.get("process_start_ticks")


def describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has not recorded itself yet"
    text = f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('since')} ({holder.get('command')})"
    state = alive_here(holder)
    if state and holder.get("pid") == os.getpid():
        text += " (this very process: close() the Logger that holds it)"
    elif state is None:
        text += " (on another host: whether it is alive cannot be judged from here)"
    elif not state:
        text += " (that pid is gone: a process it forked still holds the lock; end it)"
    return text


def is_held(path: Path) -> bool:
    """Whether a live process holds the lock at `path` (a shared probe: never blocks a job's
    exclusive lock for more than an instant, and a job retries that long)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: nothing to tell
        return False
    finally:
        os.close(fd)


@dataclass
class LockFile:
    """An exclusive flock held at `path` until `release()` or this process's death."""

    path: Path
    fd: int
    previous: dict[str, Any] | None = None  # the record found in the file: a dead job's, or None

    @classmethod
    def acquire(cls, path: Path, what: str, wait_s: float = 0.3) -> LockFile:
        """Take the lock or raise LockHeld naming its holder. Retries for `wait_s` only to ride
        out a reader's instant shared probe (`is_held`), never to wait for a job."""
        deadline = time.monotonic() + wait_s
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was just removed by a releasing holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise LockHeld(describe(read_holder(path))) from None
            except OSError as e:  # ENOLCK, EINVAL: this file system gives no locks
                os.close(fd)
                raise OSError(e.errno, f"{path}: cannot lock ({e.strerror}): the file system gives no locks") from e
            try:  # the file we locked may have been unlinked by a releasing holder meanwhile
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        lock = cls(path, fd, read_holder(path))
        _HELD.append(fd)
        record = json.dumps(me(what)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        return lock

    def release(self) -> None:
        """Delete the file (while still holding it: a waiting job then locks a fresh file) and
        its folder if that is now empty, and unlock. Idempotent."""
        if self.fd < 0:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        if self.fd in _HELD:
            _HELD.remove(self.fd)
        os.close(self.fd)
        self.fd = -1
        with contextlib.suppress(OSError):  # not empty: other locks are held in it
            self.path.parent.rmdir()
