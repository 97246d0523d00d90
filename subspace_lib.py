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
from dataclasses import dataclass, field
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
    "celebahq": "celebahq", "celeba": "celebahq", "celeba_hq": "celebahq",
    "celebahq_256": "celebahq",
    "church": "church", "lsun_church": "church", "church_outdoor": "church",
    "builtin": "builtin",
}

RMSD_COMMAND = "python -m analysis.rmsd --config <config> --methods downsample"


def canonical_dataset_name(name: str) -> str:
    """Canonical statistics key of a dataset name (`cifar` -> `cifar10`, ...); unknown names are
    lower-cased and kept, so user datasets work once their statistics are computed."""
    return _DATASET_ALIASES.get(name.lower(), name.lower())


# The reference scripts' `--dataset` choices (cifar, celeba, church) name the statistics of
# CIFAR-10, CelebA-HQ-256 and LSUN Church: there, `celeba` always meant CelebA-HQ.
_FLAG_DATASETS = {"celeba": "celebahq"}


def stats_name_from_flag(flag: str | None, config) -> str:
    """Statistics key for an entry script's `--dataset` value, the same in every entry point:
    the reference spellings `cifar`, `celeba` (CelebA-HQ-256) and `church`, any statistics key
    or alias, or None for the config's own dataset (`dataset_stats_name`)."""
    if flag is None or not str(flag).strip():
        return dataset_stats_name(config)
    name = str(flag).strip().lower()
    return canonical_dataset_name(_FLAG_DATASETS.get(name, name))


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
    """Set the RMSD values of `dataset` at `full_size` in the statistics file to `rmsd`.

    The entry is replaced as a whole (sizes not in `rmsd` are dropped), so one entry never mixes
    two measurements; other datasets and sizes are kept.
    """
    from files import atomic_write_text

    path = Path(path) if path is not None else DEFAULT_RMSD_PATH
    raw = json.loads(path.read_text()) if path.is_file() else {}
    raw.setdefault(canonical_dataset_name(dataset), {})[str(int(full_size))] = {
        str(int(size)): float(value) for size, value in sorted(rmsd.items(), reverse=True)}
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


# --------------------------------------------------------------------------------------------
# Nested subspace plans: which network runs at which time, and the Gaussian bands between levels.

