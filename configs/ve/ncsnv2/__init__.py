"""NCSNv2 experiments (Song & Ermon, 2020)."""
