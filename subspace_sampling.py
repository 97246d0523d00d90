"""Subspace sampling: a sampler per plan stage (PC or an ODE solver), upsampling, Langevin.

The reverse SDE starts in the smallest subspace of a `SubspacePlan` with that level's network.
At each cutoff the state is lifted to the next-larger level (`upsampling.upsample_level`), a few
Langevin steps with the next-larger network move only the newly added band (gradient and noise
projected onto the orthogonal complement, so the subspace component stays fixed), and PC
sampling continues with that network; the full network handles the last window. Step counts per
window come from `sampling.window_step_counts`, so the windows together visit the full sampler's
grid of N steps. `subspace_solver_sample` runs a probability-flow solver (`solvers.py`) in each
stage instead, its steps split in proportion to each window's share of the time schedule.
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

import sde_lib
import solvers
import subspace_lib as sl
from models import utils as mutils
from sampling import (
    NoiseFn,
    denoise_update,
    langevin_steps,
    legacy_window_grid,
    ode_sample_window,
    pc_sample_window,
    window_step_counts,
    window_timesteps,
)
from upsampling import upsample_level

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StageReport:
    """What one sampling stage did: its level and window, steps, network calls and time."""

    level: int
    size: int
    t_start: float
    t_end: float
    steps: int
    nfe: int
    langevin_nfe: int
    seconds: float


def conditional_langevin(score_fn: ScoreFn, sde: sde_lib.SDE, x: torch.Tensor, t: torch.Tensor,
                         snr: float, n_steps: int, remove_halvings: int | None,
                         alpha: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Langevin steps at time t whose gradient and noise are projected onto the orthogonal
    complement of the `remove_halvings` subspace (unprojected when None or 0).

    The Langevin corrector's steps (`sampling.langevin_steps`, Song et al. 2021, Algorithm 4)
    with the projection; `alpha` defaults to the corrector's. Returns the state and its
    noise-free mean.
    """
    project = (functools.partial(sl.orthogonal_part, k=remove_halvings) if remove_halvings
               else None)
    return langevin_steps(score_fn, sde, x, t, snr, n_steps, alpha=alpha, project=project)


