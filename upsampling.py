"""Upsampling: the reverse of a projection at a cutoff time (docs/maths.md section 4).

At the cutoff t_c between plan levels j-1 and j, a state y_j of the level-j network is lifted to
the coordinates of level j-1 by undoing the data-scaler offset and embedding,
U^Delta (y_j - c_Delta alpha(t_c)), and the missing band is filled with Gaussian noise restricted
to the orthogonal complement, per-dimension variance alpha(t_c)^2 (a r_band)^2 + sigma(t_c)^2.
"""
from __future__ import annotations

import torch

import sde_lib
import subspace_lib as sl


def _as_batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """Time as a float64 tensor of shape [B] on x's device."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(-1)


def upsample_level(y: torch.Tensor, sde: sde_lib.SDE, t, plan: sl.SubspacePlan, level: int,
                   centered: bool, generator: torch.Generator | None = None,
                   offset: float | None = None) -> torch.Tensor:
    """Lift a state of plan level `level` (>= 1) at time t to level `level - 1` (docs/maths.md 4).

    Returns x = U^Delta (y - c_Delta alpha) + sqrt(v) (z - P_Delta z), z ~ N(0, I), where v is
    the band variance of `SubspacePlan.band_variance`; t is a float or a per-example tensor.
    `offset` replaces the data-scaler offset factor c_Delta (`SubspacePlan.relative_offset`).
    """
    if level < 1 or level > plan.num_levels:
        raise ValueError(f"Upsampling needs a subspace level in 1..{plan.num_levels}; got {level}.")
    size = plan.size_of(level)
    if y.shape[-1] != size or y.shape[-2] != size:
        raise ValueError(
            f"A level-{level} state must be {size}x{size} images; got shape {tuple(y.shape)}.")
    delta = plan.relative_halvings(level)
    t = _as_batch_time(t, y)
    shape = (-1,) + (1,) * (y.dim() - 1)
    alpha = sde.alpha(t).to(y.dtype).reshape(shape)
    std = plan.band_variance(sde, t, level, centered).sqrt().to(y.dtype).reshape(shape)
    if offset is None:
        offset = plan.relative_offset(level, centered)
    x = sl.upsample(y - offset * alpha, delta)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + std * sl.orthogonal_part(z, delta)


# ------------------------------------------------------------------------------------------------
# The reference code's names, for scripts and notebooks written for it.

# Its dataset spellings and the full sizes of the statistics it tabulated.
_REFERENCE_DATASETS = {"cifar": 32, "celeba": 256, "church": 256}


def reference_stds(path=None) -> dict[str, dict[int, float]]:
    """The reference's `stds` table {cifar|celeba|church: {subspace size: RMSD}} (per-dimension
    RMSD of the data to each downsampling subspace, Jing et al. 2022, Table 1), read from the
    statistics file (assets/subspace_rmsd.json by default)."""
    table = sl.load_rmsd_table(path)
    stds = {}
    for name, full in _REFERENCE_DATASETS.items():
        key = sl.stats_name_from_flag(name, None)
        if full in table.get(key, {}):
            stds[name] = dict(table[key][full])
    return stds


def __getattr__(name: str):
    # `upsampling.stds` is read from the statistics file on first use, not at import.
    if name == "stds":
        return reference_stds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _full_size_for(key: str, size: int, table: dict) -> int:
    fulls = [full for full, subs in table.get(key, {}).items() if size in subs]
    if len(fulls) != 1:
        found = "no" if not fulls else f"several ({sorted(fulls)})"
        raise KeyError(f"The statistics file has {found} full image size with a {size}x{size} "
                       f"RMSD for dataset '{key}': compute it with `{sl.RMSD_COMMAND}` or pass "
                       "full_size.")
    return fulls[0]


def upsampling_fn(x: torch.Tensor, alpha, sigma, dataset: str,
                  full_size: int | None = None) -> torch.Tensor:
    """The reference's `upsampling_fn(x, alpha, sigma, dataset)`: lift subspace states x (side s,
    data-scaler offset already removed) to the dataset's full size, U^k x + (z - P_k z) with
    z ~ N(0, (sigma^2 + alpha^2 r_k^2) I) and r_k the dataset's RMSD for size s (Jing et al.
    2022, Sec. 4.1). As in the reference, alpha includes the data-scaler factor (2 alpha for data
    in [-1, 1]). The full size comes from the statistics file (32 for cifar, 256 for celeba and
    church; the reference assumed 32 for every dataset, so it never upsampled 256x256 data).
    `upsample_level` is the plan-based form.
    """
    key = sl.stats_name_from_flag(dataset, None)
    size = int(x.shape[-1])
    table = sl.load_rmsd_table()
    full = _full_size_for(key, size, table) if full_size is None else int(full_size)
    k = sl.num_halvings(full, size)
    r = sl.dataset_rmsd(key, full, size)
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    std = torch.sqrt(sigma**2 + alpha**2 * r**2)
    up = sl.upsample(x, k)
    if std.numel() == 1:
        noise = torch.normal(mean=0.0, std=float(std), size=up.shape, device=x.device,
                             dtype=x.dtype)
    else:
        shape = (-1,) + (1,) * (x.dim() - 1)
        noise = torch.randn_like(up) * std.to(x.device, x.dtype).reshape(shape)
    return up + sl.orthogonal_part(noise, k)
