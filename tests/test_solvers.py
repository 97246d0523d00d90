"""Few-step probability-flow solvers on Gaussian data, whose exact score and ODE flow are known.

Data N(mu, s^2) diffuses to N(alpha mu, alpha^2 s^2 + sigma^2), so the exact ODE solution from a
prior sample is an affine map (`_exact_flow`) and each solver's error can be measured without
sampling noise: against the same prior sample pushed through the exact flow.
"""
import math

import pytest
import torch
from test_sampling import SDES, GaussianScoreNet, _exact_flow

import sampling
import sde_lib
import solvers
from models.utils import get_score_fn

MU, STD = 0.3, 0.15
SHAPE = (256, 1, 2, 2)
# The deterministic solvers of the probability-flow ODE (sde_dpm_solver has its own tests).
SOLVERS = [name for name in solvers.SOLVERS if name != "sde_dpm_solver"]


def _setup(name, mu=MU, std=STD):
    make_sde, eps = SDES[name]
    sde = make_sde()
    net = GaussianScoreNet(sde, mu, std)
    return sde, eps, net, get_score_fn(sde, net, continuous=True)


def _exact_samples(net, sde, score_fn, x_T, eps):
    """The exact flow from T to eps followed by the exact data prediction (the denoising)."""
    x = _exact_flow(net, x_T, 1.0, eps)
    t = torch.full((x.shape[0],), eps, dtype=torch.float64)
    alpha, sigma = sde.alpha(t[:1]), sde.sigma(t[:1])
    return (x + sigma**2 * score_fn(x, t)) / alpha


# ------------------------------------------------------------------------------------------------
# Time discretisations


@pytest.mark.parametrize("name", list(SDES))
def test_log_snr_inverse_and_monotone(name):
    sde = SDES[name][0]()
    t = torch.linspace(1e-5, 1.0, 101, dtype=torch.float64)
    lam = sde.log_snr(t)
    assert (lam[1:] < lam[:-1]).all()
    torch.testing.assert_close(lam, torch.log(sde.alpha(t) / sde.sigma(t)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sde.log_snr_to_time(lam), t, rtol=0, atol=1e-12)


def test_schedules_follow_their_definitions():
    sde = sde_lib.VESDE(0.01, 50)
    t_end, steps, rho = 1e-5, 9, 7.0
    s_max, s_min = 50.0, float(sde.sigma(torch.tensor(t_end, dtype=torch.float64)))
    edm = solvers.solver_timesteps(sde, 1.0, t_end, steps, "edm", rho)
    i = torch.arange(steps + 1, dtype=torch.float64)
    expected = (s_max ** (1 / rho) + i / steps * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    torch.testing.assert_close(sde.sigma(edm), expected, rtol=1e-12, atol=0)  # Karras eq. 5
    torch.testing.assert_close(solvers.solver_timesteps(sde, 1.0, t_end, steps, "uniform"),
                               torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64))
    vp = sde_lib.VPSDE()
    grid = solvers.solver_timesteps(vp, 1.0, 1e-3, steps, "logsnr")
    lam = vp.log_snr(grid)
    torch.testing.assert_close(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(steps), rtol=1e-10,
                               atol=0)
    assert grid[0] == 1.0 and grid[-1] == 1e-3


@pytest.mark.parametrize("schedule", solvers.SCHEDULES)
def test_a_window_of_a_grid_is_the_grid_of_that_window(schedule):
    sde = sde_lib.subVPSDE()
    full = solvers.solver_timesteps(sde, 1.0, 1e-3, 20, schedule)
    part = solvers.solver_timesteps(sde, float(full[5]), float(full[12]), 7, schedule)
    torch.testing.assert_close(part, full[5:13], rtol=1e-10, atol=1e-12)


def test_bad_schedules_and_grids_are_one_sentence():
    sde = sde_lib.VPSDE()
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="^Unknown time schedule 'cosine': choose one of uniform, "
                                         "edm, logsnr.$"):
        solvers.heun(lambda x, t: x, sde, x, 1.0, 0.1, 4, "cosine")
    with pytest.raises(ValueError, match="needs 5 times; got 3"):
        solvers.ddim(lambda x, t: x, sde, x, 1.0, 0.1, 4, torch.tensor([1.0, 0.5, 0.1]))
    with pytest.raises(ValueError, match="backwards in time"):
        solvers.solver_timesteps(sde, 0.1, 1.0, 4)
    with pytest.raises(ValueError, match="^Unknown ODE solver 'euler'"):
        solvers.get_solver("euler")
    with pytest.raises(ValueError, match="at least 2 for heun with noise_removal; got 1"):
        solvers.full_steps("heun", 1, True)


