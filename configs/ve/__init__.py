"""Experiments with the variance-exploding SDE (and discrete SMLD/NCSN)."""
