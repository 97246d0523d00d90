"""Training losses, optimiser management and the one-step function."""
import math

import pytest
import torch
import torch.nn as nn
from ml_collections import ConfigDict

import losses
import sde_lib
from models.ema import ExponentialMovingAverage
from models.layers import get_timestep_embedding
from models.utils import get_score_fn

SHAPE = (6, 1, 4, 4)


class TinyScoreNet(nn.Module):
    """A small real conv net conditioned on its label through a sinusoidal embedding."""

    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        self.width = width
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.embed = nn.Linear(width, width)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, labels):
        emb = self.embed(get_timestep_embedding(labels.float(), self.width))
        h = torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h)


class PointMassNet(nn.Module):
    """Exact score/noise/SMLD target for data that is a single point `mu` (a delta), in the output
    convention of each loss: continuous VE -> score, continuous VP -> -sigma * score (= noise),
    discrete DDPM -> noise, discrete SMLD -> score at the indexed noise level."""

    def __init__(self, sde, mu, mode):
        super().__init__()
        self.sde, self.mu, self.mode = sde, mu, mode

    def forward(self, x, labels):
        sde = self.sde
        if self.mode == "ddpm":
            i = labels.long().reshape(-1, 1, 1, 1)
            return (x - sde.sqrt_alphas_cumprod[i] * self.mu) / sde.sqrt_1m_alphas_cumprod[i]
        if self.mode == "smld":
            sigma = torch.flip(sde.discrete_sigmas, (0,))[labels.long()].reshape(-1, 1, 1, 1)
            return -(x - self.mu) / sigma**2
        t = sde.label_to_time(labels)
        alpha = sde.alpha(t).reshape(-1, 1, 1, 1)
        sigma = sde.sigma(t).reshape(-1, 1, 1, 1)
        score = -(x - alpha * self.mu) / sigma**2
        return score if isinstance(sde, sde_lib.VESDE) else -sigma * score


def _config(warmup=0, grad_clip=-1.0, lr=1e-3):
    return ConfigDict({"optim": {"optimizer": "Adam", "lr": lr, "beta1": 0.9, "eps": 1e-8,
                                 "weight_decay": 0.0, "warmup": warmup, "grad_clip": grad_clip}})


def _state(model, config, decay=0.999):
    return {"model": model, "optimizer": losses.get_optimizer(config, model.parameters()),
            "ema": ExponentialMovingAverage(model.parameters(), decay=decay), "step": 0}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


ALL_SDES = {"ve": sde_lib.VESDE, "vp": sde_lib.VPSDE, "subvp": sde_lib.subVPSDE}


@pytest.mark.parametrize("name", list(ALL_SDES))
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_dsm_loss_vanishes_for_the_exact_score_of_a_point_mass(name, likelihood_weighting):
    sde = ALL_SDES[name]()
    mu = torch.full((1, 4, 4), 0.3)
    batch = mu.expand(SHAPE).clone()
    loss_fn = losses.get_sde_loss_fn(sde, train=False, reduce_mean=True, continuous=True,
                                     likelihood_weighting=likelihood_weighting)
    exact = loss_fn(PointMassNet(sde, mu, "continuous"), batch, generator=_gen())
    wrong = loss_fn(PointMassNet(sde, mu + 0.5, "continuous"), batch, generator=_gen())
    assert exact < 1e-6 * wrong and wrong > 1e-3


@pytest.mark.parametrize("name", list(ALL_SDES))
def test_likelihood_weighting_matches_its_formula(name):
    sde = ALL_SDES[name]()
    torch.manual_seed(0)
    model = TinyScoreNet()
    batch = torch.rand(SHAPE)
    eps = 1e-5
    for reduce_mean in (True, False):
        loss = losses.get_sde_loss_fn(sde, True, reduce_mean=reduce_mean,
                                      likelihood_weighting=True, eps=eps)(model, batch, _gen(1))
        # The same draws, by hand: t ~ U(eps, T), z ~ N(0, I), g(t)^2 ||s + z / sigma||^2.
        gen = _gen(1)
        t = torch.rand(SHAPE[0], generator=gen) * (sde.T - eps) + eps
        z = torch.randn(SHAPE, generator=gen)
        sigma = sde.sigma(t).reshape(-1, 1, 1, 1)
        x_t = sde.alpha(t).reshape(-1, 1, 1, 1) * batch + sigma * z
        score = get_score_fn(sde, model, train=True, continuous=True)(x_t, t)
        per_dim = (score + z / sigma) ** 2
        reduced = per_dim.mean(dim=(1, 2, 3)) if reduce_mean else 0.5 * per_dim.sum(dim=(1, 2, 3))
        g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
        assert torch.allclose(loss, (reduced * g2).mean(), rtol=1e-5)
    if name == "ve":
        # VE: g(t)^2 = 2 log(sigma_max / sigma_min) sigma(t)^2, so the weighting is a constant.
        plain = losses.get_sde_loss_fn(sde, True, likelihood_weighting=False)(model, batch, _gen(2))
        weighted = losses.get_sde_loss_fn(sde, True, likelihood_weighting=True)(model, batch,
                                                                                 _gen(2))
        factor = 2 * math.log(sde.sigma_max / sde.sigma_min)
        assert torch.allclose(weighted, factor * plain, rtol=1e-5)


