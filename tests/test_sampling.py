"""Samplers on Gaussian data, whose diffused score is known exactly for every SDE.

Data x_0 ~ N(mu, diag(s^2)) diffuses to x_t ~ N(alpha(t) mu, alpha(t)^2 s^2 + sigma(t)^2), so a
"network" can return the exact score; every sampler must then reproduce the data statistics, and
the probability-flow ODE is the affine map between the marginals.
"""
import math

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import integrate

import sampling
import sde_lib
from models.utils import get_score_fn

SDES = {
    "ve": (lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50, N=1000), 1e-5),
    "vp": (lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20, N=1000), 1e-3),
    "subvp": (lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20, N=1000), 1e-3),
}


class GaussianScoreNet(nn.Module):
    """Exact score of N(mu, diag(std^2)) data diffused by `sde`, in the network convention:
    VE returns the score, VP/sub-VP return -sigma(t) * score; labels map back to t through
    sde.label_to_time (continuous models)."""

    def __init__(self, sde, mu, std):
        super().__init__()
        self.sde = sde
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.calls = 0

    def marginal(self, t):
        """Mean and std of x_t, shaped [B, 1, 1, 1] + the data shape."""
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        alpha, sigma = self.sde.alpha(t), self.sde.sigma(t)
        return alpha * self.mu, torch.sqrt(alpha**2 * self.std**2 + sigma**2)

    def forward(self, x, labels):
        self.calls += 1
        t = self.sde.label_to_time(labels)
        mean, std = self.marginal(t)
        score = -(x - mean) / std**2
        if isinstance(self.sde, sde_lib.VESDE):
            return score
        return -self.sde.sigma(t).reshape(-1, 1, 1, 1) * score


def _identity(x):
    return x


MU, STD = 0.3, 0.2
SHAPE = (400, 1, 4, 4)  # 6400 values


def _check_moments(samples, mu=MU, std=STD, slack=0.005):
    """Mean and std of all values within 4 standard errors (plus `slack` for discretisation)."""
    n = samples.numel()
    assert abs(samples.mean().item() - mu) < 4 * std / math.sqrt(n) + slack
    assert abs(samples.std().item() - std) < 4 * std / math.sqrt(2 * n) + slack


PC_CASES = [
    (name, predictor, corrector)
    for name in SDES
    for predictor, corrector in [("reverse_diffusion", "langevin"), ("euler_maruyama", "none"),
                                 ("ancestral_sampling", "none")]
    if not (name == "subvp" and predictor == "ancestral_sampling")
]


@pytest.mark.parametrize("name,predictor,corrector", PC_CASES)
def test_pc_sampler_reproduces_gaussian(name, predictor, corrector):
    make_sde, eps = SDES[name]
    sde = make_sde()
    net = GaussianScoreNet(sde, MU, STD)
    torch.manual_seed(0)
    sampler = sampling.get_pc_sampler(sde, SHAPE, sampling.get_predictor(predictor),
                                      sampling.get_corrector(corrector), _identity, snr=0.16,
                                      continuous=True, eps=eps, device="cpu", progress=False)
    samples, nfe = sampler(net)
    assert samples.shape == SHAPE
    _check_moments(samples)
    expected_nfe = sde.N * (2 if corrector == "langevin" else 1)
    assert nfe == expected_nfe == net.calls


def test_corrector_steps_and_names_count_evaluations():
    sde = sde_lib.VPSDE(N=50)
    net = GaussianScoreNet(sde, MU, STD)
    score_fn = get_score_fn(sde, net, continuous=True)
    x = sde.prior_sampling((8, 1, 4, 4))
    for predictor, corrector, per_step in [("reverse_diffusion", "langevin", 3),
                                           (None, "ald", 2), ("euler_maruyama", None, 1),
                                           (sampling.NonePredictor, sampling.NoneCorrector, 0)]:
        _, _, nfe = sampling.pc_sample_window(score_fn, sde, x, 1.0, 1e-3, 50, predictor,
                                              corrector, snr=0.16, n_steps_each=2,
                                              progress=False)
        assert nfe == 50 * per_step