# ------------------------------------------------------------------------------------------------
# Accuracy on Gaussian data


# (solver, steps at about 35 evaluations, steps at about 100, tolerance at about 100): Heun and
# DPM-Solver++(2M) are second order; DDIM is first order, its error at 100 evaluations is 2-4 %.
BUDGETS = {"heun": (18, 50, 0.015), "dpm_solver": (35, 100, 0.01), "ddim": (35, 100, 0.04)}


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_reproduces_gaussian_moments(name, solver):
    sde, eps, net, score_fn = _setup(name)
    torch.manual_seed(0)
    x_T = sde.prior_sampling(SHAPE).double()
    exact = _exact_samples(net, sde, score_fn, x_T, eps)
    few, many, tolerance = BUDGETS[solver]
    for steps, rel in ((few, 0.15), (many, tolerance)):
        net.calls = 0
        sampler = sampling.get_solver_sampler(solver, sde, SHAPE, lambda x: x, steps=steps,
                                              eps=eps, device="cpu", progress=False)
        samples, nfe = sampler(net, z=x_T)
        assert nfe == net.calls == (2 * steps - 1 if solver == "heun" else steps)
        assert abs(samples.std() / exact.std() - 1) < rel, (steps, samples.std(), exact.std())
        assert abs(samples.mean() - exact.mean()) < 0.01 * MU
    # The data's own moments, within sampling error (1024 values) and the tolerance.
    n = samples.numel()
    assert abs(samples.mean().item() - MU) < 4 * STD / math.sqrt(n)
    assert abs(samples.std().item() / STD - 1) < 4 / math.sqrt(2 * n) + tolerance


def test_heun_matches_the_edm_reference_numbers():
    # EDM Heun, rho = 7, VE sigma 50 -> 0.01, data std 0.15: 5.6 % off at 35 evaluations and
    # 0.7 % at 99 (the reference values; sampling noise removed here).
    sde, eps, net, score_fn = _setup("ve")
    torch.manual_seed(0)
    x_T = sde.prior_sampling((2000, 1, 2, 2)).double()
    exact = _exact_samples(net, sde, score_fn, x_T, eps)
    errors = {}
    for steps in (18, 50):
        sampler = sampling.get_solver_sampler("heun", sde, x_T.shape, lambda x: x, steps=steps,
                                              eps=eps, device="cpu", progress=False)
        samples, nfe = sampler(net, z=x_T)
        errors[nfe] = float(samples.std() / exact.std() - 1)
    assert errors[35] == pytest.approx(0.056, abs=0.004)
    assert errors[99] == pytest.approx(0.007, abs=0.002)


ORDERS = {"heun": 2.0, "dpm_solver": 2.0, "ddim": 1.0}


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("solver", SOLVERS)
def test_error_decreases_at_the_solvers_order(name, solver):
    sde, eps, net, score_fn = _setup(name)
    torch.manual_seed(1)
    x_T = sde.prior_sampling((16, 1, 2, 2)).double()
    exact = _exact_flow(net, x_T, 1.0, eps)
    errors = []
    for steps in (16, 32, 64, 128):
        x, _ = solvers.solve(solver, score_fn, sde, x_T, 1.0, eps, steps)
        errors.append(float((x - exact).abs().max()))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    order = ORDERS[solver]
    assert all(order - 0.45 < o < order + 0.6 for o in orders), orders
    assert abs(orders[-1] - order) < 0.15, orders


