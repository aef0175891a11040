"""Log projected per-sample gradients: `python launch/log.py` (one process) or
`deepspeed --num_gpus 2 launch/log.py --config configs/zero3.json` / `torchrun ...`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from logra_dist.cli.main import run

if __name__ == "__main__":
    run(["log", *sys.argv[1:]])
