"""`python -m logra_dist.cli ...` is `logra-dist ...`."""

import sys

from logra_dist.cli.main import main

sys.exit(main())