def test_single_steps_follow_their_formulas():
    sde = sde_lib.VPSDE(N=100)
    net = GaussianScoreNet(sde, MU, STD)
    score_fn = get_score_fn(sde, net, continuous=True)
    x = torch.randn(3, 1, 4, 4)
    t = torch.full((3,), 0.42)
    score = score_fn(x, t)
    alpha = 1 - sde.discrete_betas[int(0.42 * 99)]  # alpha_i = 1 - beta_i at i = floor(t (N-1))

    torch.manual_seed(0)
    got, got_mean = sampling.LangevinCorrector(sde, score_fn, snr=0.2, n_steps=1).update_fn(x, t)
    torch.manual_seed(0)
    z = torch.randn_like(x)
    ratio = z.flatten(1).norm(dim=1).mean() / score.flatten(1).norm(dim=1).mean()
    step = 2 * alpha * (0.2 * ratio) ** 2
    assert torch.allclose(got_mean, x + step * score)
    assert torch.allclose(got, x + step * score + torch.sqrt(2 * step) * z)

    torch.manual_seed(0)
    got, got_mean = sampling.AnnealedLangevinDynamics(sde, score_fn, 0.2, 1).update_fn(x, t)
    step = 2 * alpha * (0.2 * sde.sigma(t[:1])) ** 2
    assert torch.allclose(got_mean, x + step * score)

    torch.manual_seed(0)
    got, got_mean = sampling.EulerMaruyamaPredictor(sde, score_fn).update_fn(x, t)
    torch.manual_seed(0)
    z = torch.randn_like(x)
    beta = sde.beta(t[:1])
    expected_mean = x - (-0.5 * beta * x - beta * score) / sde.N
    assert torch.allclose(got_mean, expected_mean, atol=1e-6)
    assert torch.allclose(got, expected_mean + torch.sqrt(beta / sde.N) * z, atol=1e-6)

    torch.manual_seed(0)
    got, got_mean = sampling.AncestralSamplingPredictor(sde, score_fn).update_fn(x, t)
    torch.manual_seed(0)
    beta_i = sde.discrete_betas[int(0.42 * 99)]
    expected_mean = (x + beta_i * score) / torch.sqrt(1 - beta_i)
    assert torch.allclose(got_mean, expected_mean)
    assert torch.allclose(got, expected_mean + torch.sqrt(beta_i) * torch.randn_like(x))

def test_ancestral_rejects_subvp_and_probability_flow():
    sde = sde_lib.subVPSDE()
    with pytest.raises(NotImplementedError, match="reverse_diffusion"):
        sampling.AncestralSamplingPredictor(sde, lambda x, t: x)
    with pytest.raises(ValueError, match="probability-flow"):
        sampling.AncestralSamplingPredictor(sde_lib.VPSDE(), lambda x, t: x, True)


def test_registries_and_unknown_names():
    assert sampling.get_predictor("reverse_diffusion") is sampling.ReverseDiffusionPredictor
    assert sampling.get_predictor("ancestral_sampling") is sampling.AncestralSamplingPredictor
    assert sampling.get_predictor("euler_maruyama") is sampling.EulerMaruyamaPredictor
    assert sampling.get_predictor("none") is sampling.NonePredictor
    assert sampling.get_corrector("langevin") is sampling.LangevinCorrector
    assert sampling.get_corrector("ald") is sampling.AnnealedLangevinDynamics
    assert sampling.get_corrector("none") is sampling.NoneCorrector
    with pytest.raises(ValueError, match="Unknown predictor 'heun'.*reverse_diffusion"):
        sampling.get_predictor("heun")
    with pytest.raises(ValueError, match="Unknown corrector"):
        sampling.get_corrector("hmc")
    with pytest.raises(ValueError, match="already registered"):
        sampling.register_predictor(type("Other", (sampling.NonePredictor,), {}), name="none")


