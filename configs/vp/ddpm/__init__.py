"""The DDPM architecture of Ho et al. (2020) trained with the VP SDE or discrete DDPM."""
