"""Band-split denoising errors and the Gaussian DC yardstick, on cases with known answers."""
import math

import pytest
import torch

import sde_lib
from analysis import bands


def test_band_parts_are_orthogonal_and_sum_to_the_image():
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    parts = bands.band_parts(x)
    assert bands.band_names(8) == ["8-4", "4-2", "2-1", "DC"]
    assert bands.band_dims(8, 3) == [144, 36, 9, 3]
    torch.testing.assert_close(sum(parts), x)
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert abs(float((parts[i] * parts[j]).sum())) < 1e-9
    # The DC part is the per-channel mean; its orthonormal coordinate is mean * side.
    torch.testing.assert_close(parts[-1], x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    torch.testing.assert_close(bands.dc_coordinates(x), x.mean(dim=(2, 3)) * 8)


def test_exact_score_of_gaussian_data_attains_the_gaussian_error_in_every_band():
    """x_0 ~ N(0, s^2 I): the exact score gives E r^2 = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)
    per coordinate in every band, which is also the Gaussian DC yardstick; the DC gain is
    sigma / (alpha^2 s^2 + sigma^2) on the diagonal."""
    sde = sde_lib.subVPSDE(0.1, 20.0, 100)
    s = 0.8
    torch.manual_seed(0)
    images = [s * torch.randn(256, 3, 8, 8) for _ in range(4)]

    def exact_score(x, t):
        alpha, sigma = sde.alpha(t).reshape(-1, 1, 1, 1), sde.sigma(t).reshape(-1, 1, 1, 1)
        return -x / (alpha**2 * s**2 + sigma**2)

    times = (0.2, 0.5, 1.0)
    result = bands.band_errors(exact_score, sde, images, times, scaler=lambda x: x, seed=1)
    assert result["images"] == 1024
    for i, t in enumerate(times):
        tt = torch.tensor(t, dtype=torch.float64)
        a2s2, sig2 = float(sde.alpha(tt)) ** 2 * s**2, float(sde.sigma(tt)) ** 2
        expected = a2s2 / (a2s2 + sig2)
        for name, dim in zip(result["bands"], result["dims"]):
            # Chi-square noise of the mean over `dim` x 1024 coordinates (DC: 3 x 1024).
            tol = 5 * expected * math.sqrt(2 / (dim * 1024))
            assert result["error"][name][i] == pytest.approx(expected, abs=tol), (name, t)
        assert result["gaussian_dc"][i] == pytest.approx(expected, rel=0.15, abs=1e-3)
        gain = torch.tensor(result["dc_gain"][i], dtype=torch.float64)
        ideal = float(sde.sigma(tt)) / (a2s2 + sig2)
        torch.testing.assert_close(gain, ideal * torch.eye(3, dtype=torch.float64), atol=2e-3,
                                   rtol=2e-3)
        gaussian_gain = torch.tensor(result["gaussian_dc_gain"][i], dtype=torch.float64)
        torch.testing.assert_close(gaussian_gain.diag(),
                                   torch.full((3,), ideal, dtype=torch.float64), rtol=0.15,
                                   atol=1e-3)
    table = bands.format_band_table(result, "exact")
    assert table.splitlines()[1].startswith("| t | 8-4 (144) | 4-2 (36) | 2-1 (9) | DC (3) |")


def test_a_network_that_predicts_nothing_has_unit_error():
    sde = sde_lib.VPSDE(0.1, 20.0, 100)
    images = [torch.rand(64, 3, 4, 4)]
    result = bands.band_errors(lambda x, t: torch.zeros_like(x), sde, images, (0.5,),
                               scaler=lambda x: 2 * x - 1)
    for name in result["bands"]:
        assert result["error"][name][0] == pytest.approx(1.0, abs=0.3)
    assert result["dc_gain"][0] == [[0.0] * 3] * 3


def test_bad_times_are_refused():
    sde = sde_lib.VPSDE(0.1, 20.0, 100)
    with pytest.raises(ValueError, match=r"Times must lie in \(0, 1\]"):
        bands.band_errors(lambda x, t: x, sde, [torch.rand(2, 3, 4, 4)], (0.0,), lambda x: x)