def test_shared_update_fns_match_predictor_objects():
    sde = sde_lib.VESDE()
    net = GaussianScoreNet(sde, MU, STD)
    x = sde.prior_sampling((4, 1, 4, 4))
    t = torch.full((4,), 0.4)
    torch.manual_seed(3)
    shared = sampling.shared_predictor_update_fn(x, t, sde, net, sampling.ReverseDiffusionPredictor,
                                                 False, True)
    torch.manual_seed(3)
    direct = sampling.ReverseDiffusionPredictor(sde, get_score_fn(sde, net, continuous=True)
                                                ).update_fn(x, t)
    assert all(torch.equal(a, b) for a, b in zip(shared, direct))
    torch.manual_seed(4)
    shared = sampling.shared_corrector_update_fn(x, t, sde, net, sampling.LangevinCorrector, True,
                                                 0.16, 1)
    torch.manual_seed(4)
    direct = sampling.LangevinCorrector(sde, get_score_fn(sde, net, continuous=True), 0.16, 1
                                        ).update_fn(x, t)
    assert all(torch.equal(a, b) for a, b in zip(shared, direct))


# ------------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize("N", [1, 7, 10, 99, 100, 1000, 2000])
@pytest.mark.parametrize("boundaries", [[1.0, 0.5, 1e-3], [1.0, 0.7, 0.3, 1e-5],
                                        [1.0, 0.999, 0.5, 0.1, 0.0101, 1e-3],
                                        [1.0, 0.43, 0.29, 0.0]])
def test_window_step_counts_add_up_to_N(N, boundaries):
    counts = sampling.window_step_counts(N, boundaries)
    assert sum(counts) == N
    assert all(c >= 0 for c in counts)
    assert len(counts) == len(boundaries) - 1


def test_window_step_counts_values_and_truncation_loss():
    # position of 0.5 = round(1000 * 0.499 / 0.999) = round(499.4995) = 499
    assert sampling.window_step_counts(1000, [1.0, 0.5, 1e-3]) == [501, 499]
    assert sampling.window_step_counts(10, [1.0, 0.26, 0.0]) == [7, 3]
    # The reference's int(N * (start - end)) loses steps here; rounding positions does not.
    for boundaries, expected in [([1.0, 0.9, 0.0], [100, 900]),
                                 ([1.0, 0.67, 0.33, 0.0], [330, 340, 330])]:
        truncated = [int(1000 * (a - b)) for a, b in zip(boundaries[:-1], boundaries[1:])]
        assert sum(truncated) < 1000
        assert sampling.window_step_counts(1000, boundaries) == expected
        assert sampling.window_step_counts(1000, boundaries, T=1.0, eps=0.0) == expected


def test_window_step_counts_rejects_bad_boundaries():
    with pytest.raises(ValueError, match="strictly decreasing"):
        sampling.window_step_counts(10, [1.0, 0.2, 0.5, 0.0])
    with pytest.raises(ValueError, match="start at T"):
        sampling.window_step_counts(10, [0.9, 0.5, 0.0], T=1.0)
    with pytest.raises(ValueError, match="at least two"):
        sampling.window_step_counts(10, [1.0])


def test_window_timesteps_tile_the_full_grid():
    N, T, eps = 1000, 1.0, 1e-5
    boundaries = [T, 0.73, 0.5, 0.2, eps]
    counts = sampling.window_step_counts(N, boundaries)
    pieces = [sampling.window_timesteps(N, a, b, n, T, eps)
              for a, b, n in zip(boundaries[:-1], boundaries[1:], counts)]
    assert torch.equal(torch.cat(pieces), torch.linspace(T, eps, N))
    assert torch.equal(sampling.window_timesteps(N, 0.5, 0.2, 7), torch.linspace(0.5, 0.2, 7))
    with pytest.raises(ValueError, match="window_step_counts"):
        sampling.window_timesteps(N, 0.73, 0.5, counts[1] + 1, T, eps)
    with pytest.raises(ValueError, match="backwards"):
        sampling.window_timesteps(N, 0.2, 0.5, 3)