def test_reduce_mean_and_half_sum():
    sde = sde_lib.VPSDE()
    model = TinyScoreNet()
    batch = torch.rand(SHAPE)
    mean = losses.get_sde_loss_fn(sde, True, reduce_mean=True, likelihood_weighting=False)
    summed = losses.get_sde_loss_fn(sde, True, reduce_mean=False, likelihood_weighting=False)
    dims = math.prod(SHAPE[1:])
    assert torch.allclose(summed(model, batch, _gen(3)), 0.5 * dims * mean(model, batch, _gen(3)),
                          rtol=1e-5)


def test_discrete_losses_vanish_for_exact_targets():
    mu = torch.full((1, 4, 4), -0.2)
    batch = mu.expand(SHAPE).clone()
    vp, ve = sde_lib.VPSDE(), sde_lib.VESDE()
    ddpm = losses.get_ddpm_loss_fn(vp, train=False, reduce_mean=True)
    assert ddpm(PointMassNet(vp, mu, "ddpm"), batch, _gen()) < 1e-8
    assert ddpm(PointMassNet(vp, mu + 1, "ddpm"), batch, _gen()) > 1e-2
    smld = losses.get_smld_loss_fn(ve, train=False, reduce_mean=False)
    assert smld(PointMassNet(ve, mu, "smld"), batch, _gen()) < 1e-6
    assert smld(PointMassNet(ve, mu + 1, "smld"), batch, _gen()) > 1e-2
    with pytest.raises(ValueError, match="VP SDE"):
        losses.get_ddpm_loss_fn(sde_lib.subVPSDE(), True)
    with pytest.raises(ValueError, match="VE SDE"):
        losses.get_smld_loss_fn(vp, True)


def test_step_fn_selects_losses_and_rejects_bad_combinations():
    with pytest.raises(ValueError, match="continuous=True"):
        losses.get_step_fn(sde_lib.subVPSDE(), False, continuous=False)
    with pytest.raises(ValueError, match="Likelihood weighting"):
        losses.get_step_fn(sde_lib.VPSDE(), False, continuous=False, likelihood_weighting=True)
    with pytest.raises(ValueError, match="optimize_fn"):
        losses.get_step_fn(sde_lib.VPSDE(), True, optimize_fn=None)


def test_get_optimizer_reads_config():
    config = _config(lr=3e-4)
    config.optim.beta1, config.optim.eps, config.optim.weight_decay = 0.8, 1e-6, 0.01
    optimizer = losses.get_optimizer(config, TinyScoreNet().parameters())
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.Adam)
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        3e-4, (0.8, 0.999), 1e-6, 0.01)
    config.optim.optimizer = "SGD"
    with pytest.raises(ValueError, match="'Adam'"):
        losses.get_optimizer(config, TinyScoreNet().parameters())


