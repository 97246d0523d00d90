"""Subspace analyses: RMSD of data to subspaces, orthogonal Fisher divergence, cutoff times, plots.

Library modules take explicit arguments; each has a command line (`python -m analysis.rmsd`,
`python -m analysis.divergence`, `python -m analysis.cutoffs`).
"""
