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
                   centered: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Lift a state of plan level `level` (>= 1) at time t to level `level - 1` (docs/maths.md 4).

    Returns x = U^Delta (y - c_Delta alpha) + sqrt(v) (z - P_Delta z), z ~ N(0, I), where v is
    the band variance of `SubspacePlan.band_variance`; t is a float or a per-example tensor.
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
    x = sl.upsample(y - plan.relative_offset(level, centered) * alpha, delta)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + std * sl.orthogonal_part(z, delta)
