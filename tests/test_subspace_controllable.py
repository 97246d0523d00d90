"""Inpainting and colorization through the implicit subspace score, on Gaussian data (closed form).

With the mask on the right half of 8x8 images, no 2x2 block straddles the mask edge, so the known
and unknown halves of the Gaussian data are independent and the replacement method samples the
unknown half exactly from its marginal; likewise for the two colour channels orthogonal to grey.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_subspace_closed_form import SIZE, NestedGaussianData

import controllable_generation as cg
import sde_lib
import subspace_lib as sl

SETUPS = {
    "ve": (lambda: sde_lib.VESDE(0.01, 50, 100), False, "reverse_diffusion", "langevin", 1e-5),
    "subvp": (lambda: sde_lib.subVPSDE(0.1, 20, 100), True, "euler_maruyama", "none", 1e-3),
}


def draw(data: NestedGaussianData, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Samples of the (scaled) data x = a u + b."""
    mean = data.a * data.mean_u + data.b
    cov = data.a**2 * data.cov_u
    chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(cov.shape[0], dtype=torch.float64))
    x = mean + torch.randn(batch, cov.shape[0], generator=gen, dtype=torch.float64) @ chol.T
    return x.reshape(batch, data.channels, SIZE, SIZE)


def assert_statistics(generated: torch.Tensor, reference: torch.Tensor, data, what: str) -> None:
    """Subspace coordinates and the orthogonal band of `generated` against the data's law:
    mean per coordinate (against the mean of `reference` samples) and pooled variances."""
    batch = generated.shape[0]
    s2, r2 = (data.a * data.s) ** 2, (data.a * data.rhos[0]) ** 2
    coords, ref_coords = sl.downsample(generated, 1), sl.downsample(reference, 1)
    tolerance = 5 * math.sqrt(s2 / batch) * math.sqrt(2)
    assert (coords.mean(0) - ref_coords.mean(0)).abs().max() <= tolerance, f"{what}: mean"
    assert float(coords.var(0).mean()) == pytest.approx(s2, rel=0.08), f"{what}: subspace var"
    band = sl.orthogonal_part(generated, 1)
    assert float(band.pow(2).mean()) * 4 / 3 == pytest.approx(r2, rel=0.08), f"{what}: band var"


@pytest.mark.parametrize("sde_name", list(SETUPS))
def test_inpainting_with_implicit_score(sde_name):
    make_sde, centered, predictor, corrector, eps = SETUPS[sde_name]
    sde = make_sde()
    data = NestedGaussianData((1,), (0.1,), 0.2, centered, seed=5)
    model = data.subspace_score(sde, (0.4,))
    gen = torch.Generator().manual_seed(0)
    batch = 400
    truth = draw(data, batch, gen)
    mask = torch.ones_like(truth)
    mask[..., SIZE // 2:] = 0
    inpainter = cg.get_pc_inpainter(sde, predictor, corrector, lambda x: x, snr=0.16,
                                    continuous=True, eps=eps)
    torch.manual_seed(1)
    out = inpainter(model, truth, mask)
    alpha_eps = float(sde.alpha(torch.tensor(eps, dtype=torch.float64)))
    torch.testing.assert_close(out[..., :SIZE // 2], alpha_eps * truth[..., :SIZE // 2],
                               rtol=0, atol=1e-6)
    assert model.nfe_full > 0 and model.nfe_subspace[0] > 0
    other = draw(data, batch, gen)
    assert_statistics(out[..., SIZE // 2:], other[..., SIZE // 2:], data, sde_name)


def test_colorization_with_implicit_score():
    make_sde, centered, predictor, corrector, eps = SETUPS["ve"]
    sde = make_sde()
    data = NestedGaussianData((1,), (0.1,), 0.2, centered, seed=6, channels=3)
    model = data.subspace_score(sde, (0.4,))
    gen = torch.Generator().manual_seed(2)
    batch = 400
    truth = draw(data, batch, gen)
    grey = truth.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    colorizer = cg.get_pc_colorizer(sde, predictor, corrector, lambda x: x, snr=0.16,
                                    continuous=True, eps=eps)
    torch.manual_seed(3)
    out = colorizer(model, grey)
    basis = cg._colour_basis("cpu").double()

    def decouple(x):
        return torch.einsum("bihw,ij->bjhw", x, basis)

    torch.testing.assert_close(decouple(out)[:, 0], decouple(truth)[:, 0], rtol=0, atol=1e-5)
    other = draw(data, batch, gen)
    assert_statistics(decouple(out)[:, 1:], decouple(other)[:, 1:], data, "colour")


def test_colour_basis_is_orthonormal_with_grey_first():
    basis = cg._colour_basis("cpu").double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(basis[:, 0], torch.full((3,), 3**-0.5, dtype=torch.float64))


def test_inpainter_rejects_a_mask_of_another_size():
    sde = sde_lib.VESDE(0.01, 50, 10)
    inpainter = cg.get_pc_inpainter(sde, "reverse_diffusion", "none", lambda x: x, snr=0.16)
    with pytest.raises(ValueError, match="does not fit"):
        inpainter(None, torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 4, 4))
