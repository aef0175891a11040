"""Layer 1: what turns activations into projected per-sample gradients, and curvature in projected space.

Knows torch and the config, nothing of files, engines or ranks beyond `comm`."""
