"""What a failed `logra-dist` command prints: one or two lines, not a traceback.

A user's mistake (a missing index, a bad config or query file, a held lock, mismatched
fingerprints, a damaged shard) is raised as an exception whose message already says what is
wrong, where, and the fix; `run()` prints that message as `logra-dist CMD: error: MESSAGE` and
exits 1. `--debug` (anywhere on the command line, or LOGRA_DIST_DEBUG=1) prints the traceback
instead. An exception of a class no user error uses is named as unexpected, with the hint to
rerun with --debug.

Under a launcher every failing rank exits non-zero, and every rank prints its own error with
`[rank R/W]`, because a rank-specific error (its shard, its lock, its part of the data) is only
known there; an error of the command line itself (usage, LoGraConfig) is the same on every rank,
so only rank 0 prints it when it comes before any process group (after that, every rank prints
its own). A rank that fails because a peer died says so and points at the peer's
message rather than repeating gloo's.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence

# Exception classes whose message is written for the user (the rest are unexpected).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError)
MAX_CHARS = 1200  # a message longer than this is cut: the point of it comes first


def debug_requested(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(--debug given or LOGRA_DIST_DEBUG=1, argv without --debug): a global flag accepted
    anywhere, so `launch/log.py ... --debug` and `logra-dist --debug score ...` both work."""
    argv = list(argv)
    debug = "--debug" in argv or os.environ.get("LOGRA_DIST_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != "--debug"]


def _where_group():
    """torch.distributed when a process group exists, else None."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _where() -> tuple[int, int]:
    """(rank, world size) of this process: the process group's, else the launcher's variables."""
    dist = _where_group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _is_peer_failure(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None)
    text = str(e)
    return (dist_error is not None and isinstance(e, dist_error)) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def _raised_here(e: BaseException) -> bool:
    """Raised by logra_dist's own code (e.g. RuntimeError("scoring failed on rank(s) [1]; see the
    error reported there")): its message was written for the user, unlike a library's."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def describe(e: BaseException) -> tuple[str, bool]:
    """(the message to print, whether every rank would print the same one)."""
    from logra_dist.config import ConfigError

    early = _where_group() is None  # before the process group: the command line and config checks
    if isinstance(e, SystemExit):  # check_args and friends: SystemExit("--flag must be ...")
        return str(e.code), early
    if isinstance(e, ConfigError):
        return str(e), early
    if isinstance(e, json.JSONDecodeError):  # a JSON file read without a named error: say where
        return f"not valid JSON at line {e.lineno} column {e.colno}: {e.msg}", False
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e.strerror or ""):
        return f"{e.filename}: {e.strerror or e}", False
    if _is_peer_failure(e):
        return (
            f"lost contact with another rank ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "the rank that failed first reports the cause"
        ), False
    if isinstance(e, USER_ERRORS) or type(e).__name__ in ("LockHeld", "IndexLockedError") or _raised_here(e):
        return str(e) or type(e).__name__, False
    return f"unexpected {type(e).__name__}: {e}; rerun with --debug for the traceback and report it", False


def report(e: BaseException, command: str | None, debug: bool) -> int:
    """Print the error (or its traceback with debug) on the ranks that should; the exit code."""
    rank, world = _where()
    message, same_everywhere = describe(e)
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    elif rank == 0 or not same_everywhere:
        if len(message) > MAX_CHARS:
            message = message[: MAX_CHARS - 1] + "…"
        who = f"logra-dist {command}" if command else "logra-dist"
        where = f" [rank {rank}/{world}]" if world > 1 else ""
        print(f"{who}{where}: error: {message}", file=sys.stderr, flush=True)
    return 2 if command == "inspect" else 1  # inspect: 1 means "resumable", so an error is 2 (not usable)
