"""Layer 4: scoring (kernels, top-k, query gradients, self-influence, results, the Scorer)."""
