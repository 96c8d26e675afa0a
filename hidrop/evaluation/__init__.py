"""The benchmark registry, the harness, the official metrics and the paper's published results."""
