"""Small configs for CPU machines on the built-in dataset (no download needed)."""