@pytest.mark.parametrize("name", list(SDES))
def test_windowed_pc_equals_full_run(name):
    make_sde, eps = SDES[name]
    sde = make_sde()
    sde.N = 200
    net = GaussianScoreNet(sde, MU, STD)
    score_fn = get_score_fn(sde, net, continuous=True)
    args = ("reverse_diffusion", "langevin", 0.16)

    torch.manual_seed(1)
    x = sde.prior_sampling((16, 1, 4, 4))
    full, full_mean, full_nfe = sampling.pc_sample_window(score_fn, sde, x, 1.0, eps, sde.N, *args,
                                                          progress=False, eps=eps)
    torch.manual_seed(1)
    x = sde.prior_sampling((16, 1, 4, 4))
    counts = sampling.window_step_counts(sde.N, [1.0, 0.5, eps])
    x, _, nfe_1 = sampling.pc_sample_window(score_fn, sde, x, 1.0, 0.5, counts[0], *args,
                                            progress=False, eps=eps)
    x, x_mean, nfe_2 = sampling.pc_sample_window(score_fn, sde, x, 0.5, eps, counts[1], *args,
                                                 progress=False, eps=eps)
    assert torch.equal(x, full) and torch.equal(x_mean, full_mean)
    assert nfe_1 + nfe_2 == full_nfe == 2 * sde.N


def test_pc_window_callback_sees_every_update_and_can_replace_the_state():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50, N=10)
    net = GaussianScoreNet(sde, MU, STD)
    score_fn = get_score_fn(sde, net, continuous=True)
    args = ("reverse_diffusion", "langevin", 0.16)
    x_T = sde.prior_sampling((4, 1, 4, 4))
    seen = []

    def observe(x, x_mean, t):  # returns None: the state goes on unchanged
        seen.append(float(t[0]))

    torch.manual_seed(2)
    plain = sampling.pc_sample_window(score_fn, sde, x_T, 1.0, 1e-5, 10, *args, progress=False)
    torch.manual_seed(2)
    observed = sampling.pc_sample_window(score_fn, sde, x_T, 1.0, 1e-5, 10, *args,
                                         progress=False, callback=observe)
    assert torch.equal(plain[0], observed[0]) and plain[2] == observed[2] == 20
    grid = torch.linspace(1.0, 1e-5, 10).tolist()
    assert seen == [t for t in grid for _ in range(2)]  # after the corrector, after the predictor

    # A replacing callback: the known half of the state is pinned to zero after every update.
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:] = 1

    def pin(x, x_mean, t):
        return x * (1 - mask), x_mean * (1 - mask)

    x, x_mean, _ = sampling.pc_sample_window(score_fn, sde, x_T, 1.0, 1e-5, 10, *args,
                                             progress=False, callback=pin)
    assert torch.all(x[..., 2:] == 0) and torch.all(x_mean[..., 2:] == 0)
    assert torch.all(x[..., :2] != 0)


def test_pc_sampler_denoise_and_start_state():
    sde = sde_lib.VPSDE(N=20)
    net = GaussianScoreNet(sde, MU, STD)
    x_T = sde.prior_sampling((8, 1, 4, 4))
    outputs = {}
    for denoise in (False, True):
        torch.manual_seed(5)
        sampler = sampling.get_pc_sampler(sde, x_T.shape, "reverse_diffusion", "none", _identity,
                                          0.16, continuous=True, denoise=denoise, device="cpu",
                                          progress=False)
        outputs[denoise] = sampler(net, x=x_T.clone())[0]
    torch.manual_seed(5)
    _, x_mean, _ = sampling.pc_sample_window(get_score_fn(sde, net, continuous=True), sde, x_T,
                                             1.0, 1e-3, 20, "reverse_diffusion", None, 0.16,
                                             progress=False, eps=1e-3)
    assert torch.equal(outputs[True], x_mean)
    assert not torch.equal(outputs[False], outputs[True])


