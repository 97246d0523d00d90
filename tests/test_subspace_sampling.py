"""Subspace sampling and likelihood on Gaussian data with exact networks (closed form).

The data's deepest-subspace coordinates are N(m, s^2) and each band is isotropic, so exact
networks are known at every level (see test_subspace_closed_form.py). SDE subspace sampling (with
upsampling and conditional Langevin) and ODE sampling through the implicit score must reproduce
the data's mean and variance in the subspace and in every band; the likelihood through the
implicit score must equal the exact log-density.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_subspace_closed_form import CHANNELS, SIZE, NestedGaussianData

import likelihood
import sampling
import sde_lib
import subspace_lib as sl
from models.utils import get_score_fn
from subspace_sampling import (
    conditional_langevin,
    format_stage_reports,
    stage_boundaries,
    subspace_pc_sample,
)

SETUPS = {
    # name: (sde factory, centered, predictor, corrector, snr, eps)
    "ve": (lambda n: sde_lib.VESDE(0.01, 50, n), False, "reverse_diffusion", "langevin", 0.16,
           1e-5),
    "subvp": (lambda n: sde_lib.subVPSDE(0.1, 20, n), True, "euler_maruyama", "none", 0.16, 1e-3),
}
PLANS = {
    "one_level": dict(halvings=(1,), rhos=(0.1,), s=0.2, cutoffs=(0.4,)),
    "two_levels": dict(halvings=(1, 2), rhos=(0.1, 0.15), s=0.25, cutoffs=(0.3, 0.6)),
}


def make_data(plan_name: str, centered: bool) -> NestedGaussianData:
    spec = PLANS[plan_name]
    return NestedGaussianData(spec["halvings"], spec["rhos"], spec["s"], centered, seed=4)


def assert_matches_data(samples: torch.Tensor, data: NestedGaussianData, rel_var: float,
                        what: str) -> None:
    """Mean and variance of the deepest coordinates and of every band against the data's."""
    x = samples.double()
    batch = x.shape[0]
    deepest = data.halvings[-1]
    coords = sl.downsample(x, deepest).reshape(batch, -1)
    mean_u = data.mean_u.reshape(CHANNELS, SIZE, SIZE)
    expected_mean = sl.downsample(data.a * mean_u + data.b, deepest).reshape(-1)
    s = data.a * data.s
    error = coords.mean(0) - expected_mean
    assert error.abs().max() <= 5 * s / math.sqrt(batch) + 0.02 * s, f"{what}: subspace mean"
    # A shift common to all coordinates (a wrong scaler offset) shows in their average.
    assert error.mean().abs() <= 4 * s / math.sqrt(error.numel() * batch) + 0.01 * s, \
        f"{what}: subspace mean, common shift"
    variance = float(coords.var(0).mean())
    assert variance == pytest.approx(s**2, rel=rel_var), f"{what}: subspace variance"
    previous = x
    for i, k in enumerate(data.halvings):
        projected = sl.project(x, k)
        band = previous - projected
        dims = band[0].numel() * (4.0 ** -([0] + list(data.halvings))[i] - 4.0**-k)
        band_var = float(band.pow(2).sum() / (batch * dims))
        target = (data.a * data.rhos[i]) ** 2
        assert band_var == pytest.approx(target, rel=rel_var), f"{what}: band {i + 1} variance"
        assert float(band.mean(0).abs().max()) <= 6 * math.sqrt(target / batch), \
            f"{what}: band {i + 1} mean"
        previous = projected


@pytest.mark.parametrize("sde_name", list(SETUPS))
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_subspace_sde_sampling_reproduces_data(sde_name, plan_name):
    make_sde, centered, predictor, corrector, snr, eps = SETUPS[sde_name]
    sde = make_sde(200)
    data = make_data(plan_name, centered)
    networks = [data.level_net(sde, j) for j in range(len(data.halvings) + 1)]
    plan = data.plan(PLANS[plan_name]["cutoffs"])
    torch.manual_seed(0)
    batch = 1000
    deepest = plan.size_of(plan.num_levels)
    prior = sde.prior_sampling((batch, CHANNELS, deepest, deepest)).double()
    samples, reports = subspace_pc_sample(
        networks, sde, plan, centered, (batch, CHANNELS, SIZE, SIZE), eps=eps,
        predictor=predictor, corrector=corrector, snr=snr, langevin_snr=0.16, langevin_steps=2,
        x=prior, device="cpu")
    assert samples.shape == (batch, CHANNELS, SIZE, SIZE)
    assert [r.level for r in reports] == list(range(plan.num_levels, -1, -1))
    assert sum(r.steps for r in reports) == sde.N
    assert_matches_data(samples, data, rel_var=0.06, what=f"SDE {sde_name} {plan_name}")
    assert "total" in format_stage_reports(reports)


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_subspace_coordinates_follow_the_full_sampler(plan_name):
    # The data's bands are independent, so the exact networks agree on the subspace part of
    # the score, and a deterministic (probability-flow) subspace sampler must reproduce the
    # full sampler's subspace coordinates from the projected prior, at any N. Integrating a
    # state that carries the data-scaler offset c_k alpha(t), as the reference did, missed by
    # up to 0.03 here (the offset grows faster than an Euler step follows).
    sde = sde_lib.subVPSDE(0.1, 20, 20)
    eps = 1e-3
    data = make_data(plan_name, centered=True)
    networks = [data.level_net(sde, j) for j in range(len(data.halvings) + 1)]
    plan = data.plan(PLANS[plan_name]["cutoffs"])
    deepest = data.halvings[-1]
    torch.manual_seed(3)
    prior = sde.prior_sampling((16, CHANNELS, SIZE, SIZE)).double()
    common = dict(predictor="euler_maruyama", corrector="none", snr=0.16, probability_flow=True)
    full_score = get_score_fn(sde, networks[0], train=False, continuous=True)
    full, _, _ = sampling.pc_sample_window(full_score, sde, prior, sde.T, eps, sde.N,
                                           denoise=True, progress=False, eps=eps, **common)
    sub, _ = subspace_pc_sample(networks, sde, plan, True, tuple(prior.shape), eps=eps,
                                langevin_steps=2, x=sl.downsample(prior, deepest), device="cpu",
                                **common)
    torch.testing.assert_close(sl.downsample(sub, deepest), sl.downsample(full, deepest),
                               rtol=0, atol=1e-6)


