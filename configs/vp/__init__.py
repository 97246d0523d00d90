"""Experiments with the variance-preserving SDE (and discrete DDPM)."""