# ------------------------------------------------------------------------------------------------
# Probability-flow ODE


def _exact_flow(net, x, t_from, t_to):
    """The probability-flow map between Gaussian marginals: an affine map per dimension."""
    mean_from, std_from = net.marginal(t_from)
    mean_to, std_to = net.marginal(t_to)
    return mean_to + std_to / std_from * (x - mean_from)


@pytest.mark.parametrize("name", list(SDES))
def test_ode_window_is_the_exact_gaussian_flow(name):
    make_sde, eps = SDES[name]
    sde = make_sde()
    torch.manual_seed(2)
    mu, std = torch.rand(1, 4, 4) * 0.6 + 0.2, torch.rand(1, 4, 4) * 0.2 + 0.1
    net = GaussianScoreNet(sde, mu, std)
    score_fn = get_score_fn(sde, net, continuous=True)
    x_T = sde.prior_sampling((8, 1, 4, 4))
    exact = _exact_flow(net, x_T, 1.0, eps)
    results = {}
    for solver in ("scipy", "torch"):
        net.calls = 0
        x, nfe = sampling.ode_sample_window(score_fn, sde, x_T, 1.0, eps, solver=solver)
        assert nfe == net.calls > 0
        assert (x - exact).abs().max() < 1e-3
        results[solver] = (x, nfe)
    # The torch RK45 takes SciPy's steps: same evaluations, same result to rounding.
    assert results["torch"][1] == results["scipy"][1]
    assert torch.allclose(results["torch"][0], results["scipy"][0], atol=1e-6, rtol=0)

    # Two windows [1, 0.5] and [0.5, eps] compose to the same map within solver tolerance.
    x_half, _ = sampling.ode_sample_window(score_fn, sde, x_T, 1.0, 0.5)
    assert (x_half - _exact_flow(net, x_T, 1.0, 0.5)).abs().max() < 1e-3
    x_two, _ = sampling.ode_sample_window(score_fn, sde, x_half, 0.5, eps)
    assert (x_two - exact).abs().max() < 1e-3


@pytest.mark.parametrize("name", list(SDES))
def test_ode_sampler_reproduces_gaussian(name):
    make_sde, eps = SDES[name]
    sde = make_sde()
    net = GaussianScoreNet(sde, MU, STD)
    torch.manual_seed(0)
    sampler = sampling.get_ode_sampler(sde, SHAPE, _identity, denoise=True, eps=eps, device="cpu")
    samples, nfe = sampler(net)
    _check_moments(samples)
    assert nfe == net.calls  # includes the denoising step
    # From a given latent the sampler is deterministic.
    z = sde.prior_sampling((4, 1, 4, 4))
    first, second = sampler(net, z=z)[0], sampler(net, z=z)[0]
    assert torch.equal(first, second)


def test_rk45_solve_matches_scipy_on_nonlinear_system():
    def rhs_np(t, y):
        return np.array([y[1], -np.sin(y[0]) - 0.1 * y[1] * t, -0.3 * y[2] * y[0]])

    def rhs_torch(t, y):
        return torch.stack([y[1], -torch.sin(y[0]) - 0.1 * y[1] * t, -0.3 * y[2] * y[0]])

    y0 = np.array([1.0, 0.0, 2.0])
    for t0, t1 in [(0.0, 5.0), (3.0, 0.5)]:
        ref = integrate.solve_ivp(rhs_np, (t0, t1), y0, rtol=1e-6, atol=1e-8, method="RK45")
        y, nfev = sampling.rk45_solve(rhs_torch, t0, t1, torch.from_numpy(y0), rtol=1e-6,
                                      atol=1e-8)
        assert nfev == ref.nfev
        np.testing.assert_allclose(y.numpy(), ref.y[:, -1], rtol=1e-12, atol=1e-12)


