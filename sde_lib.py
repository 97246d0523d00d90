"""Stochastic differential equations of score-based generative modelling.

This module is the single home of the forward SDEs (VE, VP, sub-VP), of their marginal
coefficients x_t = alpha(t) x_0 + sigma(t) eps, and of the conversion between a time t and the
conditioning label a score network receives. Nothing else in the project writes those formulas.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable

import numpy as np
import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_broadcast(coefficient: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example coefficient of shape [B] so that it broadcasts against x."""
    return coefficient.reshape(coefficient.shape + (1,) * (x.dim() - coefficient.dim()))


class SDE(abc.ABC):
    """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T], discretised with N steps."""

    def __init__(self, N: int):
        super().__init__()
        self.N = N

    @property
    @abc.abstractmethod
    def T(self) -> float:
        """End time of the SDE."""

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) and diffusion g(t) of the forward SDE."""

    @abc.abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Mean coefficient alpha(t) of the perturbation kernel p_t(x_t | x_0)."""

    @abc.abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation sigma(t) of the perturbation kernel p_t(x_t | x_0)."""

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """Half log signal-to-noise ratio lambda(t) = log(alpha(t) / sigma(t)) (Lu et al. 2022)."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def log_snr_to_time(self, lam: torch.Tensor) -> torch.Tensor:
        """Inverse of `log_snr`: the time t with lambda(t) = lam (lambda decreases with t)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse of its log-SNR.")

    def marginal_prob(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean alpha(t) x_0 and std sigma(t) of p_t(x_t | x_0)."""
        return batch_broadcast(self.alpha(t), x) * x, self.sigma(t)

    @abc.abstractmethod
    def prior_sampling(self, shape) -> torch.Tensor:
        """A sample of the prior p_T."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior p_T at z, one value per example."""

    @abc.abstractmethod
    def time_to_label(self, t: torch.Tensor, continuous: bool = True) -> torch.Tensor:
        """The conditioning label a score network of this SDE is given at time t."""

    @abc.abstractmethod
    def label_to_time(self, labels: torch.Tensor) -> torch.Tensor:
        """Inverse of `time_to_label` for continuous models."""

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler-Maruyama discretisation x_{i+1} = x_i + f_i + G_i z_i with step 1/N."""
        dt = 1 / self.N
        drift, diffusion = self.sde(x, t)
        f = drift * dt
        G = diffusion * torch.sqrt(torch.tensor(dt, device=t.device))
        return f, G

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> SDE:
        """The reverse-time SDE (or probability-flow ODE) driven by `score_fn`."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE(SDE):
    """Reverse-time SDE dx = [f - g^2 s] dt + g dw_bar, or its probability-flow ODE."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool):
        super().__init__(forward.N)
        self.forward_sde = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    @property
    def T(self) -> float:
        return self.forward_sde.T

    def _weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x, t):
        drift, diffusion = self.forward_sde.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - batch_broadcast(diffusion, x) ** 2 * score * self._weight()
        diffusion = torch.zeros_like(diffusion) if self.probability_flow else diffusion
        return drift, diffusion

    def discretize(self, x, t):
        f, G = self.forward_sde.discretize(x, t)
        rev_f = f - batch_broadcast(G, x) ** 2 * self.score_fn(x, t) * self._weight()
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G

    def alpha(self, t):
        raise NotImplementedError("a reverse SDE has no perturbation kernel")

    def sigma(self, t):
        raise NotImplementedError("a reverse SDE has no perturbation kernel")

    def prior_sampling(self, shape):
        return self.forward_sde.prior_sampling(shape)

    def prior_logp(self, z):
        return self.forward_sde.prior_logp(z)

    def time_to_label(self, t, continuous=True):
        return self.forward_sde.time_to_label(t, continuous)

    def label_to_time(self, labels):
        return self.forward_sde.label_to_time(labels)


def _standard_normal_logp(z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    n = np.prod(z.shape[1:])
    return -n / 2.0 * np.log(2 * np.pi * scale**2) - torch.sum(
        z**2, dim=tuple(range(1, z.dim()))) / (2.0 * scale**2)


class VPSDE(SDE):
    """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (DDPM in the limit)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20, N: int = 1000):
        super().__init__(N)
        self.beta_0 = beta_min
        self.beta_1 = beta_max
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N)
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)

    @property
    def T(self) -> float:
        return 1

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """Noise rate beta(t) = beta_min + t (beta_max - beta_min)."""
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -B(t)/2, with B(t) = beta_min t + (beta_max - beta_min) t^2 / 2."""
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def alpha(self, t):
        return torch.exp(self.log_mean_coeff(t))

    def sigma(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean_coeff(t)))

    def sde(self, x, t):
        beta_t = self.beta(t)
        drift = -0.5 * batch_broadcast(beta_t, x) * x
        return drift, torch.sqrt(beta_t)

    def time_of_log_mean(self, B: torch.Tensor) -> torch.Tensor:
        """Inverse of B(t) = beta_min t + (beta_max - beta_min) t^2 / 2 = -2 log alpha(t)."""
        slope = self.beta_1 - self.beta_0
        if slope == 0:
            return B / self.beta_0
        return (torch.sqrt(self.beta_0**2 + 2.0 * slope * B) - self.beta_0) / slope

    def log_snr_to_time(self, lam):
        """sigma^2 / alpha^2 = exp(B) - 1 = exp(-2 lam), so B = log(1 + exp(-2 lam))."""
        return self.time_of_log_mean(torch.nn.functional.softplus(-2.0 * lam))

    def prior_sampling(self, shape):
        return torch.randn(*shape)

    def prior_logp(self, z):
        return _standard_normal_logp(z)

    def time_to_label(self, t, continuous=True):
        if continuous:
            return t * 999
        return t * (self.N - 1)

    def label_to_time(self, labels):
        return labels / 999

    def discretize(self, x, t):
        """DDPM discretisation of the VP SDE."""
        timestep = (t * (self.N - 1) / self.T).long()
        beta = self.discrete_betas.to(x.device)[timestep]
        alpha = self.alphas.to(x.device)[timestep]
        f = batch_broadcast(torch.sqrt(alpha), x) * x - x
        return f, torch.sqrt(beta)


class subVPSDE(VPSDE):
    """Sub-VP SDE: VP drift with diffusion sqrt(beta(t) (1 - exp(-2 B(t)))); std 1 - exp(-B)."""

    def sigma(self, t):
        return 1.0 - torch.exp(2.0 * self.log_mean_coeff(t))

    def sde(self, x, t):
        beta_t = self.beta(t)
        drift = -0.5 * batch_broadcast(beta_t, x) * x
        discount = 1.0 - torch.exp(-2 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2)
        return drift, torch.sqrt(beta_t * discount)

    def discretize(self, x, t):
        """Generic Euler-Maruyama discretisation (sub-VP has no DDPM counterpart)."""
        return SDE.discretize(self, x, t)

    def log_snr_to_time(self, lam):
        """sigma / alpha = exp(B/2) - exp(-B/2) = exp(-lam), so B = 2 asinh(exp(-lam) / 2)."""
        return self.time_of_log_mean(2.0 * torch.asinh(0.5 * torch.exp(-lam)))


class VESDE(SDE):
    """Variance-exploding SDE: dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50, N: int = 1000):
        super().__init__(N)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.discrete_sigmas = torch.exp(
            torch.linspace(np.log(self.sigma_min), np.log(self.sigma_max), N))

    @property
    def T(self) -> float:
        return 1

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def marginal_prob(self, x, t):
        return x, self.sigma(t)

    def log_snr(self, t):
        return -torch.log(self.sigma(t))

    def log_snr_to_time(self, lam):
        """alpha = 1, so sigma(t) = exp(-lam)."""
        return (-lam - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)

    def sde(self, x, t):
        sigma = self.sigma(t)
        drift = torch.zeros_like(x)
        diffusion = sigma * torch.sqrt(
            torch.tensor(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)), device=t.device))
        return drift, diffusion

    def prior_sampling(self, shape):
        return torch.randn(*shape) * self.sigma_max

    def prior_logp(self, z):
        return _standard_normal_logp(z, self.sigma_max)

    def time_to_label(self, t, continuous=True):
        """sigma(t) for continuous models; the rounded SMLD noise-level index otherwise."""
        if continuous:
            return self.sigma(t)
        return torch.round((self.T - t) * (self.N - 1)).long()

    def label_to_time(self, labels):
        return torch.log(labels / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def discretize(self, x, t):
        """SMLD (NCSN) discretisation of the VE SDE."""
        timestep = (t * (self.N - 1) / self.T).long()
        sigmas = self.discrete_sigmas.to(t.device)
        sigma = sigmas[timestep]
        adjacent_sigma = torch.where(
            timestep == 0, torch.zeros_like(t), sigmas[(timestep - 1).clamp(min=0)])
        f = torch.zeros_like(x)
        G = torch.sqrt(sigma**2 - adjacent_sigma**2)
        return f, G


def gaussian_noise_gain(sde: SDE, t: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """The gain G(t) = sigma(t) (alpha(t)^2 cov + sigma(t)^2 I)^{-1} of the best predictor of the
    noise z of x_t = alpha(t) x_0 + sigma(t) z when x_0 ~ N(mean, cov): E[z | x_t] =
    G(t) (x_t - alpha(t) mean). `t` [B], `cov` [D, D]; returns [B, D, D] in float64. G grows from
    about 0 where the data dominate x_t (alpha^2 cov >> sigma^2) to 1 / sigma at pure noise."""
    t = t.to(torch.float64)
    cov = cov.to(device=t.device, dtype=torch.float64)
    alpha = sde.alpha(t).reshape(-1, 1, 1)
    sigma = sde.sigma(t).reshape(-1, 1, 1)
    eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=t.device)
    return sigma * torch.linalg.inv(alpha**2 * cov + sigma**2 * eye)


def gaussian_noise_prediction(sde: SDE, x: torch.Tensor, t: torch.Tensor, mean: torch.Tensor,
                              cov: torch.Tensor) -> torch.Tensor:
    """E[z | x_t = x] for Gaussian data x_0 ~ N(mean, cov): G(t) (x - alpha(t) mean) with the
    gain of `gaussian_noise_gain`; `x` [B, D], `t` [B]; float64 [B, D]."""
    x = x.to(torch.float64)
    alpha = sde.alpha(t.to(torch.float64)).reshape(-1, 1)
    centred = x - alpha * mean.to(device=x.device, dtype=torch.float64)
    return (gaussian_noise_gain(sde, t, cov) @ centred.unsqueeze(-1)).squeeze(-1)


def get_sde(config) -> tuple[SDE, float]:
    """The SDE named by `config.training.sde` and the smallest time used in sampling."""
    name = config.training.sde.lower()
    if name == "vpsde":
        sde = VPSDE(config.model.beta_min, config.model.beta_max, config.model.num_scales)
        eps = 1e-3
    elif name == "subvpsde":
        sde = subVPSDE(config.model.beta_min, config.model.beta_max, config.model.num_scales)
        eps = 1e-3
    elif name == "vesde":
        sde = VESDE(config.model.sigma_min, config.model.sigma_max, config.model.num_scales)
        eps = 1e-5
    else:
        raise ValueError(
            f"Unknown SDE '{config.training.sde}': set config.training.sde to vesde, vpsde or "
            "subvpsde.")
    return sde, eps
