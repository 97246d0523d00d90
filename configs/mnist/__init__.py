"""Small configs for CPU machines on MNIST (the installed data package, no download)."""
