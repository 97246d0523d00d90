"""Exact likelihoods of Gaussian data through the probability-flow ODE, for every SDE.

For x_0 ~ N(mu, diag(s^2)) the ODE flow from eps to T is affine and the density at every time is
known, so the bits/dim the ODE computes has a closed form: -(log prior(z) + log p_eps(x)
- log p_T(z)) / (D ln 2) + offset, with z the exact latent.
"""
import math

import pytest
import torch
from test_sampling import SDES, GaussianScoreNet
from torch.distributions import Normal

import likelihood
from models.utils import get_score_fn

EPS = 1e-5  # likelihood integrates from 1e-5, as the reference code does


def _centered_inverse_scaler(x):
    return (x + 1.0) / 2.0


def _identity(x):
    return x


def _gaussian_case(name, batch=12, seed=0):
    make_sde, _ = SDES[name]
    sde = make_sde()
    gen = torch.Generator().manual_seed(seed)
    mu = torch.rand(1, 4, 4, generator=gen) * 0.6 + 0.2
    std = torch.rand(1, 4, 4, generator=gen) * 0.2 + 0.1
    data = mu + std * torch.randn(batch, 1, 4, 4, generator=gen)
    return sde, GaussianScoreNet(sde, mu, std), data


def _exact_bpd_and_latent(sde, net, data, offset):
    """Closed-form bits/dim the probability-flow likelihood converges to, and the latent."""
    mu, std, x = net.mu.double(), net.std.double(), data.double()
    t_eps = torch.tensor([EPS], dtype=torch.float64)
    t_T = torch.tensor([float(sde.T)], dtype=torch.float64)
    std_eps = torch.sqrt(sde.alpha(t_eps) ** 2 * std**2 + sde.sigma(t_eps) ** 2)
    std_T = torch.sqrt(sde.alpha(t_T) ** 2 * std**2 + sde.sigma(t_T) ** 2)
    z = sde.alpha(t_T) * mu + std_T / std_eps * (x - sde.alpha(t_eps) * mu)
    logp_eps = Normal(sde.alpha(t_eps) * mu, std_eps).log_prob(x).sum(dim=(1, 2, 3))
    logp_T = Normal(sde.alpha(t_T) * mu, std_T).log_prob(z).sum(dim=(1, 2, 3))
    dims = data[0].numel()
    bpd = -(sde.prior_logp(z) + logp_eps - logp_T) / math.log(2) / dims + offset
    return bpd, z


@pytest.mark.parametrize("name", list(SDES))
def test_bpd_equals_exact_gaussian_density(name):
    sde, net, data = _gaussian_case(name)
    results = {}
    for solver in ("torch", "scipy"):
        likelihood_fn = likelihood.get_likelihood_fn(sde, _identity, eps=EPS, solver=solver)
        net.calls = 0
        bpd, z, nfe = likelihood_fn(net, data)
        # One network evaluation per right-hand-side evaluation of the ODE.
        assert nfe == net.calls > 0
        assert bpd.shape == (data.shape[0],) and z.shape == data.shape
        expected_bpd, expected_z = _exact_bpd_and_latent(sde, net, data, offset=8.0)
        assert (bpd.double() - expected_bpd).abs().max() < 0.01
        scale = expected_z.abs().max()
        assert ((z.double() - expected_z).abs().max() / scale) < 1e-3
        results[solver] = (bpd, z, nfe)
    # The torch RK45 reproduces SciPy's steps.
    assert results["torch"][2] == results["scipy"][2]
    assert (results["torch"][0] - results["scipy"][0]).abs().max() < 1e-3


def test_bpd_offset_follows_the_data_scaler():
    assert likelihood.bits_per_dim_offset(_identity) == 8.0
    assert likelihood.bits_per_dim_offset(_centered_inverse_scaler) == 7.0
    with pytest.raises(ValueError, match="affine"):
        likelihood.bits_per_dim_offset(lambda x: x**2)
    sde, net, data = _gaussian_case("vp", batch=3)
    torch.manual_seed(0)
    plain = likelihood.get_likelihood_fn(sde, _identity)(net, data)[0]
    torch.manual_seed(0)
    centered = likelihood.get_likelihood_fn(sde, _centered_inverse_scaler)(net, data)[0]
    assert torch.allclose(plain - centered, torch.ones_like(plain), atol=1e-6)


def test_score_function_and_module_give_the_same_likelihood():
    sde, net, data = _gaussian_case("subvp", batch=3)
    likelihood_fn = likelihood.get_likelihood_fn(sde, _centered_inverse_scaler)
    gen = torch.Generator().manual_seed(7)
    from_module = likelihood_fn(net, data, generator=gen)
    gen = torch.Generator().manual_seed(7)
    from_score = likelihood_fn(get_score_fn(sde, net, continuous=True), data, generator=gen)
    assert torch.equal(from_module[0], from_score[0]) and from_module[2] == from_score[2]
    with pytest.raises(TypeError, match="score"):
        likelihood_fn(3.0, data)


def test_gaussian_hutchinson_is_unbiased():
    # With Rademacher noise the estimate is exact for a diagonal Jacobian; Gaussian noise is only
    # unbiased, so the error averages out over the batch.
    sde, net, data = _gaussian_case("ve", batch=64, seed=3)
    likelihood_fn = likelihood.get_likelihood_fn(sde, _identity, hutchinson_type="Gaussian")
    bpd, _, _ = likelihood_fn(net, data, generator=torch.Generator().manual_seed(0))
    error = bpd.double() - _exact_bpd_and_latent(sde, net, data, offset=8.0)[0]
    assert error.abs().max() > 0.01  # the Gaussian estimator is noisy per example ...
    assert abs(error.mean()) < 4 * error.std() / math.sqrt(len(error)) + 0.01  # ... unbiased
    with pytest.raises(ValueError, match="Rademacher"):
        likelihood.get_likelihood_fn(sde, _identity, hutchinson_type="Laplace")


class _NonlinearNet(torch.nn.Module):
    """A small nonlinear network with a dense Jacobian (conv + tanh), conditioned on its label."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, labels):
        t = labels.reshape(-1, 1, 1, 1) / 999.0
        return torch.tanh(self.conv(x) * (1 + t)) + 0.5 * x


def test_torch_and_scipy_solvers_agree_on_a_nonlinear_network():
    torch.manual_seed(0)
    sde = SDES["vp"][0]()
    net = _NonlinearNet()
    data = torch.rand(3, 2, 4, 4) * 2 - 1
    outputs = {}
    for solver in ("torch", "scipy"):
        fn = likelihood.get_likelihood_fn(sde, _centered_inverse_scaler, solver=solver)
        outputs[solver] = fn(net, data, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(outputs["torch"][0]).all()
    assert (outputs["torch"][0] - outputs["scipy"][0]).abs().max() < 1e-3
    assert (outputs["torch"][1] - outputs["scipy"][1]).abs().max() < 1e-3
    assert abs(outputs["torch"][2] - outputs["scipy"][2]) <= 6  # at most one step apart