def test_ddim_step_and_heun_euler_half_follow_their_formulas():
    sde, eps, net, score_fn = _setup("vp")
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    t, s = 0.6, 0.4
    vec = torch.full((3,), t, dtype=torch.float64)
    a_t, s_t = float(sde.alpha(vec[0])), float(sde.sigma(vec[0]))
    a_s, s_s = (float(v) for v in (sde.alpha(torch.tensor(s)), sde.sigma(torch.tensor(s))))
    eps_hat = -s_t * score_fn(x, vec)
    x0 = (x - s_t * eps_hat) / a_t
    got, nfe = solvers.ddim(score_fn, sde, x, t, s, 1)
    torch.testing.assert_close(got, a_s * x0 + s_s * eps_hat, rtol=1e-6, atol=1e-6)
    # DDIM is the Euler step of the scaled state x / alpha in sigma / alpha (Karras et al. 2022).
    euler = a_s * (x / a_t + (s_s / a_s - s_t / a_t) * eps_hat)
    torch.testing.assert_close(got, euler, rtol=1e-6, atol=1e-6)
    first = []
    solvers.dpm_solver(score_fn, sde, x, t, s, 1, callback=lambda info: first.append(info["x"]))
    torch.testing.assert_close(first[0], got, rtol=1e-6, atol=1e-6)  # DPM-Solver++ step 1 = DDIM


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_stochastic_variants_reproduce_gaussian(name):
    sde, eps, net, score_fn = _setup(name)
    torch.manual_seed(3)
    x_T = sde.prior_sampling((1000, 1, 2, 2)).double()
    n = x_T.numel()
    for solver, options in (("ddim", {"eta": 1.0}), ("heun", {"churn": 20.0})):
        steps = 200 if solver == "ddim" else 50
        x, _ = solvers.solve(solver, score_fn, sde, x_T, 1.0, eps, steps, denoise=True, **options)
        deterministic, _ = solvers.solve(solver, score_fn, sde, x_T, 1.0, eps, steps,
                                         denoise=True)
        assert (x - deterministic).abs().max() > 1e-2
        assert abs(x.mean().item() - MU) < 4 * STD / math.sqrt(n) + 0.002
        assert abs(x.std().item() / STD - 1) < 4 / math.sqrt(2 * n) + 0.02, (solver, x.std())


@pytest.mark.parametrize("name", list(SDES))
def test_sde_dpm_solver_reproduces_gaussian_moments(name):
    # SDE-DPM-Solver++(2M): 50 000 one-value samples (sampling error of the std about 0.3 %).
    # Measured std errors at 20 / 50 / 100 evaluations: VE +2.4 / -0.2 / +0.1 %, VP +2.8 / -0.1
    # / +0.1 %, sub-VP +5.6 / +1.5 / +0.3 %; first-order DDIM with eta = 1 is 19-28 / 9-13 /
    # 4-7 % off at the same budgets.
    sde, eps, net, score_fn = _setup(name)
    errors = {}
    for evals in (20, 50, 100):
        torch.manual_seed(0)
        x_T = sde.prior_sampling((50_000, 1, 1, 1)).double()
        sampler = sampling.get_solver_sampler("sde_dpm_solver", sde, x_T.shape, lambda x: x,
                                              steps=evals, eps=eps, device="cpu",
                                              progress=False)
        net.calls = 0
        x, nfe = sampler(net, z=x_T)
        assert nfe == net.calls == evals
        assert abs(x.mean().item() - MU) < 0.01 * MU
        errors[evals] = abs(x.std().item() / STD - 1)
    assert errors[50] < 0.025 and errors[100] < 0.01, errors
    assert errors[100] < errors[20] and errors[50] < errors[20], errors