def number_tuple(values, convert, what: str) -> tuple:
    """`values` (one number, a sequence, or a comma string as notebooks pass it) as a tuple."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (convert(values),)
    items = values.split(",") if isinstance(values, str) else list(values)
    try:
        out = tuple(convert(str(v).strip()) if isinstance(v, str) else convert(v)
                    for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ValueError(f"The {what} must be numbers; got {values!r}.") from None
    if not out:
        raise ValueError(f"No {what} given: give at least one.")
    return out


@dataclass(frozen=True)
class SubspacePlan:
    """A chain of nested downsampling subspaces with their cutoff times.

    Level 0 is the full space (side `full_size`); level j = 1..J has side `sizes[j-1]`, reached by
    `halvings[j-1]` halvings of the full image, and its network is used for
    cutoffs[j-1] < t <= cutoffs[j] (the last level up to T; a cutoff of 0 leaves the full network
    only t = 0, a cutoff of 1 never uses the level). Sizes decrease strictly and cutoffs
    increase strictly. `rmsds[j-1]` is the per-dimension RMSD r_k of the data (pixels in [0,1])
    from the full space to level j; `band_rmsds[j-1]` is the RMSD of the band between levels
    j-1 and j (docs/maths.md section 3, Pythagoras between nested subspaces).
    """

    full_size: int
    sizes: tuple[int, ...]
    cutoffs: tuple[float, ...]
    rmsds: tuple[float, ...]
    halvings: tuple[int, ...] = field(init=False)
    band_rmsds: tuple[float, ...] = field(init=False)

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        cutoffs = tuple(float(t) for t in self.cutoffs)
        rmsds = tuple(float(r) for r in self.rmsds)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "cutoffs", cutoffs)
        object.__setattr__(self, "rmsds", rmsds)
        if not sizes:
            raise ValueError("A subspace plan needs at least one subspace size.")
        if len(cutoffs) != len(sizes):
            raise ValueError(
                f"Got {len(sizes)} subspace sizes {list(sizes)} but {len(cutoffs)} cutoff times "
                f"{list(cutoffs)}: give one cutoff time per subspace size.")
        if len(rmsds) != len(sizes):
            raise ValueError(
                f"Got {len(sizes)} subspace sizes but {len(rmsds)} RMSD values: give one RMSD "
                "per subspace size.")
        previous = int(self.full_size)
        for size in sizes:
            if size >= previous:
                raise ValueError(
                    f"Subspace sizes must be nested, each strictly smaller than the previous one "
                    f"(starting from the full size {self.full_size}); got {list(sizes)}.")
            num_halvings(previous, size)  # raises unless size = previous / 2^m
            previous = size
        halvings = tuple(num_halvings(self.full_size, size) for size in sizes)
        for t in cutoffs:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"Cutoff times must lie in [0, 1]; got {list(cutoffs)}.")
        if any(b <= a for a, b in zip(cutoffs, cutoffs[1:])):
            raise ValueError(
                f"Cutoff times must increase strictly with decreasing subspace size; got "
                f"{list(cutoffs)} for sizes {list(sizes)}.")
        for r in rmsds:
            if not (math.isfinite(r) and r > 0):
                raise ValueError(f"RMSD statistics must be positive and finite; got {list(rmsds)}.")
        d = self.full_size**2
        bands, n_prev, r_prev = [], d, 0.0
        for size, r in zip(sizes, rmsds):
            bands.append(between_level_rmsd(d, n_prev, r_prev, size**2, r))
            n_prev, r_prev = size**2, r
        object.__setattr__(self, "halvings", halvings)
        object.__setattr__(self, "band_rmsds", tuple(bands))

    @classmethod
    def from_statistics(cls, full_size: int, sizes, cutoffs, dataset: str,
                        stats_path: str | os.PathLike | None = None) -> SubspacePlan:
        """A plan whose RMSDs come from the statistics file (assets/subspace_rmsd.json).

        `sizes` and `cutoffs` are sequences of numbers (entry scripts parse their flags with
        `cli`); a comma string such as "16,8" is accepted too, for notebooks.
        """
        sizes = number_tuple(sizes, int, "subspace sizes")
        cutoffs = number_tuple(cutoffs, float, "cutoff times")
        rmsds = tuple(dataset_rmsd(dataset, full_size, s, stats_path) for s in sizes)
        return cls(full_size, sizes, cutoffs, rmsds)

    @property
    def num_levels(self) -> int:
        """Number J of subspace levels (the full space not counted)."""
        return len(self.sizes)

    def _check_level(self, level: int, allow_full: bool = True) -> None:
        low = 0 if allow_full else 1
        if not low <= level <= self.num_levels:
            raise ValueError(f"Level {level} is outside {low}..{self.num_levels} for this plan.")

    def size_of(self, level: int) -> int:
        """Image side at `level` (0 = full space)."""
        self._check_level(level)
        return self.full_size if level == 0 else self.sizes[level - 1]

    def halvings_of(self, level: int) -> int:
        """Halvings k from the full space to `level` (0 for the full space)."""
        self._check_level(level)
        return 0 if level == 0 else self.halvings[level - 1]

    def relative_halvings(self, level: int) -> int:
        """Halvings from level `level - 1` to `level` (level >= 1)."""
        self._check_level(level, allow_full=False)
        return self.halvings_of(level) - self.halvings_of(level - 1)

    def offset(self, level: int, centered: bool) -> float:
        """c_k of `level`: its network sees D^k x + c_k alpha(t) for a full-space state x."""
        return scaler_offset_factor(self.halvings_of(level), centered)

    def relative_offset(self, level: int, centered: bool) -> float:
        """c_Delta with y_level = D^Delta y_{level-1} + c_Delta alpha(t) in network coordinates.

        From c_k = -b (2^k - 1) and D^Delta of a constant image c being 2^Delta c:
        c_{k_j} - 2^Delta c_{k_{j-1}} = -b (2^Delta - 1) = c_Delta.
        """
        return scaler_offset_factor(self.relative_halvings(level), centered)

    def band_variance(self, sde, t: torch.Tensor, level: int, centered: bool) -> torch.Tensor:
        """Per-dimension variance alpha(t)^2 (a r_band)^2 + sigma(t)^2 of the band between levels
        `level - 1` and `level` of x_t, the data being isotropic there with RMSD r_band."""
        self._check_level(level, allow_full=False)
        a, _ = scaler_coefficients(centered)
        r = a * self.band_rmsds[level - 1]
        return sde.alpha(t) ** 2 * r**2 + sde.sigma(t) ** 2

    def level_for_time(self, t: float) -> int:
        """Level whose network handles time t: the number of cutoffs strictly below t (a time
        exactly at a cutoff belongs to the larger model)."""
        return sum(1 for c in self.cutoffs if t > c)

    def windows(self, T: float = 1.0) -> list[tuple[int, float, float]]:
        """Sampling stages (level, start, end) from T down to 0, deepest level first; a level
        whose window is empty (cutoff at T) is left out."""
        bounds = (0.0,) + self.cutoffs + (T,)
        stages = [(level, bounds[level + 1], bounds[level])
                  for level in range(self.num_levels, -1, -1)]
        return [stage for stage in stages if stage[1] > stage[2]]

    def describe(self) -> str:
        """One line such as `32 (t <= 0.5) | 16 (0.5 < t <= 0.6) | 8 (t > 0.6)`."""
        parts = [f"{self.full_size} (t <= {self.cutoffs[0]:g})"]
        for j, size in enumerate(self.sizes):
            upper = f" <= {self.cutoffs[j + 1]:g}" if j + 1 < self.num_levels else ""
            lower = f"{self.cutoffs[j]:g} < t" if upper else f"t > {self.cutoffs[j]:g}"
            parts.append(f"{size} ({lower}{upper})")
        return " | ".join(parts)