def test_common_noise_couples_the_subspace_sampler_to_the_full_one():
    # The same exact networks, now stochastic: with common random numbers the subspace sampler
    # receives the subspace part of the full sampler's increments and prior, so the two agree
    # on the subspace coordinates; without them they are independent samples.
    sde = sde_lib.subVPSDE(0.1, 20, 20)
    eps = 1e-3
    data = make_data("two_levels", centered=True)
    networks = [data.level_net(sde, j) for j in range(len(data.halvings) + 1)]
    plan = data.plan(PLANS["two_levels"]["cutoffs"])
    deepest = data.halvings[-1]
    shape = (16, CHANNELS, SIZE, SIZE)
    common = dict(predictor="euler_maruyama", corrector="none", snr=0.16)
    full_score = get_score_fn(sde, networks[0], train=False, continuous=True)

    def full_sample(noise):
        x, _, _ = sampling.pc_sample_window(full_score, sde, noise.prior(), sde.T, eps, sde.N,
                                            denoise=True, progress=False, eps=eps, noise=noise,
                                            **common)
        return x

    def subspace_sample(noise):
        x, _ = subspace_pc_sample(networks, sde, plan, True, shape, eps=eps, langevin_steps=2,
                                  x=noise.prior(deepest), device="cpu", noise=noise, **common)
        return sl.downsample(x, deepest)

    full = sl.downsample(full_sample(sampling.CommonNoise(5, shape)), deepest)
    torch.testing.assert_close(subspace_sample(sampling.CommonNoise(5, shape)), full, rtol=0,
                               atol=1e-6)
    other = subspace_sample(sampling.CommonNoise(6, shape))
    assert (other - full).abs().mean() > 0.1 * data.a * data.s
    with pytest.raises(ValueError, match="give the full sampler's batch shape"):
        sampling.CommonNoise(5, (8, CHANNELS, SIZE, SIZE))(torch.zeros(shape), torch.ones(16))


@pytest.mark.parametrize("sde_name", list(SETUPS))
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_ode_sampling_through_implicit_score_reproduces_data(sde_name, plan_name):
    make_sde, centered, _, _, _, eps = SETUPS[sde_name]
    sde = make_sde(1000)
    data = make_data(plan_name, centered)
    model = data.subspace_score(sde, PLANS[plan_name]["cutoffs"])
    torch.manual_seed(1)
    batch = 500
    sampler = sampling.get_ode_sampler(sde, (batch, CHANNELS, SIZE, SIZE), lambda x: x,
                                       denoise=False, eps=eps, device="cpu", solver="torch")
    samples, nfe = sampler(model)
    assert nfe == model.nfe_full + sum(model.nfe_subspace)
    assert model.nfe_full > 0 and all(n > 0 for n in model.nfe_subspace)
    assert_matches_data(samples, data, rel_var=0.05, what=f"ODE {sde_name} {plan_name}")


