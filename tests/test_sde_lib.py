"""SDE coefficients and label conversion: closed forms and invariants of sde_lib."""
import math

import ml_collections
import pytest
import torch

import sde_lib


def _sdes():
    return [sde_lib.VESDE(0.01, 50, 1000), sde_lib.VPSDE(0.1, 20, 1000),
            sde_lib.subVPSDE(0.1, 20, 1000)]


@pytest.mark.parametrize("sde", _sdes(), ids=lambda s: type(s).__name__)
def test_marginal_std_matches_integrated_sde(sde):
    """The marginal variance solves dVar/dt = -beta Var + g^2 (VP family) or d sigma^2/dt = g^2."""
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-5
    x = torch.zeros(len(t), 1, 1, 1, dtype=torch.float64)
    var = lambda s: sde.sigma(s) ** 2  # noqa: E731
    dvar = (var(t + h) - var(t - h)) / (2 * h)
    _, g = sde.sde(x, t)
    if isinstance(sde, sde_lib.VESDE):
        expected = g**2
    else:
        expected = -sde.beta(t) * var(t) + g**2
    torch.testing.assert_close(dvar, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("sde", _sdes(), ids=lambda s: type(s).__name__)
def test_alpha_solves_drift(sde):
    """d log alpha / dt equals the linear drift coefficient f(x, t) / x."""
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    h = 1e-5
    dlog_alpha = (torch.log(sde.alpha(t + h)) - torch.log(sde.alpha(t - h))) / (2 * h)
    x = torch.ones(len(t), 1, 1, 1, dtype=torch.float64)
    drift, _ = sde.sde(x, t)
    torch.testing.assert_close(dlog_alpha, drift.flatten(), rtol=1e-5, atol=1e-8)


def test_closed_forms():
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    ve = sde_lib.VESDE(0.01, 50)
    torch.testing.assert_close(ve.sigma(t), 0.01 * 5000**t)
    vp, subvp = sde_lib.VPSDE(0.1, 20), sde_lib.subVPSDE(0.1, 20)
    B = 0.1 * t + (20 - 0.1) * t**2 / 2
    torch.testing.assert_close(vp.alpha(t), torch.exp(-B / 2))
    torch.testing.assert_close(vp.sigma(t), torch.sqrt(1 - torch.exp(-B)))
    torch.testing.assert_close(subvp.sigma(t), 1 - torch.exp(-B))


@pytest.mark.parametrize("sde", _sdes(), ids=lambda s: type(s).__name__)
def test_label_round_trip(sde):
    t = torch.tensor([1e-3, 0.25, 0.5, 0.999])
    torch.testing.assert_close(sde.label_to_time(sde.time_to_label(t)), t, rtol=1e-5, atol=1e-6)


def test_discrete_labels():
    ve = sde_lib.VESDE(0.01, 50, 1000)
    assert ve.time_to_label(torch.tensor([1.0, 0.0]), continuous=False).tolist() == [0, 999]
    vp = sde_lib.VPSDE(0.1, 20, 1000)
    torch.testing.assert_close(vp.time_to_label(torch.tensor([1.0]), continuous=False),
                               torch.tensor([999.0]))


def test_prior_logp_is_gaussian_density():
    z = torch.randn(3, 2, 4, 4)
    ve = sde_lib.VESDE(0.01, 50)
    expected = torch.distributions.Normal(0.0, 50.0).log_prob(z).sum(dim=(1, 2, 3))
    torch.testing.assert_close(ve.prior_logp(z), expected, rtol=1e-5, atol=1e-3)
    vp = sde_lib.VPSDE()
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=(1, 2, 3))
    torch.testing.assert_close(vp.prior_logp(z), expected, rtol=1e-5, atol=1e-4)


def test_reverse_probability_flow_halves_score_term():
    sde = sde_lib.VPSDE()
    x = torch.randn(2, 1, 2, 2)
    t = torch.full((2,), 0.4)
    score = lambda x, t: -x  # noqa: E731
    drift_sde, g_sde = sde.reverse(score).sde(x, t)
    drift_ode, g_ode = sde.reverse(score, probability_flow=True).sde(x, t)
    forward_drift, g = sde.sde(x, t)
    g2 = (g**2).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(drift_sde, forward_drift + g2 * x)
    torch.testing.assert_close(drift_ode, forward_drift + 0.5 * g2 * x)
    assert torch.all(g_ode == 0) and torch.equal(g_sde, g)


def test_get_sde_names_and_error():
    config = ml_collections.ConfigDict({
        "training": {"sde": "subvpsde"},
        "model": {"beta_min": 0.1, "beta_max": 20.0, "num_scales": 10,
                  "sigma_min": 0.01, "sigma_max": 50.0}})
    sde, eps = sde_lib.get_sde(config)
    assert isinstance(sde, sde_lib.subVPSDE) and sde.N == 10 and math.isclose(eps, 1e-3)
    config.training.sde = "nope"
    with pytest.raises(ValueError, match="Unknown SDE 'nope'"):
        sde_lib.get_sde(config)
