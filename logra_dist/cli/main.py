"""`logra-dist log|score|selfinf|ann|inspect|report ...`: parse, then dispatch to the job.

`launch/log.py` and `launch/score.py` wrap the first two.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import torch

from logra_dist.cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and run one command; errors propagate (`run` turns them into one-line messages)."""
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    if args.command in ("log", "score"):
        from logra_dist.engines.launch import destroy_distributed

        if args.command == "log":
            from logra_dist.cli.jobs import run_log

            try:
                run_log(args)
            except KeyboardInterrupt as e:  # SIGINT or SIGTERM (index.signals): the shards stay resumable
                return interrupted(e, args.out)
        else:
            from logra_dist.cli.sources import run_score

            run_score(args)
        # A gloo group still alive at interpreter exit can abort a finished process ("terminate
        # called without an active exception", pytorch#190489). Only on success: after an error
        # a peer may still sit in a collective, and the launcher tears the job down anyway.
        destroy_distributed()
    elif args.command == "ann":
        from logra_dist.cli.ann import run_ann
        from logra_dist.engines.launch import destroy_distributed

        run_ann(args)
        destroy_distributed()  # as for log and score: only on success
    elif args.command == "selfinf":
        from logra_dist.cli.exports import run_selfinf
        from logra_dist.engines.launch import destroy_distributed

        run_selfinf(args)
        destroy_distributed()
    elif args.command == "inspect":
        from logra_dist.index.inspect import inspect_index, render

        facts = inspect_index(args.index, sample_rows=args.sample_rows)
        print(json.dumps(facts, indent=2) if args.json else render(facts))
        return facts["exit_code"]  # 0 usable, 1 unfinished but resumable, 2 damaged
    elif args.command == "report":
        from logra_dist.cli.report import write_report

        options = {"max_queries": args.max_queries, "max_chars": args.max_chars, "data": args.data}
        print(write_report(args.results, args.out, **options))
    return 0


def run(argv: Sequence[str] | None = None) -> None:
    """The `logra-dist` entry point (and `launch/*.py`): `main`, then a clean end of the process
    (`engines.launch.exit_process`: no interpreter teardown after a distributed job)."""
    from logra_dist.cli.errors import debug_requested, report
    from logra_dist.engines.launch import exit_process

    debug, argv = debug_requested(sys.argv[1:] if argv is None else argv)
    try:
        code = main(argv)
    except BrokenPipeError:  # `logra-dist inspect DIR | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except SystemExit as e:  # argparse (usage, --help) exits with its own code; a message is an error
        code = e.code if isinstance(e.code, int) or e.code is None else report(e, _command(argv), debug)
    except Exception as e:  # the message says what is wrong, where, and the fix (cli/errors.py)
        code = report(e, _command(argv), debug)
    except KeyboardInterrupt as e:  # `log` says how to resume (main); the others leave no partial results
        if debug:
            raise
        signum = getattr(e, "signum", 2)
        print(f"logra-dist {_command(argv)}: interrupted by signal {signum}", file=sys.stderr, flush=True)
        code = 128 + signum
    exit_process(code or 0)


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in ("log", "score", "ann", "inspect", "report", "selfinf")), None)


def interrupted(e: KeyboardInterrupt, out: str) -> int:
    """One line instead of a traceback; exit status 128 + the signal, as the shell reports it."""
    import signal

    signum = getattr(e, "signum", signal.SIGINT)
    print(
        f"logra-dist log: interrupted by {signal.Signals(signum).name}; what was committed in {out} is kept: "
        "rerun the same command with --resume to finish the index",
        file=sys.stderr,
        flush=True,
    )
    return 128 + signum


if __name__ == "__main__":
    run()