def test_sde_dpm_solver_first_step_is_ancestral_ddim_and_noise_matters():
    sde, eps, net, score_fn = _setup("subvp")
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    torch.manual_seed(5)
    ddim, _ = solvers.ddim(score_fn, sde, x, 0.6, 0.4, 1, eta=1.0)
    torch.manual_seed(5)
    sde_step, nfe = solvers.sde_dpm_solver(score_fn, sde, x, 0.6, 0.4, 1)
    torch.testing.assert_close(sde_step, ddim, rtol=1e-6, atol=1e-6)
    assert nfe == 1
    # The second step uses the history: it differs from two first-order (DDIM) steps.
    torch.manual_seed(5)
    two, _ = solvers.sde_dpm_solver(score_fn, sde, x, 0.6, 0.2, 2)
    torch.manual_seed(5)
    first, _ = solvers.ddim(score_fn, sde, x, 0.6, 0.4, 1, eta=1.0)
    first, _ = solvers.ddim(score_fn, sde, first, 0.4, 0.2, 1, eta=1.0)
    assert (two - first).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("solver,options", [("heun", {}), ("heun", {"churn": 5.0}),
                                            ("dpm_solver", {}), ("sde_dpm_solver", {}),
                                            ("ddim", {}), ("ddim", {"eta": 0.5})])
def test_windowed_run_equals_unsplit_run(solver, options):
    sde, eps, net, score_fn = _setup("subvp")
    x_T = sde.prior_sampling((4, 1, 2, 2))
    grid = solvers.solver_timesteps(sde, 1.0, eps, 12, "edm")
    torch.manual_seed(7)
    carry = {} if solver in ("dpm_solver", "sde_dpm_solver") else None
    extra = {"carry": carry} if carry is not None else {}
    full, nfe = solvers.solve(solver, score_fn, sde, x_T, 1.0, eps, 12, grid, **options)
    torch.manual_seed(7)
    cut = float(grid[5])
    x, nfe_1 = solvers.solve(solver, score_fn, sde, x_T, 1.0, cut, 5, grid[:6], **options, **extra)
    x, nfe_2 = solvers.solve(solver, score_fn, sde, x, cut, eps, 7, grid[5:], **options, **extra)
    assert torch.equal(x, full)
    assert nfe_1 + nfe_2 == nfe
    if carry is not None:  # without the carried history the second window restarts
        torch.manual_seed(7)
        y, _ = solvers.solve(solver, score_fn, sde, x_T, 1.0, cut, 5, grid[:6])
        y, _ = solvers.solve(solver, score_fn, sde, y, cut, eps, 7, grid[5:])
        assert not torch.equal(y, full)


def test_get_sampling_fn_dispatches_the_solvers():
    import ml_collections
    config = ml_collections.ConfigDict({
        "device": "cpu",
        "training": {"continuous": True},
        "sampling": {"method": "heun", "noise_removal": True, "steps": 6, "schedule": None,
                     "churn": 0.0, "eta": 0.0},
    })
    sde = sde_lib.VPSDE(N=1000)
    net = GaussianScoreNet(sde, MU, STD)
    for method, expected in (("heun", 11), ("dpm_solver", 6), ("sde_dpm_solver", 6),
                             ("ddim", 6)):
        config.sampling.method = method
        net.calls = 0
        samples, nfe = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda x: x, 1e-3,
                                                progress=False)(net)
        assert samples.shape == (2, 1, 4, 4) and nfe == expected == net.calls
    config.sampling.update(method="dpm_solver", noise_removal=False, steps=None)
    _, nfe = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda x: x, 1e-3,
                                      progress=False)(net)
    assert nfe == solvers.DEFAULT_STEPS["dpm_solver"]
    config.sampling.method = "euler"
    with pytest.raises(ValueError, match="'heun', 'dpm_solver', 'sde_dpm_solver' or 'ddim'"):
        sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda x: x, 1e-3)
