"""The exact score of an empirical distribution (`mixture_score`) and the solvers on it.

A non-Gaussian model with a known answer: the diffused mixture's score is checked against the
gradient of its log-density, and every few-step solver must end on the training images with each
image drawn about equally often (see bench/diagnose_ode.py for the same check at 32x32).
"""
import math

import pytest
import torch

import sampling
import sde_lib
from mixture_score import EmpiricalScoreNet, nearest_image_distances
from models.utils import get_score_fn

SDES = {"ve": (lambda: sde_lib.VESDE(0.01, 50), 1e-5), "vp": (lambda: sde_lib.VPSDE(), 1e-3),
        "subvp": (lambda: sde_lib.subVPSDE(), 1e-3)}


def _images(count=4, shape=(1, 4, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count,) + shape, generator=generator, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize("name", list(SDES))
def test_score_is_the_gradient_of_the_mixture_log_density(name):
    sde = SDES[name][0]()
    images = _images()
    net = EmpiricalScoreNet(sde, images)
    score_fn = get_score_fn(sde, net, continuous=True)
    t = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    alpha = sde.alpha(t).reshape(-1, 1, 1, 1, 1)
    sigma = sde.sigma(t).reshape(-1, 1, 1, 1, 1)
    squared = ((x[:, None] - alpha * images[None]) ** 2).flatten(2).sum(2)
    log_p = torch.logsumexp(-squared / (2 * sigma.flatten(1) ** 2), dim=1).sum()
    (gradient,) = torch.autograd.grad(log_p, x)
    torch.testing.assert_close(score_fn(x.detach(), t), gradient, rtol=1e-9, atol=1e-9)
    # At a tiny noise level the data prediction is the nearest image itself.
    near = images[[2, 0, 3]] + 1e-4 * torch.randn(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(net.posterior_mean(near, torch.full((3,), 1e-4)), images[[2, 0, 3]])


def test_bad_images_are_one_sentence():
    with pytest.raises(ValueError, match=r"^EmpiricalScoreNet needs images shaped \[K, C, H, W\]"):
        EmpiricalScoreNet(sde_lib.VPSDE(), torch.zeros(4, 16))


@pytest.mark.parametrize("solver,steps", [("heun", 18), ("dpm_solver", 20),
                                          ("sde_dpm_solver", 35), ("ddim", 50)])
def test_solvers_land_on_the_images_in_equal_shares(solver, steps):
    sde, eps = SDES["subvp"][0](), SDES["subvp"][1]
    images = _images()
    net = EmpiricalScoreNet(sde, images)
    torch.manual_seed(0)
    batch = 400
    sampler = sampling.get_solver_sampler(solver, sde, (batch, 1, 4, 4), lambda x: x,
                                          steps=steps, eps=eps, device="cpu", progress=False)
    samples, _ = sampler(net)
    distance, index = nearest_image_distances(samples, images)
    assert distance.max() < 1e-3, distance.max()
    # Without the final data prediction the state at eps is alpha x_i + sigma(eps) z: its
    # distance to the nearest image is of order sigma(eps), not of the images' spacing (~0.6).
    torch.manual_seed(0)
    sampler = sampling.get_solver_sampler(solver, sde, (batch, 1, 4, 4), lambda x: x,
                                          steps=steps, eps=eps, denoise=False, device="cpu",
                                          progress=False)
    state, _ = sampler(net)
    t_eps = torch.tensor(eps, dtype=torch.float64)
    residual, _ = nearest_image_distances(state / sde.alpha(t_eps), images)
    assert residual.median() < 3 * float(sde.sigma(t_eps)), (residual.median(), sde.sigma(t_eps))
    shares = torch.bincount(index, minlength=len(images)).double() / batch
    # Each image has probability 1/4; 4.5 binomial standard deviations either side.
    assert (shares - 0.25).abs().max() < 4.5 * math.sqrt(0.25 * 0.75 / batch), shares
