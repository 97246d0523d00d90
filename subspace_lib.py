"""Subspace geometry of images: the single home of downsampling subspaces.

With k halvings of an image of side S (any channel count), the subspace coordinates are
D^k x = 2^k AvgPool_{2^k}(x), a block sum divided by the square root of the block size, and the
embedding is U^k c = nearest-neighbour upsampling by 2^k divided by 2^k. Then D U = I, U = D^T and
P = U D is the orthogonal projector onto images constant on 2^k x 2^k blocks (block means).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

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


# --------------------------------------------------------------------------------------------
# Dataset statistics: RMSD of the data to each downsampling subspace.

DEFAULT_RMSD_PATH = Path(__file__).resolve().parent / "assets" / "subspace_rmsd.json"

# Names by which users refer to a dataset (the original `--dataset` flag, config names).
_DATASET_ALIASES = {
    "cifar": "cifar10", "cifar10": "cifar10",
    "celebahq": "celebahq", "celeba_hq": "celebahq", "celebahq_256": "celebahq",
    "church": "church", "lsun_church": "church", "church_outdoor": "church",
    "builtin": "builtin",
}

RMSD_COMMAND = "python -m analysis.rmsd --config <config> --subspace downsample"


def canonical_dataset_name(name: str) -> str:
    """Canonical statistics key of a dataset name (`cifar` -> `cifar10`, ...); unknown names are
    lower-cased and kept, so user datasets work once their statistics are computed."""
    return _DATASET_ALIASES.get(name.lower(), name.lower())


def dataset_stats_name(config) -> str:
    """Statistics key of the dataset a config trains on (LSUN uses its category)."""
    name = config.data.dataset.lower()
    if name == "lsun":
        return canonical_dataset_name(config.data.category)
    if name in ("numpy", "folder") and getattr(config.data, "root", None):
        return canonical_dataset_name(Path(config.data.root).stem)
    return canonical_dataset_name(name)


def load_rmsd_table(path: str | os.PathLike | None = None) -> dict:
    """The statistics file as {dataset: {full_size: {subspace_size: rmsd}}} with int sizes."""
    path = Path(path) if path is not None else DEFAULT_RMSD_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"Subspace statistics file {path} does not exist: compute it with `{RMSD_COMMAND}`.")
    raw = json.loads(path.read_text())
    return {dataset: {int(full): {int(sub): float(r) for sub, r in subs.items()}
                      for full, subs in sizes.items()}
            for dataset, sizes in raw.items() if not dataset.startswith("_")}


def dataset_rmsd(dataset: str, full_size: int, subspace_size: int,
                 path: str | os.PathLike | None = None) -> float:
    """Per-dimension RMSD r_k of `dataset` (pixels in [0,1]) from `full_size` to `subspace_size`."""
    table = load_rmsd_table(path)
    key = canonical_dataset_name(dataset)
    try:
        return table[key][int(full_size)][int(subspace_size)]
    except KeyError:
        raise KeyError(
            f"No RMSD statistic for dataset '{key}' from {full_size}x{full_size} to "
            f"{subspace_size}x{subspace_size} in {path or DEFAULT_RMSD_PATH}: compute it with "
            f"`{RMSD_COMMAND}`.") from None


def write_rmsd(dataset: str, full_size: int, rmsd: dict[int, float],
               path: str | os.PathLike | None = None) -> Path:
    """Add or replace the RMSD values of `dataset` at `full_size` in the statistics file."""
    from utils import atomic_write_text

    path = Path(path) if path is not None else DEFAULT_RMSD_PATH
    raw = json.loads(path.read_text()) if path.is_file() else {}
    entry = raw.setdefault(canonical_dataset_name(dataset), {}).setdefault(str(int(full_size)), {})
    for size, value in sorted(rmsd.items(), reverse=True):
        entry[str(int(size))] = float(value)
    atomic_write_text(path, json.dumps(raw, indent=2) + "\n")
    return path


def between_level_rmsd(d: int, n_i: int, r_i: float, n_j: int, r_j: float) -> float:
    """RMSD between nested subspaces n_j < n_i of a d-dim space, by Pythagoras:
    (n_i - n_j) r_ij^2 = (d - n_j) r_j^2 - (d - n_i) r_i^2."""
    if not n_j < n_i <= d:
        raise ValueError(f"Nested subspaces need n_j < n_i <= d; got n_j={n_j}, n_i={n_i}, d={d}.")
    value = ((d - n_j) * r_j**2 - (d - n_i) * r_i**2) / (n_i - n_j)
    if value < 0:
        raise ValueError(
            f"Statistics are inconsistent: the larger subspace (n={n_i}) is farther from the data "
            f"than the smaller one (n={n_j}); recompute them with `{RMSD_COMMAND}`.")
    return math.sqrt(value)