def test_solve_ode_rejects_unknown_solver_and_method():
    y0 = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'torch' or 'scipy'"):
        sampling.solve_ode(lambda t, y: -y, 0.0, 1.0, y0, solver="jax")
    with pytest.raises(ValueError, match="RK45 only"):
        sampling.solve_ode(lambda t, y: -y, 0.0, 1.0, y0, method="DOP853", solver="torch")
    y, nfe = sampling.solve_ode(lambda t, y: -y, 0.0, 1.0, y0, method="DOP853", solver="scipy")
    assert torch.allclose(y, torch.full((3,), math.exp(-1), dtype=torch.float64), atol=1e-5)


def test_get_sampling_fn_builds_from_config():
    config = ml_collections.ConfigDict({
        "device": "cpu",
        "training": {"continuous": True},
        "sampling": {"method": "pc", "predictor": "Reverse_Diffusion", "corrector": "langevin",
                     "snr": 0.16, "n_steps_each": 1, "probability_flow": False,
                     "noise_removal": True},
    })
    sde = sde_lib.VPSDE(N=50)  # the discrete betas beta_max / N must stay below 1
    net = GaussianScoreNet(sde, MU, STD)
    torch.manual_seed(0)
    samples, nfe = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), _identity, 1e-3)(net)
    torch.manual_seed(0)
    expected, _ = sampling.get_pc_sampler(sde, (2, 1, 4, 4), "reverse_diffusion", "langevin",
                                          _identity, 0.16, n_steps=1, continuous=True,
                                          denoise=True, eps=1e-3, device="cpu")(net)
    assert torch.isfinite(samples).all() and torch.equal(samples, expected) and nfe == 100
    config.sampling.method = "ode"
    config.sampling.noise_removal = False
    torch.manual_seed(1)
    samples, nfe = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), _identity, 1e-3)(net)
    torch.manual_seed(1)
    exact = _exact_flow(net, sde.prior_sampling((2, 1, 4, 4)), 1.0, 1e-3)
    assert (samples - exact).abs().max() < 1e-3 and nfe > 10
    config.sampling.method = "euler"
    with pytest.raises(ValueError,
                       match="'pc', 'ode', 'heun', 'dpm_solver', 'sde_dpm_solver' or 'ddim'"):
        sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), _identity, 1e-3)


@pytest.mark.parametrize("sde_class", [sde_lib.VPSDE, sde_lib.subVPSDE])
def test_langevin_step_factor_is_the_references_where_positive_and_finite_for_few_steps(
        sde_class):
    t = torch.linspace(1e-3, 1.0, 41)
    # N = 1000: exactly the reference's 1 - beta_i at every t.
    sde = sde_class(N=1000)
    index = (t * (sde.N - 1) / sde.T).long()
    assert torch.equal(sampling.langevin_step_factor(sde, t), sde.alphas[index])
    # N = 10: 1 - beta_i <= 0 above t ~ 0.5; the factor stays positive (exp(-beta_i)) there, so
    # the Langevin step sqrt(2 eps) is finite, and keeps 1 - beta_i below.
    sde = sde_class(N=10)
    factor = sampling.langevin_step_factor(sde, t)
    index = (t * (sde.N - 1) / sde.T).long()
    assert (sde.alphas[index] <= 0).any() and (factor > 0).all()
    positive = sde.alphas[index] > 0
    assert torch.equal(factor[positive], sde.alphas[index][positive])
    assert torch.allclose(factor[~positive], torch.exp(-sde.discrete_betas[index][~positive]))
