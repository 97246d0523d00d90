"""Subspace geometry of images: the single home of downsampling subspaces.

With k halvings of an image of side S (any channel count), the subspace coordinates are
D^k x = 2^k AvgPool_{2^k}(x), a block sum divided by the square root of the block size, and the
embedding is U^k c = nearest-neighbour upsampling by 2^k divided by 2^k. Then D U = I, U = D^T and
P = U D is the orthogonal projector onto images constant on 2^k x 2^k blocks (block means).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def num_halvings(full_size: int, subspace_size: int) -> int:
    """Number k of halvings that take a side of `full_size` pixels to `subspace_size` pixels."""
    if subspace_size <= 0 or full_size % subspace_size != 0:
        raise ValueError(
            f"Subspace size {subspace_size} does not divide image size {full_size}: choose a size "
            "obtained by repeated halving.")
    ratio = full_size // subspace_size
    k = int(round(math.log2(ratio)))
    if 2**k != ratio:
        raise ValueError(
            f"Subspace size {subspace_size} is not image size {full_size} divided by a power of "
            "two: choose a size obtained by repeated halving.")
    return k


def downsample(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Subspace coordinates D^k x = 2^k AvgPool_{2^k}(x) of images x of shape [..., C, H, W]."""
    if k == 0:
        return x
    block = 2**k
    if x.shape[-1] % block or x.shape[-2] % block:
        raise ValueError(
            f"Image of shape {tuple(x.shape[-2:])} cannot be downsampled {k} times: both sides "
            f"must be multiples of {block}.")
    lead = x.shape[:-3]
    flat = x.reshape((-1,) + tuple(x.shape[-3:]))
    pooled = F.avg_pool2d(flat, block) * block
    return pooled.reshape(lead + pooled.shape[1:])


def upsample(c: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Embedding U^k c: nearest-neighbour upsampling by 2^k divided by 2^k (U = D^T)."""
    if k == 0:
        return c
    block = 2**k
    up = c.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return up / block


def project(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Orthogonal projection P_k x = U^k D^k x onto images constant on 2^k x 2^k blocks."""
    return upsample(downsample(x, k), k)


def orthogonal_part(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Component (I - P_k) x of x orthogonal to the k-halvings subspace."""
    return x - project(x, k)


def subspace_dim_fraction(k: int) -> float:
    """n_k / d, the fraction of dimensions the k-halvings subspace keeps (4^-k)."""
    return 4.0 ** (-k)


def scaler_coefficients(centered: bool) -> tuple[float, float]:
    """Coefficients (a, b) of the data scaler x' = a x + b applied to images in [0, 1]."""
    return (2.0, -1.0) if centered else (1.0, 0.0)


def scaler_offset_factor(k: int, centered: bool) -> float:
    """Factor c with D^k(scaler(u)) = scaler(D^k u) - c for images u: c = b (2^k - 1).

    A subspace network trained on scaler(D^k u) must be given D^k x_t + c alpha(t) in place
    of D^k x_t when the full-space state was built from scaler(u).
    """
    _, b = scaler_coefficients(centered)
    return -b * (2**k - 1)
