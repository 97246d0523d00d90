"""Experiments with the sub-VP SDE."""