def offset_free_score(score_fn: ScoreFn, sde: sde_lib.SDE, offset: float) -> ScoreFn:
    """The score of a subspace network as a function of the offset-free coordinates
    u = D^k x_t of a full-space state: s(u + c_k alpha(t), t) (docs/maths.md, sections 2 and 4).

    A subspace network is trained on scaler(D^k u) and so expects D^k x_t + c_k alpha(t). The
    samplers integrate u and add the offset at each evaluation, exactly, instead of integrating
    a state that carries it: the offset grows like alpha(t) (100-fold between t = 1 and 0.3 for
    sub-VP), and an Euler-Maruyama step integrates that growth only to first order. At N = 100
    the error reached 9 % of the offset by t = 0.3 and stayed in the images as a colour shift.
    """
    if offset == 0:
        return score_fn

    def shifted(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha = sde.alpha(t).to(u.dtype).reshape((-1,) + (1,) * (u.dim() - 1))
        return score_fn(u + offset * alpha, t)

    return shifted


def _legacy_langevin_score(model: nn.Module) -> ScoreFn:
    """The reference code's Langevin 'score': the raw network fed the time t as its label."""
    model_fn = mutils.get_model_fn(model, train=False)
    return lambda x, t: model_fn(x, t)


def _legacy_offset_factor(sde: sde_lib.SDE, size: int) -> float:
    """The reference script's data-scaler offset before upsampling: 1 alpha for 16x16 and
    3 alpha for 8x8 sub-VP states, none otherwise (its CIFAR-10 constants)."""
    if isinstance(sde, sde_lib.subVPSDE):
        return {16: 1.0, 8: 3.0}.get(int(size), 0.0)
    return 0.0


def stage_boundaries(plan: sl.SubspacePlan, T: float, eps: float) -> list[tuple[int, float, float]]:
    """The plan's non-empty windows (level, start, end), the last one ending at eps."""
    if plan.cutoffs[0] <= eps:
        raise ValueError(f"The smallest cutoff time {plan.cutoffs[0]} must exceed the sampler's "
                         f"final time eps={eps}: choose a larger --time.")
    windows = plan.windows(T)
    level, start, _ = windows[-1]
    return windows[:-1] + [(level, start, eps)]


# A stage integrator: (score_fn, x, start, end, steps, last, desc) -> (state at end, nfe).
StageIntegrator = Callable[[ScoreFn, torch.Tensor, float, float, int, bool, str],
                           tuple[torch.Tensor, int]]


def _run_stages(networks: Sequence[nn.Module], sde: sde_lib.SDE, plan: sl.SubspacePlan,
                centered: bool, shape: Sequence[int], stages: list[tuple[int, float, float]],
                counts: Sequence[int], integrate: StageIntegrator,
                arrival_time: Callable[[float, float, int], float], *, continuous: bool,
                langevin_snr: float, langevin_steps: int, conditional_langevin_steps: bool,
                legacy_langevin: bool, x: torch.Tensor | None, device, progress: bool,
                legacy_cutoffs: Sequence[float] | None = None
                ) -> tuple[torch.Tensor, list[StageReport]]:
    """The stage loop of subspace sampling, whatever integrates each window.

    Stage i runs `integrate` with level `stages[i][0]`'s score on its window with `counts[i]`
    steps. Between stages the state is upsampled at `arrival_time(start, end, steps)` of the
    next window (the time the state has reached) and refined by conditional Langevin steps.
    States are the offset-free coordinates D^k x of the full space (`offset_free_score`), so the
    prior of the first stage is D^k of the full prior and upsampling adds no offset.
    `legacy_cutoffs` (the reference script's behaviour, see `subspace_pc_sample`): stage i is
    upsampled at the cutoff time `legacy_cutoffs[i]` itself with the reference's data-scaler
    offsets, and its Langevin steps are the legacy ones with alpha = 1.
    """
    if len(networks) != plan.num_levels + 1:
        raise ValueError(f"Give {plan.num_levels + 1} networks (full size first, then one per "
                         f"subspace size {list(plan.sizes)}); got {len(networks)}.")
    device = device if device is not None else mutils.default_device()
    legacy = legacy_cutoffs is not None
    score_fns = [mutils.get_score_fn(sde, net, train=False, continuous=continuous)
                 for net in networks]
    if not legacy:
        # States are offset-free subspace coordinates D^k x; the offset goes to the networks.
        score_fns = [offset_free_score(fn, sde, plan.offset(level, centered))
                     for level, fn in enumerate(score_fns)]
    batch, channels = shape[0], shape[1]
    reports: list[StageReport] = []
    with torch.no_grad():
        for i, ((level, start, end), steps) in enumerate(zip(stages, counts)):
            began = time.perf_counter()
            size = plan.size_of(level)
            langevin_nfe = 0
            if i == 0:
                if x is None:
                    x = sde.prior_sampling((batch, channels, size, size)).to(device)
            else:
                vec_t = torch.full((batch,), arrival_time(start, end, steps), device=device)
                lower = stages[i - 1][0]
                if legacy:
                    # Noise at the cutoff time itself, with the reference's offsets.
                    x = upsample_level(x, sde, legacy_cutoffs[i], plan, lower, centered,
                                       offset=_legacy_offset_factor(sde, plan.size_of(lower)))
                else:
                    x = upsample_level(x, sde, vec_t, plan, lower, centered, offset=0.0)
                if langevin_steps > 0:
                    removed = plan.relative_halvings(lower) if conditional_langevin_steps \
                        else None
                    if legacy_langevin or legacy:
                        score = _legacy_langevin_score(networks[level])
                        if not legacy:
                            score = offset_free_score(score, sde, plan.offset(level, centered))
                        alpha = (torch.ones_like(vec_t)
                                 if legacy or isinstance(sde, sde_lib.subVPSDE) else None)
                    else:
                        score, alpha = score_fns[level], None
                    x, _ = conditional_langevin(score, sde, x, vec_t, langevin_snr,
                                                langevin_steps, removed, alpha=alpha)
                    langevin_nfe = langevin_steps
            last = i == len(stages) - 1
            desc = f"{size}x{size} [{start:g}, {end:g}]" if progress else None
            x, nfe = integrate(score_fns[level], x, start, end, steps, last, desc)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            reports.append(StageReport(level, size, start, end, steps, nfe + langevin_nfe,
                                       langevin_nfe, time.perf_counter() - began))
    return x, reports


def subspace_pc_sample(networks: Sequence[nn.Module], sde: sde_lib.SDE, plan: sl.SubspacePlan,
                       centered: bool, shape: Sequence[int], *, eps: float, predictor, corrector,
                       snr: float, n_steps_each: int = 1, probability_flow: bool = False,
                       continuous: bool = True, denoise: bool = True, langevin_snr: float = 0.22,
                       langevin_steps: int = 2, conditional_langevin_steps: bool = True,
                       legacy_langevin: bool = False, x: torch.Tensor | None = None,
                       device=None, progress: bool = False, legacy: bool = False,
                       noise: NoiseFn | None = None
                       ) -> tuple[torch.Tensor, list[StageReport]]:
    """Sample full-size states (data-scaler space) by subspace diffusion (Jing et al. 2022).

    `networks[j]` is the network of plan level j (0 = full size); `shape` is the full-size
    batch shape. Stages run from T down to eps (`stage_boundaries`); at each cutoff the state is
    upsampled and, when `langevin_steps` > 0, refined by Langevin steps of the next-larger network
    at the time the state has reached (`conditional_langevin_steps`: only the new band moves).
    `legacy_langevin=True` reproduces the reference code, which gave the Langevin step the raw
    network as its score (label t instead of the SDE's label; sign flipped for VP/sub-VP) and
    used alpha = 1 there for sub-VP. The last stage returns its noise-free mean when `denoise`.
    `x` optionally replaces the prior sample of the first stage (coordinates D^k x_T, without
    the data-scaler offset, which is added for each network call: `offset_free_score`).
    Returns the samples and one `StageReport` per stage. `noise` replaces the predictor's
    N(0, I) draws (`sampling.CommonNoise`: the same increments as a full sampler's, projected).

    `legacy=True` reproduces the reference script's sequence of network evaluations (one
    subspace level only, as it had): each window is its own grid
    (`sampling.legacy_window_grid`: int(N (start - end)) steps, both ends included, so the cutoff
    time is evaluated by both windows), the upsampling noise is drawn at the cutoff time itself
    with its sub-VP CIFAR-10 offsets, and the Langevin steps are those of `legacy_langevin` with
    alpha = 1. The caller passes the reference's eps (1e-5 for every SDE). It also integrates
    the subspace state with the offset in it, as the reference did.
    """
    legacy_cutoffs = None
    if legacy and len(networks) == plan.num_levels + 1:
        if plan.num_levels != 1:
            raise ValueError(f"The reference script had one subspace level, not "
                             f"{plan.num_levels} {list(plan.sizes)}: give one --subspace size "
                             "with --legacy.")
        windows = plan.windows(sde.T)
        grids = [legacy_window_grid(sde.N, start, end, sde.T, eps) for _, start, end in windows]
        stages = [(level, first, last) for (level, _, _), (first, last, _) in zip(windows, grids)]
        counts = [steps for _, _, steps in grids]
        legacy_cutoffs = [start for _, start, _ in windows]
        grid_eps = None
    else:
        stages = (stage_boundaries(plan, sde.T, eps)
                  if len(networks) == plan.num_levels + 1 else [])
        counts = window_step_counts(sde.N, [sde.T] + [s[2] for s in stages], sde.T, eps) \
            if stages else []
        grid_eps = eps

    def arrival_time(start: float, end: float, steps: int) -> float:
        # The state has reached this window's first grid time.
        if steps == 0:
            return start
        return float(window_timesteps(sde.N, start, end, steps, sde.T, grid_eps)[0])

    def integrate(score_fn, x, start, end, steps, last, desc):
        x, _, nfe = pc_sample_window(score_fn, sde, x, start, end, steps, predictor, corrector,
                                     snr, n_steps_each=n_steps_each,
                                     probability_flow=probability_flow,
                                     denoise=denoise and last, progress=desc is not None,
                                     desc=desc, eps=grid_eps, noise=noise)
        return x, nfe

    return _run_stages(networks, sde, plan, centered, shape, stages, counts, integrate,
                       arrival_time, continuous=continuous, langevin_snr=langevin_snr,
                       langevin_steps=langevin_steps,
                       conditional_langevin_steps=conditional_langevin_steps,
                       legacy_langevin=legacy_langevin, x=x, device=device, progress=progress,
                       legacy_cutoffs=legacy_cutoffs)


def schedule_step_counts(sde: sde_lib.SDE, steps: int, boundaries: Sequence[float],
                         schedule: str, rho: float = 7.0) -> list[int]:
    """Solver steps per window for decreasing time boundaries T = b_0 > ... > b_m = eps, in
    proportion to each window's share of the schedule: `window_step_counts` applied to the
    schedule's warp w(b_i) (`solvers.schedule_warp`), so a window's steps follow its length in
    the coordinate where the grid is uniform; every window gets at least one step."""
    warped = solvers.schedule_warp(sde, torch.tensor([float(b) for b in boundaries],
                                                     dtype=torch.float64), schedule, rho)
    return [max(1, c) for c in window_step_counts(steps, warped.tolist())]


def check_split(split: str | None) -> str | None:
    """`split` (how `subspace_solver_sample` divides the steps over the stages: a name of
    `solvers.SCHEDULES`, or None for the solver's own grid), else a ValueError of one sentence."""
    if split is not None and split not in solvers.SCHEDULES:
        raise ValueError(f"Unknown step split '{split}': set config.sampling.split to one of "
                         f"{', '.join(solvers.SCHEDULES)} (or leave it unset for the solver's own "
                         "grid).")
    return split


def subspace_solver_sample(networks: Sequence[nn.Module], sde: sde_lib.SDE,
                           plan: sl.SubspacePlan, centered: bool, shape: Sequence[int], *,
                           eps: float, method: str, steps: int | None = None, schedule=None,
                           denoise: bool = True, continuous: bool = True,
                           langevin_snr: float = 0.22, langevin_steps: int = 2,
                           conditional_langevin_steps: bool = True, legacy_langevin: bool = False,
                           x: torch.Tensor | None = None, device=None, progress: bool = False,
                           rtol: float = 1e-5, atol: float = 1e-5, split: str | None = None,
                           **options) -> tuple[torch.Tensor, list[StageReport]]:
    """Subspace diffusion with a probability-flow solver in every plan stage.

    `method` is a solver of `solvers.SOLVERS` ('heun', 'dpm_solver', 'sde_dpm_solver', 'ddim')
    or 'ode' (adaptive RK45 per stage at rtol/atol). Each stage integrates in its own dimension
    with its level's network; at each cutoff the state is upsampled (and refined by conditional
    Langevin steps, as in `subspace_pc_sample`). `steps` counts as in
    `sampling.get_solver_sampler` (with `denoise` the last step is the data prediction at eps);
    the remaining integration steps are split over the stages by `schedule_step_counts`, in
    proportion to each stage's share of the warp of `split` (a name of `solvers.SCHEDULES`;
    default: the solver's own grid, so the stages together run that grid; `uniform` gives the
    stages their share of t, more steps above the cutoffs), each stage running the solver's
    grid on its own window. `options` go to the solver (rho, churn..., eta). Returns the
    samples and one `StageReport` per stage.
    """
    stages = stage_boundaries(plan, sde.T, eps) if len(networks) == plan.num_levels + 1 else []
    boundaries = [sde.T] + [s[2] for s in stages]
    if method == "ode":
        counts = [0] * len(stages)

        def integrate(score_fn, x, start, end, steps, last, desc):
            x, nfe = ode_sample_window(score_fn, sde, x, start, end, rtol=rtol, atol=atol,
                                       solver="torch")
            if denoise and last:
                x, nfe = denoise_update(score_fn, sde, x, end), nfe + 1
            return x, nfe
    else:
        solver = solvers.get_solver(method)
        check_split(split)
        total, _ = solvers.full_steps(method, steps, denoise)
        name = schedule if isinstance(schedule, str) else solvers.DEFAULT_SCHEDULES[method]
        counts = schedule_step_counts(sde, total, boundaries, split or name,
                                      options.get("rho", 7.0)) if stages else []

        def integrate(score_fn, x, start, end, steps, last, desc):
            return solver(score_fn, sde, x, start, end, steps, name, denoise=denoise and last,
                          progress=desc is not None, desc=desc, **options)

    return _run_stages(networks, sde, plan, centered, shape, stages, counts, integrate,
                       lambda start, end, steps: start, continuous=continuous,
                       langevin_snr=langevin_snr, langevin_steps=langevin_steps,
                       conditional_langevin_steps=conditional_langevin_steps,
                       legacy_langevin=legacy_langevin, x=x, device=device, progress=progress)


def format_stage_reports(reports: Sequence[StageReport]) -> str:
    """A small table of the stages: size, window, steps, network evaluations, seconds."""
    lines = [f"{'size':>6} {'window':>17} {'steps':>6} {'nfe':>6} {'langevin':>8} {'seconds':>9}"]
    for r in reports:
        window = f"[{r.t_start:.4g}, {r.t_end:.4g}]"
        lines.append(f"{r.size:>6} {window:>17} {r.steps:>6} {r.nfe:>6} {r.langevin_nfe:>8} "
                     f"{r.seconds:>9.2f}")
    total_nfe = sum(r.nfe for r in reports)
    total_s = sum(r.seconds for r in reports)
    lines.append(f"{'total':>6} {'':>17} {sum(r.steps for r in reports):>6} {total_nfe:>6} "
                 f"{sum(r.langevin_nfe for r in reports):>8} {total_s:>9.2f}")
    return "\n".join(lines)