@pytest.mark.parametrize("sde_name", list(SETUPS))
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_likelihood_through_implicit_score_is_exact(sde_name, plan_name):
    make_sde, centered, _, _, _, eps = SETUPS[sde_name]
    sde = make_sde(1000)
    data = make_data(plan_name, centered)
    model = data.subspace_score(sde, PLANS[plan_name]["cutoffs"])
    gen = torch.Generator().manual_seed(2)
    batch = 256  # Hutchinson noise: about 0.05 bits/dim per example, 0.003 on the mean
    mean_x = data.a * data.mean_u + data.b
    cov_x = data.a**2 * data.cov_u
    chol = torch.linalg.cholesky(cov_x + 1e-12 * torch.eye(cov_x.shape[0], dtype=torch.float64))
    x0 = mean_x + torch.randn(batch, cov_x.shape[0], generator=gen, dtype=torch.float64) @ chol.T
    x0 = x0.reshape(batch, CHANNELS, SIZE, SIZE)
    inverse_scaler = (lambda x: (x + 1) / 2) if centered else (lambda x: x)
    likelihood_fn = likelihood.get_likelihood_fn(sde, inverse_scaler, eps=eps,
                                                 hutchinson_type="Rademacher")
    bpd, _, _ = likelihood_fn(model, x0, generator=gen)

    # Exact: x0 treated as a state at time eps, density N(alpha mu, alpha^2 Sigma + sigma^2 I).
    t = torch.tensor(eps, dtype=torch.float64)
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    cov_t = alpha**2 * cov_x + sigma**2 * torch.eye(cov_x.shape[0], dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(alpha * mean_x, covariance_matrix=cov_t)
    logp = exact.log_prob(x0.reshape(batch, -1))
    d = cov_x.shape[0]
    exact_bpd = -logp / (d * math.log(2)) + likelihood.bits_per_dim_offset(inverse_scaler)
    assert float((bpd.double() - exact_bpd).mean().abs()) <= 0.01, (bpd, exact_bpd)


@pytest.mark.parametrize("sde_name", list(SETUPS))
def test_conditional_langevin_moves_only_the_new_band(sde_name):
    make_sde, centered, *_ = SETUPS[sde_name]
    sde = make_sde(1000)
    data = make_data("one_level", centered)
    score_fn = get_score_fn(sde, data.level_net(sde, 0), train=False, continuous=True)
    x = torch.randn(8, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    t = torch.full((8,), 0.4)
    moved, _ = conditional_langevin(score_fn, sde, x, t, 0.2, 3, remove_halvings=1)
    torch.testing.assert_close(sl.downsample(moved, 1), sl.downsample(x, 1), rtol=0, atol=1e-12)
    assert (sl.orthogonal_part(moved - x, 1)).abs().max() > 1e-3
    free, _ = conditional_langevin(score_fn, sde, x, t, 0.2, 3, remove_halvings=None)
    assert (sl.downsample(free - x, 1)).abs().max() > 1e-3


@pytest.mark.parametrize("corrector,per_step", [("none", 1), ("langevin", 2)])
def test_full_network_evaluations_match_the_plan(corrector, per_step):
    sde = sde_lib.VESDE(0.01, 50, 50)
    data = make_data("one_level", False)
    networks = [data.level_net(sde, j) for j in range(2)]
    eps, cutoff = 1e-5, 0.5
    plan = data.plan((cutoff,))
    samples, reports = subspace_pc_sample(
        networks, sde, plan, False, (4, CHANNELS, SIZE, SIZE), eps=eps,
        predictor="reverse_diffusion", corrector=corrector, snr=0.16, langevin_steps=2,
        device="cpu")
    full_steps = round(50 * (cutoff - eps) / (1 - eps))
    assert reports[-1].steps == full_steps and reports[0].steps == 50 - full_steps
    assert networks[0].calls == per_step * full_steps + 2 == reports[-1].nfe
    assert networks[1].calls == per_step * (50 - full_steps) == reports[0].nfe
    assert reports[-1].langevin_nfe == 2 and reports[0].langevin_nfe == 0


def test_legacy_langevin_feeds_the_raw_network_the_time():
    sde = sde_lib.subVPSDE(0.1, 20, 20)
    data = make_data("one_level", True)
    networks = [data.level_net(sde, j) for j in range(2)]
    seen = []
    original = networks[0].forward

    def spy(x, labels):
        seen.append(float(labels[0]))
        return original(x, labels)

    networks[0].forward = spy
    subspace_pc_sample(networks, sde, data.plan((0.5,)), True, (2, CHANNELS, SIZE, SIZE),
                       eps=1e-3, predictor="euler_maruyama", corrector="none", snr=0.16,
                       langevin_steps=1, legacy_langevin=True, device="cpu")
    # First full-network call is the Langevin step: the label is t itself, not 999 t.
    assert seen[0] < 1.0 and seen[1] > 1.0


def test_stage_boundaries_and_errors():
    plan = sl.SubspacePlan(32, (16, 8), (0.5, 0.6), (0.075, 0.11))
    assert stage_boundaries(plan, 1.0, 1e-3) == [(2, 1.0, 0.6), (1, 0.6, 0.5), (0, 0.5, 1e-3)]
    with pytest.raises(ValueError, match="must exceed the sampler's final time"):
        stage_boundaries(sl.SubspacePlan(32, (16,), (1e-4,), (0.075,)), 1.0, 1e-3)
    with pytest.raises(ValueError, match="Give 3 networks"):
        subspace_pc_sample([None, None], sde_lib.VESDE(), plan, False, (1, 3, 32, 32), eps=1e-5,
                           predictor="reverse_diffusion", corrector="none", snr=0.16)
