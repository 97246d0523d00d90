"""Subspace diffusion with the few-step ODE solvers, on Gaussian data with exact networks.

Per plan stage (`subspace_solver_sample`: each level's network in its own dimension, upsampling
at the cutoffs) and as one ODE through the implicit full-space score (`get_solver_sampler` on a
`SubspaceScore`), every solver must reproduce the data's moments in the subspace and in every
orthogonal band (see test_subspace_sampling.py for the data and the check).
"""
from __future__ import annotations

import pytest
import torch
from script_runner import run_python
from test_subspace_closed_form import CHANNELS, SIZE
from test_subspace_sampling import PLANS, SETUPS, assert_matches_data, make_data

import sampling
import sde_lib
import solvers
from subspace_sampling import schedule_step_counts, stage_boundaries, subspace_solver_sample

# About 1 % std error (sde_dpm_solver: 1-2 % at 50 evaluations, see test_solvers.py).
STEPS = {"heun": 40, "dpm_solver": 30, "sde_dpm_solver": 60, "ddim": 150, "ode": None}


def _staged_run(sde_name, method, steps, **options):
    """Staged solver sampling of the two-level Gaussian data from 1000 seeded prior samples:
    (samples, stage reports, data, networks, plan, sde, eps)."""
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
        steps=steps, langevin_steps=2, langevin_snr=0.16, x=prior, device="cpu", **options)
    return samples, reports, data, networks, plan, sde, eps


@pytest.mark.parametrize("sde_name", list(SETUPS))
@pytest.mark.parametrize("method", list(STEPS))
def test_staged_solver_sampling_reproduces_data(sde_name, method):
    samples, reports, data, networks, *_ = _staged_run(sde_name, method, STEPS[method],
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


@pytest.mark.parametrize("method", ["dpm_solver", "sde_dpm_solver"])
def test_steps_split_by_the_share_of_t_still_reproduce_data(method):
    # split="uniform": each stage gets its share of t (more steps above the cutoffs) and runs
    # the solver's own log-SNR grid on its window. The last stage's grid is coarser than the
    # whole grid's there: twice the steps of the staged test (at 60, SDE-DPM-Solver++ misses a
    # band's variance by 7 %).
    samples, reports, data, _, plan, sde, eps = _staged_run("subvp", method, 2 * STEPS[method],
                                                            split="uniform")
    boundaries = [1.0] + [end for _, _, end in stage_boundaries(plan, 1.0, eps)]
    total = solvers.full_steps(method, 2 * STEPS[method], True)[0]
    expected = schedule_step_counts(sde, total, boundaries, "uniform")
    assert [r.steps for r in reports] == expected
    assert expected != schedule_step_counts(sde, total, boundaries, "logsnr")
    assert_matches_data(samples, data, rel_var=0.06, what=f"{method} split t")


def test_an_unknown_step_split_is_one_sentence_naming_the_config_field():
    with pytest.raises(ValueError, match=r"Unknown step split 'share'.*config\.sampling\.split "
                                         r"to one of uniform, edm, logsnr"):
        _staged_run("subvp", "dpm_solver", 10, split="share")
    from configs.default_cifar10_configs import get_default_configs

    assert get_default_configs().sampling.split is None  # the solver's own grid by default


# ------------------------------------------------------------------------------------------------
# Sampling steps independent of the checkpoint


def test_continuous_checkpoints_load_with_any_num_scales(reference_dir):
    from reference_cases import CASES, case_config

    from models import utils as mutils
    from models.checkpoints import load_model_weights

    for case in CASES:
        path = reference_dir / case / "checkpoint_full.pth"
        outputs = []
        for num_scales in (1000, 50):
            config = case_config(reference_dir / case, 32)
            config.model.num_scales = num_scales
            model = load_model_weights(mutils.create_model(config), path)
            assert model.sigmas.shape == (num_scales,)
            torch.testing.assert_close(model.sigmas, mutils.get_sigmas(config), rtol=1e-13,
                                       atol=0)
            torch.manual_seed(0)
            x, labels = torch.rand(2, 3, 32, 32), torch.tensor([0.3, 20.0])
            with torch.no_grad():
                outputs.append(model(x, labels if case.startswith("case_ve") else labels * 10))
        assert torch.equal(outputs[0], outputs[1])


def test_discrete_time_checkpoints_still_check_num_scales(tmp_path):
    from configs.builtin import ve_ncsnpp_small
    from models import utils as mutils
    from models.checkpoints import StateDictMismatchError, load_model_weights

    config = ve_ncsnpp_small.get_config()
    config.device = torch.device("cpu")
    config.data.image_size = 8
    config.training.continuous = False
    config.model.update(embedding_type="positional", num_scales=10)
    torch.save(mutils.create_model(config).state_dict(), tmp_path / "discrete.pth")
    config.model.num_scales = 6
    with pytest.raises(StateDictMismatchError,
                       match=r"the checkpoint's sigmas is \[10\], the model's is \[6\]"):
        load_model_weights(mutils.create_model(config), tmp_path / "discrete.pth")


def test_published_checkpoint_samples_with_other_step_counts(reference_dir, tmp_path):
    import os
    from pathlib import Path

    import numpy as np

    root = Path(__file__).resolve().parents[1]
    case = reference_dir / "case_ve_ncsnpp"  # trained with N = 1000
    common = ["subspace_sample.py",
              "--config", "configs/ve/cifar10_ncsnpp_continuous.py", "--config.model.nf", "16",
              "--config.model.ch_mult", "(1,2,2,2)", "--config.model.num_res_blocks", "1",
              "--ckpt_full", str(case / "checkpoint_full.pth"),
              "--ckpt_subspace", str(case / "checkpoint_subspace.pth"), "--dataset", "cifar",
              "--subspace", "16", "--time", "0.5", "--number_samples", "2", "--batch", "2",
              "--eval_folder", str(tmp_path), "--progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra, steps, nfe in (
            ("pc50", ["--config.model.num_scales", "50", "--config.sampling.corrector", "none"],
             50, 50 + 2),
            ("heun18", ["--sampler", "heun", "--steps", "18"], 17, 2 * 17 + 1 + 2)):
        result = run_python(common + extra + ["--save_name", name], cwd=root, env=env,
                            timeout=600)
        assert result.returncode == 0, result.stderr
        assert np.load(tmp_path / f"{name}.npy").shape == (2, 32, 32, 3)
        total = next(line.split() for line in result.stdout.splitlines()
                     if line.startswith(" total"))
        assert (int(total[1]), int(total[2])) == (steps, nfe), result.stdout
