"""Subspace diffusion with the few-step ODE solvers, on Gaussian data with exact networks.

Per plan stage (`subspace_solver_sample`: each level's network in its own dimension, upsampling
at the cutoffs) and as one ODE through the implicit full-space score (`get_solver_sampler` on a
`SubspaceScore`), every solver must reproduce the data's moments in the subspace and in every
orthogonal band (see test_subspace_sampling.py for the data and the check).
"""
from __future__ import annotations

import pytest
import torch
from test_subspace_closed_form import CHANNELS, SIZE
from test_subspace_sampling import PLANS, SETUPS, assert_matches_data, make_data

import sampling
import sde_lib
import solvers
from subspace_sampling import schedule_step_counts, stage_boundaries, subspace_solver_sample

STEPS = {"heun": 40, "dpm_solver": 30, "ddim": 150, "ode": None}  # about 1 % std error


@pytest.mark.parametrize("sde_name", list(SETUPS))
@pytest.mark.parametrize("method", list(STEPS))
def test_staged_solver_sampling_reproduces_data(sde_name, method):
    make_sde, centered, *_, eps = SETUPS[sde_name]
    sde = make_sde(1000)
    data = make_data("two_levels", centered)
    networks = [data.level_net(sde, j) for j in range(3)]
    plan = data.plan(PLANS["two_levels"]["cutoffs"])
    torch.manual_seed(0)
    batch = 1000
    prior = sde.prior_sampling((batch, CHANNELS, 2, 2)).double()
    samples, reports = subspace_solver_sample(
        networks, sde, plan, centered, (batch, CHANNELS, SIZE, SIZE), eps=eps, method=method,
        steps=STEPS[method], langevin_steps=2, langevin_snr=0.16, x=prior, device="cpu",
        rtol=1e-4, atol=1e-4)
    assert [r.level for r in reports] == [2, 1, 0]
    assert [r.nfe for r in reports] == [networks[2].calls, networks[1].calls, networks[0].calls]
    assert reports[1].langevin_nfe == reports[2].langevin_nfe == 2
    if method != "ode":
        total = solvers.full_steps(method, STEPS[method], True)[0]
        assert sum(r.steps for r in reports) == total
        per_step = 2 if method == "heun" else 1
        assert sum(r.nfe for r in reports) == per_step * total + 1 + 4  # denoise, Langevin
    assert_matches_data(samples, data, rel_var=0.06, what=f"{method} {sde_name}")


@pytest.mark.parametrize("sde_name", list(SETUPS))
@pytest.mark.parametrize("method", list(solvers.SOLVERS))
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_solvers_through_the_implicit_score_reproduce_data(sde_name, method, plan_name):
    make_sde, centered, *_, eps = SETUPS[sde_name]
    sde = make_sde(1000)
    data = make_data(plan_name, centered)
    model = data.subspace_score(sde, PLANS[plan_name]["cutoffs"])
    torch.manual_seed(1)
    # Twice the steps: 500 samples of this seed already put the exact flow's subspace variance
    # 4 % above the data's, so the discretisation error must stay well below the staged runs'.
    sampler = sampling.get_solver_sampler(method, sde, (500, CHANNELS, SIZE, SIZE), lambda x: x,
                                          steps=2 * STEPS[method], eps=eps, device="cpu",
                                          progress=False)
    samples, nfe = sampler(model)
    assert nfe == model.nfe_full + sum(model.nfe_subspace)
    assert model.nfe_full > 0 and all(n > 0 for n in model.nfe_subspace)
    assert_matches_data(samples, data, rel_var=0.06, what=f"{method} implicit {sde_name}")


def test_steps_are_split_by_the_share_of_the_schedule():
    sde = sde_lib.subVPSDE()
    plan = make_data("two_levels", True).plan((0.3, 0.6))
    boundaries = [1.0] + [end for _, _, end in stage_boundaries(plan, 1.0, 1e-3)]
    for schedule in solvers.SCHEDULES:
        counts = schedule_step_counts(sde, 40, boundaries, schedule)
        assert sum(counts) == 40
        warp = solvers.schedule_warp(sde, torch.tensor(boundaries, dtype=torch.float64), schedule)
        share = (warp[:-1] - warp[1:]) / (warp[0] - warp[-1])
        assert all(abs(c - 40 * float(f)) <= 1 for c, f in zip(counts, share)), (schedule, counts)
    assert schedule_step_counts(sde, 40, boundaries, "uniform") == [16, 12, 12]
    # A narrow window still gets a step.
    assert schedule_step_counts(sde, 10, [1.0, 0.999, 1e-3], "uniform") == [1, 10]
