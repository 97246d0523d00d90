"""Few-step solvers of the probability-flow ODE and their time discretisations.

Every solver integrates the probability-flow ODE of a forward SDE (VE, VP or sub-VP; Song et al.
2021, eq. 13) from a state at time t_start down to t_end with one signature,

    solver(score_fn, sde, x, t_start, t_end, steps, schedule=None, *, denoise=False,
           callback=None, progress=False, ...) -> (x, nfe),

so the full sampler is the window [T, eps], subspace diffusion chains windows with a change of
dimension in between, and any score function works, including the implicit subspace score. The
state is kept in the data's space x_t = alpha(t) x_0 + sigma(t) eps; the solvers read alpha,
sigma and the log-SNR lambda = log(alpha / sigma) from `sde_lib`. A score s(x, t) gives the
noise prediction eps_hat = -sigma s and the data prediction x0_hat = (x + sigma^2 s) / alpha.

Time grids are uniform in a monotone warp w(t) of the window: `uniform` in t, `edm` in
(sigma / alpha)^(1 / rho) (Karras et al. 2022, eq. 5, rho = 7), `logsnr` in lambda. A window of a
grid is again a grid of the same kind, which is how subspace stages split the steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

import sde_lib
from sde_lib import ScoreFn

SCHEDULES = ("uniform", "edm", "logsnr")
# The grid each solver uses when no schedule is named (measured best on Gaussian data).
DEFAULT_SCHEDULES = {"heun": "edm", "dpm_solver": "logsnr", "sde_dpm_solver": "logsnr",
                     "ddim": "logsnr"}
Callback = Callable[[dict], None]


# ------------------------------------------------------------------------------------------------
# Time discretisations


def _check_schedule(schedule: str) -> str:
    name = str(schedule).lower()
    if name not in SCHEDULES:
        raise ValueError(f"Unknown time schedule '{schedule}': choose one of "
                         f"{', '.join(SCHEDULES)}.")
    return name


def schedule_warp(sde: sde_lib.SDE, t: torch.Tensor, schedule: str, rho: float = 7.0
                  ) -> torch.Tensor:
    """The coordinate w(t), increasing in t, in which the `schedule` grid is uniform: t
    (`uniform`), (sigma / alpha)^(1 / rho) = exp(-lambda / rho) (`edm`), -lambda (`logsnr`)."""
    name = _check_schedule(schedule)
    t = torch.as_tensor(t, dtype=torch.float64)
    if name == "uniform":
        return t
    lam = sde.log_snr(t)
    return torch.exp(-lam / rho) if name == "edm" else -lam


def schedule_unwarp(sde: sde_lib.SDE, w: torch.Tensor, schedule: str, rho: float = 7.0
                    ) -> torch.Tensor:
    """Inverse of `schedule_warp`: the times t with w(t) = w."""
    name = _check_schedule(schedule)
    w = torch.as_tensor(w, dtype=torch.float64)
    if name == "uniform":
        return w
    lam = -rho * torch.log(w) if name == "edm" else -w
    return sde.log_snr_to_time(lam)


def solver_timesteps(sde: sde_lib.SDE, t_start: float, t_end: float, steps: int,
                     schedule: str = "edm", rho: float = 7.0) -> torch.Tensor:
    """The `steps + 1` times t_start = t_0 > ... > t_steps = t_end (float64), uniform in the
    warp of `schedule` (for `edm`: sigma_i = (sigma_max^(1/rho) + i / steps (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho in the noise level sigma / alpha, Karras et al. 2022, eq. 5)."""
    if steps < 0:
        raise ValueError(f"A solver needs a non-negative number of steps; got {steps}.")
    if t_end > t_start:
        raise ValueError(f"Sampling runs backwards in time: t_start={t_start} must be >= "
                         f"t_end={t_end}.")
    if steps == 0:
        return torch.tensor([float(t_start)], dtype=torch.float64)
    ends = schedule_warp(sde, torch.tensor([t_start, t_end], dtype=torch.float64), schedule, rho)
    fractions = torch.arange(steps + 1, dtype=torch.float64) / steps
    times = schedule_unwarp(sde, ends[0] + fractions * (ends[1] - ends[0]), schedule, rho)
    times[0], times[-1] = float(t_start), float(t_end)  # exact ends, whatever the rounding
    return times


def _grid(sde: sde_lib.SDE, t_start: float, t_end: float, steps: int, schedule, rho: float,
          default: str) -> list[float]:
    """The solver's grid as floats: from `solver_timesteps` with the named `schedule` (None:
    `default`), or `schedule` given as the times themselves."""
    if schedule is None or isinstance(schedule, str):
        return solver_timesteps(sde, t_start, t_end, steps, schedule or default, rho).tolist()
    times = [float(v) for v in torch.as_tensor(schedule, dtype=torch.float64).reshape(-1)]
    if len(times) != steps + 1:
        raise ValueError(f"An explicit time grid for {steps} steps needs {steps + 1} times; got "
                         f"{len(times)}.")
    if not (math.isclose(times[0], t_start, rel_tol=1e-12, abs_tol=1e-12)
            and math.isclose(times[-1], t_end, rel_tol=1e-12, abs_tol=1e-12)):
        raise ValueError(f"An explicit time grid must run from t_start={t_start} to "
                         f"t_end={t_end}; got {times[0]} to {times[-1]}.")
    if any(b >= a for a, b in zip(times, times[1:])):
        raise ValueError("An explicit time grid must decrease strictly.")
    return times


# ------------------------------------------------------------------------------------------------
# Conversions of a score into the predictions the solvers use


class _Model:
    """A score function seen as noise and data predictions at scalar times (counts its calls)."""

    def __init__(self, score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor):
        self.score_fn, self.sde = score_fn, sde
        self.batch, self.device = x.shape[0], x.device
        self.time_dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        self.nfe = 0

    def coefficients(self, t: float) -> tuple[float, float]:
        """alpha(t), sigma(t) as floats (computed in float64)."""
        t64 = torch.tensor(t, dtype=torch.float64)
        return float(self.sde.alpha(t64)), float(self.sde.sigma(t64))

    def noise_level(self, t: float) -> float:
        """The noise level sigma(t) / alpha(t) of the scaled state x / alpha (EDM's sigma)."""
        return math.exp(-float(self.sde.log_snr(torch.tensor(t, dtype=torch.float64))))

    def log_snr(self, t: float) -> float:
        return float(self.sde.log_snr(torch.tensor(t, dtype=torch.float64)))

    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.nfe += 1
        vec_t = torch.full((self.batch,), t, dtype=self.time_dtype, device=self.device)
        return self.score_fn(x, vec_t)

    def noise(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """eps_hat(x, t) = -sigma(t) s(x, t)."""
        return -self.coefficients(t)[1] * self.score(x, t)

    def data(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """x0_hat(x, t) = (x + sigma^2 s(x, t)) / alpha (Tweedie's formula)."""
        alpha, sigma = self.coefficients(t)
        return (x + sigma**2 * self.score(x, t)) / alpha


def _steps(steps: int, progress: bool, desc: str | None):
    return tqdm(range(steps), desc=desc, disable=not progress, leave=False)


def _finish(model: _Model, x: torch.Tensor, t_end: float, denoise: bool
            ) -> tuple[torch.Tensor, int]:
    if denoise:
        x = model.data(x, t_end)
    return x, model.nfe


# ------------------------------------------------------------------------------------------------
# Solvers


def heun(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float, t_end: float,
         steps: int, schedule=None, *, rho: float = 7.0, churn: float = 0.0,
         churn_tmin: float = 0.0, churn_tmax: float = math.inf, churn_noise: float = 1.0,
         denoise: bool = False, callback: Callback | None = None, progress: bool = False,
         desc: str | None = None) -> tuple[torch.Tensor, int]:
    """EDM's second-order Heun sampler (Karras et al. 2022, Algorithm 1; Algorithm 2 with churn).

    Integrates dx~/dsigma~ = (x~ - D(x~; sigma~)) / sigma~ = eps_hat in the scaled state
    x~ = x / alpha and noise level sigma~ = sigma / alpha, over the grid of `schedule` (default
    `edm`, rho = 7): an Euler step followed by the trapezoidal correction, 2 evaluations per
    step. With `churn` = S_churn > 0, before each step whose sigma~ lies in [churn_tmin,
    churn_tmax] the noise is raised to sigma^ = sigma~ (1 + gamma), gamma = min(S_churn / steps,
    sqrt(2) - 1), by adding N(0, (sigma^2 - sigma~^2) churn_noise^2) to x~ (sigma^ is capped at
    the SDE's level at time T). `denoise` adds EDM's last Euler step to sigma = 0, i.e. the data
    prediction at t_end (1 evaluation). Returns the state at t_end and the evaluations made.
    """
    times = _grid(sde, t_start, t_end, steps, schedule, rho, DEFAULT_SCHEDULES["heun"])
    model = _Model(score_fn, sde, x)
    cap = model.noise_level(sde.T)
    gamma = min(churn / steps, math.sqrt(2.0) - 1.0) if steps and churn > 0 else 0.0
    for i in _steps(steps, progress, desc):
        t_cur, t_next = times[i], times[i + 1]
        s_cur, s_next = model.noise_level(t_cur), model.noise_level(t_next)
        alpha_next = model.coefficients(t_next)[0]
        scaled = x / model.coefficients(t_cur)[0]
        t_hat, s_hat = t_cur, s_cur
        if gamma > 0 and churn_tmin <= s_cur <= churn_tmax:
            s_hat = min(s_cur * (1.0 + gamma), max(cap, s_cur))
            if s_hat > s_cur:
                t_hat = float(sde.log_snr_to_time(torch.tensor(-math.log(s_hat),
                                                               dtype=torch.float64)))
                scaled = scaled + math.sqrt(s_hat**2 - s_cur**2) * churn_noise * \
                    torch.randn_like(scaled)
        d_cur = model.noise(model.coefficients(t_hat)[0] * scaled, t_hat)
        euler = scaled + (s_next - s_hat) * d_cur
        d_next = model.noise(alpha_next * euler, t_next)
        x = alpha_next * (scaled + (s_next - s_hat) * 0.5 * (d_cur + d_next))
        if callback is not None:
            callback({"step": i, "t": t_next, "x": x})
    return _finish(model, x, times[-1], denoise)


def _dpm_solver_2m(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float,
                   t_end: float, steps: int, schedule, rho: float, carry: dict | None,
                   denoise: bool, callback: Callback | None, progress: bool, desc: str | None,
                   stochastic: bool) -> tuple[torch.Tensor, int]:
    """The multistep loop shared by DPM-Solver++(2M) and its SDE variant (see their docstrings):
    each step makes one data prediction x0_hat and moves by the ODE's or the SDE's update with
    the second-order combination D of the last two predictions."""
    name = "sde_dpm_solver" if stochastic else "dpm_solver"
    times = _grid(sde, t_start, t_end, steps, schedule, rho, DEFAULT_SCHEDULES[name])
    model = _Model(score_fn, sde, x)
    x0_prev, lam_prev = (carry.get("x0"), carry.get("lambda")) if carry else (None, None)
    for i in _steps(steps, progress, desc):
        t_cur, t_next = times[i], times[i + 1]
        lam_cur, lam_next = model.log_snr(t_cur), model.log_snr(t_next)
        sigma_cur = model.coefficients(t_cur)[1]
        alpha_next, sigma_next = model.coefficients(t_next)
        h = lam_next - lam_cur
        x0 = model.data(x, t_cur)
        if x0_prev is None:
            D = x0
        else:
            r = (lam_cur - lam_prev) / h
            D = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        if stochastic:
            kept = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            x = (sigma_next / sigma_cur) * math.exp(-h) * x + alpha_next * kept * D + \
                sigma_next * math.sqrt(kept) * torch.randn_like(x)
        else:
            x = (sigma_next / sigma_cur) * x - alpha_next * math.expm1(-h) * D
        x0_prev, lam_prev = x0, lam_cur
        if callback is not None:
            callback({"step": i, "t": t_next, "x": x, "denoised": x0})
    if carry is not None:
        carry["x0"], carry["lambda"] = x0_prev, lam_prev
    return _finish(model, x, times[-1], denoise)


def dpm_solver(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float,
               t_end: float, steps: int, schedule=None, *, rho: float = 7.0,
               carry: dict | None = None, denoise: bool = False,
               callback: Callback | None = None, progress: bool = False,
               desc: str | None = None) -> tuple[torch.Tensor, int]:
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022,
    "DPM-Solver++", Algorithm 2), in the log-SNR lambda = log(alpha / sigma) (VE: alpha = 1).

    With h_i = lambda_i - lambda_{i-1} and r_i = h_{i-1} / h_i, each step evaluates the network
    once: D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2} (D_1 = x0_hat_0, a
    DDIM step) and x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i. Default
    grid: uniform in lambda. `carry`, a dict passed to consecutive windows of one trajectory,
    continues the multistep history across them (a fresh or no dict starts first-order).
    `denoise` returns the data prediction at t_end (1 more evaluation).
    """
    return _dpm_solver_2m(score_fn, sde, x, t_start, t_end, steps, schedule, rho, carry,
                          denoise, callback, progress, desc, stochastic=False)


def sde_dpm_solver(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float,
                   t_end: float, steps: int, schedule=None, *, rho: float = 7.0,
                   carry: dict | None = None, denoise: bool = False,
                   callback: Callback | None = None, progress: bool = False,
                   desc: str | None = None) -> tuple[torch.Tensor, int]:
    """SDE-DPM-Solver++(2M), the stochastic multistep second-order data-prediction solver of the
    reverse SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", its SDE-DPM-Solver++(2M)).

    In the log-SNR lambda = log(alpha / sigma) the reverse SDE (the one the score-SDE samplers
    discretise) has, over a step of length h_i = lambda_i - lambda_{i-1}, the exact solution
    x_i = (sigma_i / sigma_{i-1}) e^{-h_i} x_{i-1} + 2 alpha_i int e^{-2 (lambda_i - l)} x0(l) dl
    + sigma_i sqrt(1 - e^{-2 h_i}) z; with x0 held at the multistep combination
    D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2} (r_i = h_{i-1} / h_i;
    D_1 = x0_hat_0) this is x_i = (sigma_i / sigma_{i-1}) e^{-h_i} x_{i-1}
    + alpha_i (1 - e^{-2 h_i}) D_i + sigma_i sqrt(1 - e^{-2 h_i}) z, one evaluation per step.
    Its first step is DDIM with eta = 1. Default grid: uniform in lambda. The noise comes from
    torch's global generator (seed it for reproducible runs); `carry` continues the multistep
    history across consecutive windows as in `dpm_solver`; `denoise` returns the data
    prediction at t_end (1 more evaluation).
    """
    return _dpm_solver_2m(score_fn, sde, x, t_start, t_end, steps, schedule, rho, carry,
                          denoise, callback, progress, desc, stochastic=True)


def ddim(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float, t_end: float,
         steps: int, schedule=None, *, rho: float = 7.0, eta: float = 0.0,
         denoise: bool = False, callback: Callback | None = None, progress: bool = False,
         desc: str | None = None) -> tuple[torch.Tensor, int]:
    """DDIM (Song, Meng & Ermon 2021, eq. 12), written for any x_t = alpha x_0 + sigma eps.

    From t to s: x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s)^2 / (alpha_s sigma_t)^2), the std of
    q(x_s | x_t, x_0) scaled by eta. eta = 0 is the deterministic first-order solver of the
    probability-flow ODE (DPM-Solver-1), eta = 1 is ancestral sampling. One evaluation per
    step; default grid uniform in lambda (DDIM's paper used uniform or quadratic steps in t:
    `schedule="uniform"`). Works for VE too. `denoise` returns the data prediction at t_end.
    """
    if eta < 0:
        raise ValueError(f"DDIM needs eta >= 0; got {eta}.")
    times = _grid(sde, t_start, t_end, steps, schedule, rho, DEFAULT_SCHEDULES["ddim"])
    model = _Model(score_fn, sde, x)
    for i in _steps(steps, progress, desc):
        t_cur, t_next = times[i], times[i + 1]
        alpha_cur, sigma_cur = model.coefficients(t_cur)
        alpha_next, sigma_next = model.coefficients(t_next)
        eps_hat = model.noise(x, t_cur)
        x0 = (x - sigma_cur * eps_hat) / alpha_cur
        ratio = (alpha_cur * sigma_next) / (alpha_next * sigma_cur)
        c = eta * sigma_next * math.sqrt(max(0.0, 1.0 - ratio**2))
        x = alpha_next * x0 + math.sqrt(max(0.0, sigma_next**2 - c**2)) * eps_hat
        if c > 0:
            x = x + c * torch.randn_like(x)
        if callback is not None:
            callback({"step": i, "t": t_next, "x": x, "denoised": x0})
    return _finish(model, x, times[-1], denoise)


SOLVERS: dict[str, Callable[..., tuple[torch.Tensor, int]]] = {
    "heun": heun, "dpm_solver": dpm_solver, "sde_dpm_solver": sde_dpm_solver, "ddim": ddim}
# Steps used when the config leaves `sampling.steps` unset (network evaluations with the final
# denoising step: heun 2 steps - 1, the others one per step).
DEFAULT_STEPS = {"heun": 18, "dpm_solver": 20, "sde_dpm_solver": 35, "ddim": 50}


def get_solver(name: str) -> Callable[..., tuple[torch.Tensor, int]]:
    """The solver registered as `name` (`config.sampling.method`)."""
    if name not in SOLVERS:
        raise ValueError(f"Unknown ODE solver '{name}': choose one of {', '.join(SOLVERS)}.")
    return SOLVERS[name]


def check_schedule_setting(schedule) -> None:
    """Refuse a `config.sampling.schedule` that names no time schedule (None: the solver's)."""
    if schedule is not None and str(schedule).lower() not in SCHEDULES:
        raise ValueError(f"config.sampling.schedule '{schedule}' is unknown: choose one of "
                         f"{', '.join(SCHEDULES)} (or leave it unset for the solver's default).")


def solver_options(name: str, sampling_config) -> dict:
    """Keyword options of solver `name` read from a config's `sampling` section (`rho`, the
    churn settings of heun, `eta` of ddim), leaving the defaults where a field is absent.
    A value the solver would silently clip or ignore (a negative churn or eta, rho <= 0) is
    refused with the field's name."""
    get = sampling_config.get

    def value(field: str, default: float, low: float, open_low: bool = False,
              meaning: str = "") -> float:
        number = float(get(field, default))
        if math.isnan(number) or number < low or (open_low and number == low):
            relation = "greater than" if open_low else "at least"
            raise ValueError(f"config.sampling.{field}{meaning} must be {relation} {low:g}; got "
                             f"{get(field, default)}.")
        return number

    options = {"rho": value("rho", 7.0, 0.0, open_low=True)}
    if name == "heun":
        options.update(churn=value("churn", 0.0, 0.0, meaning=" (S_churn; 0 turns it off)"),
                       churn_tmin=value("churn_tmin", 0.0, 0.0),
                       churn_tmax=value("churn_tmax", math.inf, 0.0),
                       churn_noise=value("churn_noise", 1.0, 0.0))
        if options["churn_tmin"] > options["churn_tmax"]:
            raise ValueError(f"config.sampling.churn_tmin {options['churn_tmin']:g} is above "
                             f"config.sampling.churn_tmax {options['churn_tmax']:g}: churn "
                             "would never apply.")
    elif name == "ddim":
        options["eta"] = value("eta", 0.0, 0.0, meaning=" (0 deterministic, 1 ancestral)")
    return options


def full_steps(name: str, steps: int | None, denoise: bool) -> tuple[int, bool]:
    """Integration steps over [T, eps] for `steps` solver steps counted as EDM counts them: with
    `denoise` the last step is the one to sigma = 0 (Heun with 18 steps makes 35 evaluations)."""
    steps = DEFAULT_STEPS[name] if steps is None else int(steps)
    if steps < 1 or (denoise and steps < 2):
        raise ValueError(f"config.sampling.steps must be at least {2 if denoise else 1} for "
                         f"{name}{' with noise_removal' if denoise else ''}; got {steps}.")
    return (steps - 1 if denoise else steps), denoise


def solve(name: str, score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t_start: float,
          t_end: float, steps: int, schedule=None, **options) -> tuple[torch.Tensor, int]:
    """Run solver `name` on a window; `options` are its keyword arguments."""
    return get_solver(name)(score_fn, sde, x, t_start, t_end, steps, schedule, **options)

