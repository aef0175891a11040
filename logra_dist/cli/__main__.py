"""`python -m logra_dist.cli ...` is `logra-dist ...`."""

from logra_dist.cli.main import run

run()
