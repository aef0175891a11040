"""`logra-dist` with fault hooks: `torchrun ... tests/faults/cli_worker.py log --out DIR ...`."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", ".."), HERE]

import hooks  # noqa: E402

from logra_dist.cli.main import run  # noqa: E402

if __name__ == "__main__":
    hooks.install()
    run(sys.argv[1:])