def test_warmup_sets_learning_rate_per_step():
    config = _config(warmup=10, lr=1e-3)
    model = TinyScoreNet()
    state = _state(model, config)
    step_fn = losses.get_step_fn(sde_lib.VPSDE(), True, losses.optimization_manager(config),
                                 reduce_mean=True)
    batch = torch.rand(SHAPE)
    before = [p.detach().clone() for p in model.parameters()]
    step_fn(state, batch, _gen())
    # Step 0 of the warm-up has learning rate 0: Adam leaves the weights unchanged.
    assert state["optimizer"].param_groups[0]["lr"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for _ in range(4):
        step_fn(state, batch, _gen())
    assert state["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 10)
    state["step"] = 25
    step_fn(state, batch, _gen())
    assert state["optimizer"].param_groups[0]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("grad_clip", [0.05, -1.0])
def test_gradient_clipping(grad_clip):
    config = _config(grad_clip=grad_clip)
    model = TinyScoreNet()
    optimizer = losses.get_optimizer(config, model.parameters())
    loss = (model(torch.rand(SHAPE), torch.rand(SHAPE[0])) * 100).square().sum()
    loss.backward()
    norm_before = torch.linalg.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm_before > 1.0
    losses.optimization_manager(config)(optimizer, model.parameters(), step=1)
    norm_after = torch.linalg.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    if grad_clip >= 0:
        assert norm_after == pytest.approx(grad_clip, rel=1e-4)
    else:
        assert norm_after == norm_before


@pytest.mark.parametrize("name,continuous", [("ve", True), ("vp", True), ("subvp", True),
                                             ("vp", False), ("ve", False)])
def test_training_lowers_loss_on_a_fixed_batch(name, continuous):
    torch.manual_seed(0)
    sde = ALL_SDES[name]()
    model = TinyScoreNet()
    config = _config(lr=3e-3, grad_clip=1.0)
    state = _state(model, config)
    step_fn = losses.get_step_fn(sde, True, losses.optimization_manager(config),
                                 reduce_mean=True, continuous=continuous)
    eval_loss = losses.get_sde_loss_fn(sde, False, reduce_mean=True, likelihood_weighting=False)
    if not continuous:
        eval_loss = (losses.get_ddpm_loss_fn(sde, False, reduce_mean=True) if name == "vp"
                     else losses.get_smld_loss_fn(sde, False, reduce_mean=True))
    batch = torch.rand(SHAPE) * 2 - 1
    with torch.no_grad():
        before = eval_loss(model, batch, _gen(11))
    for _ in range(25):
        # The same draws every step: a fixed objective that optimisation must decrease.
        step_fn(state, batch, _gen(11))
    with torch.no_grad():
        after = eval_loss(model, batch, _gen(11))
    assert state["step"] == 25
    assert after < 0.8 * before


def test_ema_update_and_eval_with_ema_weights():
    torch.manual_seed(0)
    sde = sde_lib.VESDE()
    model = TinyScoreNet()
    config = _config(lr=1e-2)
    state = _state(model, config, decay=0.9)
    shadow_before = [s.clone() for s in state["ema"].shadow_params]
    train_step = losses.get_step_fn(sde, True, losses.optimization_manager(config))
    eval_step = losses.get_step_fn(sde, False)
    batch = torch.rand(SHAPE)
    train_step(state, batch, _gen())
    # First update: decay min(0.9, 2 / 11); shadow <- shadow - (1 - decay) (shadow - param).
    decay = min(0.9, 2 / 11)
    assert state["ema"].num_updates == 1 and state["step"] == 1
    for shadow, old, param in zip(state["ema"].shadow_params, shadow_before, model.parameters()):
        assert torch.allclose(shadow, old - (1 - decay) * (old - param.detach()), atol=1e-7)
        assert not torch.equal(shadow, old)

    # Evaluation uses the EMA weights and leaves the raw weights in place.
    raw = [p.detach().clone() for p in model.parameters()]
    loss = eval_step(state, batch, _gen(5))
    assert all(torch.equal(a, b) for a, b in zip(raw, model.parameters()))
    with torch.no_grad():
        for p, s in zip(model.parameters(), state["ema"].shadow_params):
            p.copy_(s)
        expected = losses.get_sde_loss_fn(sde, False, reduce_mean=False,
                                          likelihood_weighting=False)(model, batch, _gen(5))
    assert torch.equal(loss, expected)
    assert not loss.requires_grad


def test_generator_makes_draws_reproducible():
    sde = sde_lib.subVPSDE()
    model = TinyScoreNet()
    batch = torch.rand(SHAPE)
    loss_fn = losses.get_sde_loss_fn(sde, False)
    assert torch.equal(loss_fn(model, batch, _gen(9)), loss_fn(model, batch, _gen(9)))
    assert not torch.equal(loss_fn(model, batch, _gen(9)), loss_fn(model, batch, _gen(10)))


def test_training_times_start_at_min_time():
    # A subspace model trained only above its cutoff: every drawn t lies in [min_time, T].
    sde = sde_lib.subVPSDE(0.1, 20, 10)
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, labels):
            seen.append(sde.label_to_time(labels))
            return x * self.weight

    model = Recorder()
    step = losses.get_step_fn(sde, train=False, reduce_mean=True, continuous=True,
                              min_time=0.25)
    state = {"model": model, "ema": ExponentialMovingAverage(model.parameters(), 0.999),
             "step": 0, "optimizer": None}
    step(state, torch.zeros(256, 1, 2, 2))
    times = torch.cat(seen)
    assert float(times.min()) >= 0.25 - 1e-6 and float(times.max()) <= 1.0
    assert float(times.min()) < 0.3 and float(times.max()) > 0.95
    with pytest.raises(ValueError, match="set config.training.min_time"):
        losses.get_step_fn(sde, train=False, continuous=True, min_time=1.5)
