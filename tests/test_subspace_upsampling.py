"""Upsampling at a cutoff: subspace part kept exactly, band noise with the right variance."""
import pytest
import torch

import sde_lib
import subspace_lib as sl
from upsampling import upsample_level

CASES = [
    ("ve", sde_lib.VESDE(0.01, 50, 1000), False),
    ("subvp", sde_lib.subVPSDE(0.1, 20, 1000), True),
    ("vp", sde_lib.VPSDE(0.1, 20, 1000), True),
]


@pytest.mark.parametrize("name,sde,centered", CASES)
@pytest.mark.parametrize("level", [1, 2])
def test_upsampling_keeps_subspace_and_adds_band_noise(name, sde, centered, level):
    plan = sl.SubspacePlan(32, (16, 4), (0.4, 0.6), (0.075, 0.13))
    t = 0.6 if level == 2 else 0.4
    size = plan.size_of(level)
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(48, 3, size, size, generator=gen, dtype=torch.float64)
    x = upsample_level(y, sde, t, plan, level, centered, generator=gen)
    assert x.shape == (48, 3, plan.size_of(level - 1), plan.size_of(level - 1))

    delta = plan.relative_halvings(level)
    tt = torch.tensor(t, dtype=torch.float64)
    alpha = float(sde.alpha(tt))
    # The subspace part is exactly the level-`level` state, offset removed.
    torch.testing.assert_close(sl.downsample(x, delta) + plan.relative_offset(level, centered)
                               * alpha, y, rtol=0, atol=1e-12)
    # The band noise has per-dimension variance alpha^2 (a r_band)^2 + sigma^2.
    a, _ = sl.scaler_coefficients(centered)
    v = alpha**2 * (a * plan.band_rmsds[level - 1]) ** 2 + float(sde.sigma(tt)) ** 2
    noise = sl.orthogonal_part(x, delta)
    band_dims = noise[0].numel() * (1 - 4.0**-delta)
    variance = float(noise.pow(2).sum() / (noise.shape[0] * band_dims))
    assert variance == pytest.approx(v, rel=0.03)
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.03 * v**0.5)


def test_upsampling_256_base_resolution():
    sde = sde_lib.VESDE(0.01, 348, 2000)
    plan = sl.SubspacePlan.from_statistics(256, (128, 64), (0.5, 0.55), "church")
    y = torch.randn(2, 3, 64, 64)
    x = upsample_level(upsample_level(y, sde, 0.55, plan, 2, False), sde, 0.5, plan, 1, False)
    assert x.shape == (2, 3, 256, 256)
    torch.testing.assert_close(sl.downsample(x, 2), y, rtol=0, atol=1e-5)
    noise = sl.orthogonal_part(x, 2)
    v_expected = (plan.band_variance(sde, torch.tensor(0.5), 1, False) * 3 / 4
                  + plan.band_variance(sde, torch.tensor(0.55), 2, False) * 3 / 16) / (15 / 16)
    assert float(noise.pow(2).mean()) * 16 / 15 == pytest.approx(float(v_expected), rel=0.02)


def test_upsampling_generator_reproducible_and_per_example_time():
    sde, plan = sde_lib.subVPSDE(), sl.SubspacePlan(16, (8,), (0.5,), (0.1,))
    y = torch.randn(2, 3, 8, 8)
    first = upsample_level(y, sde, 0.5, plan, 1, True, generator=torch.Generator().manual_seed(5))
    again = upsample_level(y, sde, 0.5, plan, 1, True, generator=torch.Generator().manual_seed(5))
    other = upsample_level(y, sde, 0.5, plan, 1, True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    per_example = upsample_level(y, sde, torch.tensor([0.5, 0.5]), plan, 1, True,
                                 generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(per_example, first)


def test_upsampling_input_errors():
    sde, plan = sde_lib.VESDE(), sl.SubspacePlan(16, (8,), (0.5,), (0.1,))
    with pytest.raises(ValueError, match="subspace level in 1..1"):
        upsample_level(torch.zeros(1, 3, 8, 8), sde, 0.5, plan, 0, False)
    with pytest.raises(ValueError, match="must be 8x8 images"):
        upsample_level(torch.zeros(1, 3, 4, 4), sde, 0.5, plan, 1, False)
