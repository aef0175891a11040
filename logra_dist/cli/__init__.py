"""Layer 5: the `logra-dist` command line (parser, jobs, query sources, report)."""
