"""Samplers of the reverse-time SDE and of the probability-flow ODE.

Predictors take one step of a discretised reverse-time SDE, correctors run score-based MCMC at a
fixed time, and the predictor-corrector (PC) loop alternates them over a grid of times (Song et
al. 2021, Algorithm 1). Every sampler here is written against a score function `score_fn(x, t)`,
so the same code serves a single network, a subspace network, or the implicit full-space score of
subspace diffusion. The loops run over a time *window* [t_start, t_end]: the full sampler is the
window [T, eps], and subspace diffusion chains windows with a change of dimension in between.

The probability-flow ODE is integrated with an adaptive Dormand-Prince 5(4) scheme, either by
SciPy's `solve_ivp` or by `rk45_solve`, a torch implementation with the same step-size control
that keeps the state on the data's device.
"""
from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

import sde_lib
import solvers
import subspace_lib as sl
from models import utils as mutils
from registry import Registry
from sde_lib import batch_broadcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Per-update hook of the PC loop: (x, x_mean, t) -> the state to continue from (or None: unchanged).
StepCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                        "tuple[torch.Tensor, torch.Tensor] | None"]

# The predictor's standard normal draw for a state x at per-example times t.
NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def standard_normal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fresh N(0, I) draw shaped like x from the global generator (the default noise)."""
    return torch.randn_like(x)


class CommonNoise:
    """Common random numbers for comparing samplers: the same noise for every sampler.

    The predictor's draw at grid time t is a full-size N(0, I) sample, shape `full_shape`, from
    a generator seeded by (seed, t); a state of a smaller side gets its subspace coordinates
    D^k z (`subspace_lib.downsample`, orthonormal, so again N(0, I)). A subspace sampler and the
    full sampler at the same N visit the same grid times, so the subspace sampler receives
    exactly the subspace part of the full sampler's increments, and `prior(k)` is D^k of one
    shared prior draw. The samples then differ by what the samplers do, not by their random
    numbers, which makes a difference in quality readable at a small sample count.
    """

    def __init__(self, seed: int, full_shape: Sequence[int]):
        self.seed = int(seed)
        self.full_shape = tuple(int(v) for v in full_shape)

    def _draw(self, key: int, like: torch.Tensor | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        z = torch.randn(self.full_shape, generator=generator)
        return z if like is None else z.to(device=like.device, dtype=like.dtype)

    def prior(self, halvings: int = 0) -> torch.Tensor:
        """D^k z of the shared N(0, I) draw at time T (float32 on the CPU)."""
        return sl.downsample(self._draw(0), halvings)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[:2] != self.full_shape[:2] or x.shape[-1] > self.full_shape[-1]:
            raise ValueError(f"Common noise of shape {self.full_shape} cannot serve a state of "
                             f"shape {tuple(x.shape)}: give the full sampler's batch shape.")
        # Grid times are at least 1e-5 apart; the key identifies t, the same in every sampler.
        key = 1 + int(round(float(t.reshape(-1)[0]) * 1e7))
        z = self._draw(key, like=x)
        return sl.downsample(z, sl.num_halvings(self.full_shape[-1], x.shape[-1]))


_PREDICTORS = Registry("predictor")
_CORRECTORS = Registry("corrector")


def register_predictor(cls=None, *, name: str | None = None):
    """Class decorator registering a predictor under `name`."""
    return _PREDICTORS.register(cls, name=name)


def register_corrector(cls=None, *, name: str | None = None):
    """Class decorator registering a corrector under `name`."""
    return _CORRECTORS.register(cls, name=name)


def get_predictor(name: str) -> type[Predictor]:
    """The predictor class registered as `name` (the config's `sampling.predictor`)."""
    return _PREDICTORS.get(name)


def get_corrector(name: str) -> type[Corrector]:
    """The corrector class registered as `name` (the config's `sampling.corrector`)."""
    return _CORRECTORS.get(name)


def _discrete_index(sde: sde_lib.SDE, t: torch.Tensor) -> torch.Tensor:
    """Index i = floor(t (N - 1) / T) of the discrete noise level the SMLD/DDPM schedules use."""
    return (t * (sde.N - 1) / sde.T).long()


# ------------------------------------------------------------------------------------------------
# Predictors


class Predictor(abc.ABC):
    """One step of a reverse-time SDE (or ODE) solver from time t to t - 1/N."""

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, probability_flow: bool = False,
                 noise: NoiseFn | None = None):
        super().__init__()
        self.sde = sde
        self.rsde = sde.reverse(score_fn, probability_flow)
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        # Where the step's N(0, I) draw comes from (`standard_normal`, or `CommonNoise`).
        self.noise = noise if noise is not None else standard_normal

    @abc.abstractmethod
    def update_fn(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next state and its noise-free mean, from state x at per-example times t."""


class Corrector(abc.ABC):
    """Score-based MCMC at a fixed time t (n_steps steps at signal-to-noise ratio snr)."""

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, snr: float, n_steps: int):
        super().__init__()
        self.sde = sde
        self.score_fn = score_fn
        self.snr = snr
        self.n_steps = n_steps

    @abc.abstractmethod
    def update_fn(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The corrected state and its noise-free mean, from state x at per-example times t."""


@register_predictor(name="euler_maruyama")
class EulerMaruyamaPredictor(Predictor):
    """Euler-Maruyama step of the reverse SDE: x <- x - [f - g^2 s] dt + g sqrt(dt) z."""

    def update_fn(self, x, t):
        dt = -1.0 / self.rsde.N
        z = self.noise(x, t)
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x + drift * dt
        x = x_mean + batch_broadcast(diffusion, x) * math.sqrt(-dt) * z
        return x, x_mean


@register_predictor(name="reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse diffusion: the forward discretisation x_{i+1} = x_i + f_i + G_i z run backwards,
    x_i = x_{i+1} - f_{i+1} + G_{i+1}^2 s + G_{i+1} z (Song et al. 2021, eq. 46)."""

    def update_fn(self, x, t):
        f, G = self.rsde.discretize(x, t)
        z = self.noise(x, t)
        x_mean = x - f
        x = x_mean + batch_broadcast(G, x) * z
        return x, x_mean


@register_predictor(name="ancestral_sampling")
class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling of the discrete SMLD (VE) or DDPM (VP) Markov chains (eqs. 47, 48).

    Only VE and VP SDEs have such a chain; sub-VP has none.
    """

    def __init__(self, sde, score_fn, probability_flow=False, noise=None):
        super().__init__(sde, score_fn, probability_flow, noise)
        if isinstance(sde, sde_lib.subVPSDE) or not isinstance(sde, (sde_lib.VPSDE, sde_lib.VESDE)):
            raise NotImplementedError(
                f"Ancestral sampling is defined for VE and VP SDEs only, not "
                f"{sde.__class__.__name__}: use the reverse_diffusion predictor.")
        if probability_flow:
            raise ValueError("Ancestral sampling has no probability-flow version: set "
                             "probability_flow=False or use the reverse_diffusion predictor.")

    def vesde_update_fn(self, x: torch.Tensor, t: torch.Tensor):
        """SMLD step: x_mean = x + (sigma_i^2 - sigma_{i-1}^2) s, noise std
        sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2)."""
        sde = self.sde
        timestep = _discrete_index(sde, t)
        sigmas = sde.discrete_sigmas.to(t.device)
        sigma = sigmas[timestep]
        adjacent_sigma = torch.where(timestep == 0, torch.zeros_like(sigma),
                                     sigmas[(timestep - 1).clamp(min=0)])
        score = self.score_fn(x, t)
        x_mean = x + score * batch_broadcast(sigma**2 - adjacent_sigma**2, x)
        std = torch.sqrt(adjacent_sigma**2 * (sigma**2 - adjacent_sigma**2) / sigma**2)
        x = x_mean + batch_broadcast(std, x) * self.noise(x, t)
        return x, x_mean

    def vpsde_update_fn(self, x: torch.Tensor, t: torch.Tensor):
        """DDPM step: x_mean = (x + beta_i s) / sqrt(1 - beta_i), noise std sqrt(beta_i)."""
        sde = self.sde
        timestep = _discrete_index(sde, t)
        beta = sde.discrete_betas.to(t.device)[timestep]
        score = self.score_fn(x, t)
        x_mean = (x + batch_broadcast(beta, x) * score) / batch_broadcast(torch.sqrt(1.0 - beta), x)
        x = x_mean + batch_broadcast(torch.sqrt(beta), x) * self.noise(x, t)
        return x, x_mean

    def update_fn(self, x, t):
        if isinstance(self.sde, sde_lib.VESDE):
            return self.vesde_update_fn(x, t)
        return self.vpsde_update_fn(x, t)


@register_predictor(name="none")
class NonePredictor(Predictor):
    """A predictor that leaves the state unchanged (corrector-only sampling)."""

    def __init__(self, sde, score_fn, probability_flow=False, noise=None):
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.noise = noise

    def update_fn(self, x, t):
        return x, x


# ------------------------------------------------------------------------------------------------
# Correctors


def langevin_step_factor(sde: sde_lib.SDE, t: torch.Tensor) -> torch.Tensor:
    """Step-size factor of the Langevin correctors: alpha_i = 1 - beta_i for VP/sub-VP, else 1.

    1 - beta_i is the first-order form of the discrete chain's exp(-beta_i). With few steps
    (beta_i = beta(t) / N reaches 1 once N <= beta_max, e.g. N = 10 above t = 0.5 for
    beta_max = 20) it is zero or negative, and the reference's step, which takes its square
    root, is NaN; there exp(-beta_i) is used instead. Wherever the reference's factor is
    positive (every t once N > beta_max) the two are identical."""
    if isinstance(sde, sde_lib.VPSDE):
        alpha = sde.alphas.to(t.device)[_discrete_index(sde, t)]
        beta = sde.discrete_betas.to(t.device)[_discrete_index(sde, t)]
        return torch.where(alpha > 0, alpha, torch.exp(-beta))
    return torch.ones_like(t)


def langevin_steps(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t: torch.Tensor,
                   snr: float, n_steps: int, alpha: torch.Tensor | None = None,
                   project: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_steps` Langevin steps at times t with the step size set by a target signal-to-noise
    ratio (Song et al. 2021, Algorithms 4 and 5): eps = 2 alpha (snr ||z|| / ||g||)^2,
    x <- x + eps g + sqrt(2 eps) z, norms averaged over the batch.

    `project` (e.g. the orthogonal part of a subspace) is applied to both the gradient g and the
    noise z, so the projected-out component of x stays fixed (the conditional Langevin of
    subspace diffusion). `alpha` defaults to `langevin_step_factor`. Returns the state and its
    noise-free mean.
    """
    if alpha is None:
        alpha = langevin_step_factor(sde, t)
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, t)
        noise = torch.randn_like(x)
        if project is not None:
            grad, noise = project(grad), project(noise)
        grad_norm = torch.linalg.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
        noise_norm = torch.linalg.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
        step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
        x_mean = x + batch_broadcast(step_size, x) * grad
        x = x_mean + batch_broadcast(torch.sqrt(step_size * 2), x) * noise
    return x, x_mean


@register_corrector(name="langevin")
class LangevinCorrector(Corrector):
    """Langevin MCMC with the step size set by a target signal-to-noise ratio (Algorithms 4, 5):
    eps = 2 alpha (snr ||z|| / ||s||)^2, x <- x + eps s + sqrt(2 eps) z (`langevin_steps`)."""

    def __init__(self, sde, score_fn, snr, n_steps):
        super().__init__(sde, score_fn, snr, n_steps)
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.VESDE)):
            raise NotImplementedError(
                f"The Langevin corrector does not support {sde.__class__.__name__}.")

    def update_fn(self, x, t, remove_subspace: int | None = None):
        """Corrected state and its mean; `remove_subspace=k` (the subspace-diffusion code's
        keyword) moves only the component orthogonal to the k-halvings subspace."""
        project = None
        if remove_subspace:
            import subspace_lib

            project = functools.partial(subspace_lib.orthogonal_part, k=int(remove_subspace))
        return langevin_steps(self.score_fn, self.sde, x, t, self.snr, self.n_steps,
                              project=project)


@register_corrector(name="ald")
class AnnealedLangevinDynamics(Corrector):
    """Annealed Langevin dynamics of NCSN: step size 2 alpha (snr sigma(t))^2 at noise level t."""

    def __init__(self, sde, score_fn, snr, n_steps):
        super().__init__(sde, score_fn, snr, n_steps)
        if not isinstance(sde, (sde_lib.VPSDE, sde_lib.VESDE)):
            raise NotImplementedError(
                f"Annealed Langevin dynamics does not support {sde.__class__.__name__}.")

    def update_fn(self, x, t):
        alpha = langevin_step_factor(self.sde, t)
        std = self.sde.marginal_prob(x, t)[1]
        step_size = (self.snr * std) ** 2 * 2 * alpha
        x_mean = x
        for _ in range(self.n_steps):
            grad = self.score_fn(x, t)
            noise = torch.randn_like(x)
            x_mean = x + batch_broadcast(step_size, x) * grad
            x = x_mean + batch_broadcast(torch.sqrt(step_size * 2), x) * noise
        return x, x_mean


@register_corrector(name="none")
class NoneCorrector(Corrector):
    """A corrector that leaves the state unchanged (predictor-only sampling)."""

    def __init__(self, sde, score_fn, snr, n_steps):
        self.sde = sde
        self.score_fn = score_fn
        self.snr = snr
        self.n_steps = n_steps

    def update_fn(self, x, t):
        return x, x


def resolve_update_class(kind, registry_get, none_cls):
    """The predictor/corrector class for `kind`: a class, a registered name, or None (no-op)."""
    if kind is None:
        return none_cls
    if isinstance(kind, str):
        return registry_get(kind.lower())
    return kind


def shared_predictor_update_fn(x: torch.Tensor, t: torch.Tensor, sde: sde_lib.SDE, model,
                               predictor, probability_flow: bool, continuous: bool,
                               score_fn: ScoreFn | None = None):
    """One predictor step with the score of `model` (or `score_fn` when given)."""
    if score_fn is None:
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)
    predictor_cls = resolve_update_class(predictor, get_predictor, NonePredictor)
    return predictor_cls(sde, score_fn, probability_flow).update_fn(x, t)


def shared_corrector_update_fn(x: torch.Tensor, t: torch.Tensor, sde: sde_lib.SDE, model,
                               corrector, continuous: bool, snr: float, n_steps: int,
                               score_fn: ScoreFn | None = None):
    """One corrector update with the score of `model` (or `score_fn` when given)."""
    if score_fn is None:
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)
    corrector_cls = resolve_update_class(corrector, get_corrector, NoneCorrector)
    return corrector_cls(sde, score_fn, snr, n_steps).update_fn(x, t)


# ------------------------------------------------------------------------------------------------
# Time windows


def _grid_position(N: int, b: float, T: float, eps: float) -> int:
    """Number of grid steps of linspace(T, eps, N) that lie below time b (rounded)."""
    return int(round(N * (b - eps) / (T - eps)))


def window_step_counts(N: int, boundaries: Sequence[float], T: float | None = None,
                       eps: float | None = None) -> list[int]:
    """Predictor steps per window for decreasing boundaries T = b_0 > b_1 > ... > b_m = eps.

    steps_i = round(N (b_{i-1} - eps) / (T - eps)) - round(N (b_i - eps) / (T - eps)), so the
    counts always add up to N (the reference code truncated each window with int() and lost
    steps). T and eps default to the first and last boundary.
    """
    b = [float(v) for v in boundaries]
    if len(b) < 2:
        raise ValueError(f"Give at least two time boundaries (T and eps); got {b}.")
    T = b[0] if T is None else float(T)
    eps = b[-1] if eps is None else float(eps)
    if not math.isclose(b[0], T) or not math.isclose(b[-1], eps):
        raise ValueError(f"The boundaries {b} must start at T={T} and end at eps={eps}.")
    if any(hi <= lo for hi, lo in zip(b[:-1], b[1:])):
        raise ValueError(f"Time boundaries must be strictly decreasing; got {b}.")
    if N < 1:
        raise ValueError(f"The number of steps N must be positive; got {N}.")
    positions = [N] + [_grid_position(N, v, T, eps) for v in b[1:-1]] + [0]
    return [hi - lo for hi, lo in zip(positions[:-1], positions[1:])]


def window_timesteps(N: int, t_start: float, t_end: float, num_steps: int, T: float = 1.0,
                     eps: float | None = None, device=None) -> torch.Tensor:
    """The times at which a PC window [t_start, t_end] evaluates its `num_steps` steps.

    With `eps`, these are the points of the full sampler's grid linspace(T, eps, N) that fall in
    the window under the rounding of `window_step_counts`, so windows chained over
    T = b_0 > ... > b_m = eps visit exactly the full grid. Without `eps`, the window is its own
    grid linspace(t_start, t_end, num_steps), both ends included (as the reference code did).
    """
    if num_steps < 0:
        raise ValueError(f"A window needs a non-negative number of steps; got {num_steps}.")
    if t_end > t_start:
        raise ValueError(f"Sampling runs backwards in time: t_start={t_start} must be >= "
                         f"t_end={t_end}.")
    if eps is None:
        return torch.linspace(t_start, t_end, num_steps, device=device)
    first = N - _grid_position(N, t_start, T, eps)
    last = N - _grid_position(N, t_end, T, eps)
    if last - first != num_steps:
        raise ValueError(
            f"The window [{t_start}, {t_end}] holds {last - first} of the {N} grid steps, not "
            f"{num_steps}: take the step counts from window_step_counts.")
    return torch.linspace(T, eps, N, device=device)[first:last]


def legacy_window_grid(N: int, start: float, end: float, T: float = 1.0, eps: float = 1e-5
                       ) -> tuple[float, float, int]:
    """The subspace-diffusion code's grid for a window from fraction `start` to `end` of the time
    axis: times linspace(start T + (1 - start) eps, end T + (1 - end) eps, int(N (start - end))),
    both ends included, so a time shared by two windows is evaluated twice and truncation can
    lose a step. Returns (first time, last time, number of steps) for `pc_sample_window`
    without `eps`."""
    if not 0.0 <= end <= start <= 1.0:
        raise ValueError(f"A window needs 0 <= end <= start <= 1; got start={start}, end={end}.")
    return start * T + (1 - start) * eps, end * T + (1 - end) * eps, int(N * (start - end))


class _CountingScore:
    """A score function that counts its evaluations (one per batch)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn = score_fn
        self.count = 0

    def __call__(self, x, t):
        self.count += 1
        return self.score_fn(x, t)


def pc_sample_window(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float,
                     t_end: float, num_steps: int, predictor, corrector, snr: float,
                     n_steps_each: int = 1, probability_flow: bool = False, denoise: bool = False,
                     progress: bool = True, desc: str | None = None, *, eps: float | None = None,
                     callback: StepCallback | None = None, noise: NoiseFn | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run the predictor-corrector loop on state x from t_start down to t_end.

    At each of `num_steps` times (see `window_timesteps`; pass the sampler's `eps` to use the
    full sampler's grid) one corrector update of `n_steps_each` steps is followed by one predictor
    step (Song et al. 2021, Algorithm 1). `predictor` / `corrector` are classes, registered names,
    or None. `callback(x, x_mean, t)` runs after every corrector and every predictor update and
    may return a replacement `(x, x_mean)`: inpainting and colorization impose the known part of
    the state there (Appendix I.2). `noise` replaces the predictor's N(0, I) draws
    (`CommonNoise`). Returns the final state (its noise-free mean when `denoise`), the
    noise-free mean, and the number of score evaluations.
    """
    predictor_cls = resolve_update_class(predictor, get_predictor, NonePredictor)
    corrector_cls = resolve_update_class(corrector, get_corrector, NoneCorrector)
    counted = _CountingScore(score_fn)
    # Without `noise`, a predictor registered with the original (sde, score_fn,
    # probability_flow) constructor keeps working.
    predictor_obj = (predictor_cls(sde, counted, probability_flow) if noise is None
                     else predictor_cls(sde, counted, probability_flow, noise=noise))
    corrector_obj = corrector_cls(sde, counted, snr, n_steps_each)
    timesteps = window_timesteps(sde.N, t_start, t_end, num_steps, sde.T, eps, device=x.device)
    x_mean = x
    with torch.no_grad():
        for t in tqdm(timesteps, desc=desc, disable=not progress, leave=False):
            vec_t = torch.ones(x.shape[0], device=x.device) * t
            for update in (corrector_obj.update_fn, predictor_obj.update_fn):
                x, x_mean = update(x, vec_t)
                if callback is not None:
                    x, x_mean = callback(x, x_mean, vec_t) or (x, x_mean)
    return (x_mean if denoise else x), x_mean, counted.count


def get_pc_sampler(sde: sde_lib.SDE, shape: Sequence[int], predictor, corrector, inverse_scaler,
                   snr: float, n_steps: int = 1, probability_flow: bool = False,
                   continuous: bool = False, denoise: bool = True, eps: float = 1e-3,
                   device=None, progress: bool = True, score_fn: ScoreFn | None = None
                   ) -> Callable:
    """A predictor-corrector sampler `pc_sampler(model, x=None) -> (samples, nfe)`.

    Starts from a prior sample (or `x`), runs `pc_sample_window` over [T, eps] with sde.N steps on
    the grid linspace(T, eps, N), applies `inverse_scaler`, and reports the number of score
    evaluations actually made.

    The windowed form of the subspace-diffusion code, `pc_sampler(model, x=None, start=1,
    end=0)` (start, end as fractions of [eps, T]), runs that code's window
    (`legacy_window_grid`) and returns `(samples, vec_t)` as it did, vec_t being the batch of
    the window's last time. With `score_fn` (the fork's keyword) the sampler uses that score
    function and ignores `model`.
    """
    given_score_fn = score_fn

    def pc_sampler(model, x: torch.Tensor | None = None, start: float | None = None,
                   end: float | None = None):
        target = device if device is not None else mutils.default_device()
        score_fn = given_score_fn if given_score_fn is not None else \
            mutils.get_score_fn(sde, model, train=False, continuous=continuous)
        windowed = start is not None or end is not None
        with torch.no_grad():
            if x is None:
                x = sde.prior_sampling(shape).to(target)
            if not windowed:
                x, _, nfe = pc_sample_window(score_fn, sde, x, sde.T, eps, sde.N, predictor,
                                             corrector, snr, n_steps_each=n_steps,
                                             probability_flow=probability_flow, denoise=denoise,
                                             progress=progress, desc="PC sampling", eps=eps)
                return inverse_scaler(x), nfe
            t_start, t_end, steps = legacy_window_grid(
                sde.N, 1.0 if start is None else start, 0.0 if end is None else end, sde.T, eps)
            x, _, _ = pc_sample_window(score_fn, sde, x, t_start, t_end, steps, predictor,
                                       corrector, snr, n_steps_each=n_steps,
                                       probability_flow=probability_flow, denoise=denoise,
                                       progress=progress, desc="PC sampling")
            last = window_timesteps(sde.N, t_start, t_end, steps, device=x.device)[-1:]
            return inverse_scaler(x), torch.ones(x.shape[0], device=x.device) * last

    return pc_sampler


# ------------------------------------------------------------------------------------------------
# ODE solvers

# Dormand-Prince 5(4) tableau (Dormand & Prince 1980), fifth-order solution, fourth-order error.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
_DP_E = (-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0
_ERROR_EXPONENT = -1 / 5


def _rms(x: torch.Tensor) -> float:
    return torch.sqrt(torch.mean(x * x)).item()


def _combine(coefficients: Sequence[float], stages: Sequence[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(stages[0])
    for c, k in zip(coefficients, stages):
        if c != 0.0:
            total = total + c * k
    return total


def rk45_solve(fun: Callable[[float, torch.Tensor], torch.Tensor], t0: float, t1: float,
               y0: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5
               ) -> tuple[torch.Tensor, int]:
    """Integrate dy/dt = fun(t, y) from t0 to t1 with adaptive Dormand-Prince RK45 in torch.

    The initial step, RMS error norm, safety factor and step-size bounds follow SciPy's RK45, so
    results agree with `scipy.integrate.solve_ivp(method="RK45")` to solver tolerance. Returns
    y(t1) and the number of evaluations of `fun`.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"ODE tolerances must be non-negative; got rtol={rtol}, atol={atol}.")
    rtol = max(rtol, 100 * np.finfo(float).eps)
    t0, t1 = float(t0), float(t1)
    if t0 == t1 or y0.numel() == 0:
        return y0, 0
    direction = 1.0 if t1 > t0 else -1.0
    nfev = 0

    def f(t, y):
        nonlocal nfev
        nfev += 1
        return fun(t, y)

    y = y0
    fy = f(t0, y)

    # Initial step (Hairer, Norsett & Wanner, Sec. II.4), as SciPy selects it.
    interval = abs(t1 - t0)
    scale = atol + torch.abs(y) * rtol
    d0, d1 = _rms(y / scale), _rms(fy / scale)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, interval)
    f1 = f(t0 + h0 * direction, y + h0 * direction * fy)
    d2 = _rms((f1 - fy) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1 / 5)
    h_abs = min(100 * h0, h1, interval)

    t = t0
    while direction * (t - t1) < 0:
        min_step = 10 * abs(math.nextafter(t, direction * math.inf) - t)
        h_abs = max(h_abs, min_step)
        rejected = False
        while True:
            if h_abs < min_step:
                raise RuntimeError(
                    f"The ODE solver's step size fell below {min_step:.3g} at t={t}: the drift is "
                    "too stiff or not finite; loosen rtol/atol or check the score model.")
            t_new = t + h_abs * direction
            if direction * (t_new - t1) > 0:
                t_new = t1
            h = t_new - t
            h_abs = abs(h)
            stages = [fy]
            for c, a in zip(_DP_C[1:], _DP_A[1:]):
                stages.append(f(t + c * h, y + _combine(a, stages) * h))
            y_new = y + h * _combine(_DP_B, stages)
            f_new = f(t + h, y_new)
            stages.append(f_new)
            scale = atol + torch.maximum(torch.abs(y), torch.abs(y_new)) * rtol
            error_norm = _rms(_combine(_DP_E, stages) * h / scale)
            if error_norm < 1:
                factor = (_MAX_FACTOR if error_norm == 0
                          else min(_MAX_FACTOR, _SAFETY * error_norm**_ERROR_EXPONENT))
                if rejected:
                    factor = min(1.0, factor)
                h_abs *= factor
                break
            h_abs *= max(_MIN_FACTOR, _SAFETY * error_norm**_ERROR_EXPONENT)
            rejected = True
        t, y, fy = t_new, y_new, f_new
    return y, nfev


def solve_ode(fun: Callable[[float, torch.Tensor], torch.Tensor], t0: float, t1: float,
              y0: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
              solver: str = "torch") -> tuple[torch.Tensor, int]:
    """y(t1) of dy/dt = fun(t, y), y(t0) = y0 (a float64 vector), and the number of evaluations.

    solver="torch" runs `rk45_solve` on y0's device (method must be RK45); solver="scipy" runs
    `scipy.integrate.solve_ivp` with `method`, converting to NumPy at each evaluation.
    """
    if solver == "torch":
        if method.upper() != "RK45":
            raise ValueError(f"The torch ODE solver implements RK45 only, not '{method}': use "
                             "method='RK45' or solver='scipy'.")
        return rk45_solve(fun, t0, t1, y0, rtol=rtol, atol=atol)
    if solver != "scipy":
        raise ValueError(f"Unknown ODE solver '{solver}': choose 'torch' or 'scipy'.")
    from scipy import integrate

    device = y0.device

    def numpy_fun(t, y):
        return fun(float(t), torch.from_numpy(y).to(device)).detach().cpu().numpy()

    solution = integrate.solve_ivp(numpy_fun, (t0, t1), y0.detach().cpu().numpy(), rtol=rtol,
                                   atol=atol, method=method)
    if not solution.success:
        raise RuntimeError(f"solve_ivp failed between t={t0} and t={t1}: {solution.message}")
    return torch.from_numpy(solution.y[:, -1]).to(device), int(solution.nfev)


def probability_flow_drift(sde: sde_lib.SDE, score_fn: ScoreFn, x: torch.Tensor,
                           t: torch.Tensor) -> torch.Tensor:
    """Drift f(x, t) - g(t)^2 s(x, t) / 2 of the probability-flow ODE (Song et al. 2021, eq. 13)."""
    return sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]


def ode_sample_window(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float,
                      t_end: float, rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
                      *, solver: str = "torch") -> tuple[torch.Tensor, int]:
    """Integrate the probability-flow ODE from state x at t_start to t_end.

    Returns the state at t_end (dtype and device of x) and the number of score evaluations.
    """
    if t_start == t_end:
        return x, 0
    shape, dtype = x.shape, x.dtype

    def fun(t: float, y: torch.Tensor) -> torch.Tensor:
        state = y.reshape(shape).to(dtype)
        vec_t = torch.ones(shape[0], device=state.device) * t
        return probability_flow_drift(sde, score_fn, state, vec_t).reshape(-1).to(torch.float64)

    with torch.no_grad():
        y, nfe = solve_ode(fun, t_start, t_end, x.reshape(-1).to(torch.float64), rtol=rtol,
                           atol=atol, method=method, solver=solver)
    return y.reshape(shape).to(dtype), nfe


def denoise_update(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, eps: float
                   ) -> torch.Tensor:
    """One noise-free reverse-diffusion step at time eps (the final denoising of the samplers)."""
    predictor = ReverseDiffusionPredictor(sde, score_fn, probability_flow=False)
    vec_eps = torch.ones(x.shape[0], device=x.device) * eps
    with torch.no_grad():
        return predictor.update_fn(x, vec_eps)[1]


def get_ode_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler, denoise: bool = False,
                    rtol: float = 1e-5, atol: float = 1e-5, method: str = "RK45",
                    eps: float = 1e-3, device=None, solver: str = "torch") -> Callable:
    """A probability-flow ODE sampler `ode_sampler(model, z=None) -> (samples, nfe)`.

    Integrates from T (a prior sample, or the latent `z`) to eps, optionally denoises with one
    noise-free reverse-diffusion step, and applies `inverse_scaler`. nfe counts every score
    evaluation, including the denoising one.
    """

    def ode_sampler(model, z: torch.Tensor | None = None):
        target = device if device is not None else mutils.default_device()
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
        with torch.no_grad():
            x = sde.prior_sampling(shape).to(target) if z is None else z
            x, nfe = ode_sample_window(score_fn, sde, x, sde.T, eps, rtol=rtol, atol=atol,
                                       method=method, solver=solver)
            if denoise:
                x = denoise_update(score_fn, sde, x, eps)
                nfe += 1
            return inverse_scaler(x), nfe

    return ode_sampler


def get_solver_sampler(name: str, sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler,
                       steps: int | None = None, schedule=None, denoise: bool = True,
                       eps: float = 1e-3, continuous: bool = True, device=None,
                       progress: bool = True, **options) -> Callable:
    """A few-step probability-flow sampler `sampler(model, z=None) -> (samples, nfe)`.

    Runs `solvers.get_solver(name)` ('heun', 'dpm_solver', 'sde_dpm_solver', 'ddim') from T (a
    prior sample, or the latent `z`) to eps with the time `schedule` (a name of
    `solvers.SCHEDULES`, None for the solver's default). `steps` counts steps as EDM does: with
    `denoise` the last one is the step to noise level 0 (the data prediction at eps), so Heun
    with 18 steps makes 35 network evaluations, the other solvers one per step; None takes
    `solvers.DEFAULT_STEPS`. `options` are the solver's keyword options (rho, churn..., eta).
    nfe counts every network evaluation.
    """
    solver = solvers.get_solver(name)
    window_steps, denoise = solvers.full_steps(name, steps, denoise)

    def solver_sampler(model, z: torch.Tensor | None = None):
        target = device if device is not None else mutils.default_device()
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)
        with torch.no_grad():
            x = sde.prior_sampling(shape).to(target) if z is None else z
            x, nfe = solver(score_fn, sde, x, sde.T, eps, window_steps, schedule,
                            denoise=denoise, progress=progress, desc=name, **options)
            return inverse_scaler(x), nfe

    return solver_sampler


# Every value of `config.sampling.method` (and of subspace_sample.py's --sampler).
SAMPLERS = ("pc", "ode", *solvers.SOLVERS)


def check_sampling_config(config, method: str | None = None, steps: int | None = None,
                          steps_field: str = "config.sampling.steps") -> None:
    """Refuse sampling settings that would fail part-way or be silently ignored, naming the
    field, before any network is built: an unknown method, schedule, predictor or corrector,
    solver options out of range (`solvers.solver_options`), and a step count given to a sampler
    that does not take one (PC takes N = config.model.num_scales steps; 'ode' adapts its own).

    `method` defaults to `config.sampling.method`, `steps` to `config.sampling.steps`;
    `steps_field` names the setting that gave the steps (e.g. a command-line flag).
    """
    sampling_config = config.sampling
    name = str(method if method is not None else sampling_config.method).lower()
    steps = steps if steps is not None else sampling_config.get("steps")
    if name not in SAMPLERS:
        raise ValueError(f"config.sampling.method '{name}' is unknown: choose one of "
                         f"{', '.join(SAMPLERS)}.")
    if name in solvers.SOLVERS:
        solvers.full_steps(name, steps, bool(sampling_config.noise_removal))
        solvers.check_schedule_setting(sampling_config.get("schedule"))
        solvers.solver_options(name, sampling_config)
        return
    if steps is not None:
        how = (f"takes N = config.model.num_scales steps ({config.model.num_scales}): set "
               f"--config.model.num_scales {steps} instead" if name == "pc" else
               "(adaptive RK45) chooses its own steps: leave the step count unset")
        raise ValueError(f"{steps_field} {steps} sets the steps of the few-step solvers "
                         f"({', '.join(solvers.SOLVERS)}); the {name} sampler {how}.")
    if name == "pc":
        for field, lookup in (("predictor", get_predictor), ("corrector", get_corrector)):
            try:
                lookup(str(sampling_config[field]).lower())
            except ValueError as error:
                raise ValueError(f"config.sampling.{field}: {error}") from None
        if not float(sampling_config.snr) > 0:
            raise ValueError(f"config.sampling.snr must be greater than 0; got "
                             f"{sampling_config.snr}.")
        if int(sampling_config.n_steps_each) < 0:
            raise ValueError(f"config.sampling.n_steps_each must be at least 0; got "
                             f"{sampling_config.n_steps_each}.")


def get_sampling_fn(config, sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler,
                    eps: float, progress: bool = True, denoise: bool | None = None,
                    score_fn: ScoreFn | None = None) -> Callable:
    """The sampler named by `config.sampling.method` as `fn(model) -> (samples, nfe)`: 'pc'
    (N = model.num_scales steps), 'ode' (adaptive RK45), or the few-step solvers 'heun',
    'dpm_solver', 'sde_dpm_solver' (stochastic), 'ddim' (`get_solver_sampler`).

    The ODE sampler reads optional `sampling.rtol`, `sampling.atol` (default 1e-5),
    `sampling.ode_method` (default RK45) and `sampling.ode_solver` (default "torch"); the solvers
    read `sampling.steps`, `sampling.schedule` and their options (`solvers.solver_options`). The
    network runs in `sampling.precision` (default fp32; "auto": as measured for each network,
    `models.utils.network_precision`), compiled when `sampling.compile` is set
    (`models.utils.network_options`); the sampler's own arithmetic stays in float32. `denoise`
    (default `sampling.noise_removal`) and `score_fn` (PC only: a score function replacing the
    model's) are the subspace-diffusion code's keywords.
    """
    sampler = _get_sampler(config, sde, shape, inverse_scaler, eps, progress, denoise, score_fn)
    precision = mutils.check_precision_setting(config.sampling.get("precision", "fp32"),
                                               mutils.config_device(config))
    compile_network = config.sampling.get("compile", False)

    def sampling_fn(model, *args, **kwargs):
        with mutils.network_options(precision=precision, compile=compile_network):
            return sampler(model, *args, **kwargs)

    return sampling_fn


def _get_sampler(config, sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler, eps: float,
                 progress: bool, denoise: bool | None, score_fn: ScoreFn | None) -> Callable:
    """The sampler of `get_sampling_fn`, without the network options."""
    name = config.sampling.method.lower()
    device = getattr(config, "device", None)
    if denoise is None:
        denoise = config.sampling.noise_removal
    if name in solvers.SOLVERS:
        if score_fn is not None:
            raise ValueError("get_sampling_fn(score_fn=...) applies to the PC sampler only: give "
                             "the solver a model, e.g. a models.subspace_model.SubspaceScore.")
        return get_solver_sampler(name, sde, shape, inverse_scaler,
                                  steps=config.sampling.get("steps"),
                                  schedule=config.sampling.get("schedule"),
                                  denoise=denoise, eps=eps,
                                  continuous=config.training.continuous, device=device,
                                  progress=progress,
                                  **solvers.solver_options(name, config.sampling))
    if name == "ode":
        if score_fn is not None:
            raise ValueError("get_sampling_fn(score_fn=...) applies to the PC sampler only: give "
                             "the ODE sampler a model, e.g. a models.subspace_model.SubspaceScore.")
        return get_ode_sampler(sde=sde, shape=shape, inverse_scaler=inverse_scaler,
                               denoise=denoise,
                               rtol=config.sampling.get("rtol", 1e-5),
                               atol=config.sampling.get("atol", 1e-5),
                               method=config.sampling.get("ode_method", "RK45"),
                               eps=eps, device=device,
                               solver=config.sampling.get("ode_solver", "torch"))
    if name == "pc":
        return get_pc_sampler(sde=sde, shape=shape,
                              predictor=get_predictor(config.sampling.predictor.lower()),
                              corrector=get_corrector(config.sampling.corrector.lower()),
                              inverse_scaler=inverse_scaler, snr=config.sampling.snr,
                              n_steps=config.sampling.n_steps_each,
                              probability_flow=config.sampling.probability_flow,
                              continuous=config.training.continuous,
                              denoise=denoise, eps=eps, device=device,
                              progress=progress, score_fn=score_fn)
    raise ValueError(f"Unknown sampling method '{config.sampling.method}': set "
                     "config.sampling.method to 'pc', 'ode', 'heun', 'dpm_solver', "
                     "'sde_dpm_solver' or 'ddim'.")
